"""Guards of the run folder and the extractor: resume reuses what was committed, short answers are padded and
counted, layer(-1) is transformers' last hidden state, merge and open_run refuse what they cannot do. Each test
names the breakage it catches (checked by hand once)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import extract
from lvlmlp.extraction.store import RunWriter, merge_runs
from lvlmlp.probing.features import feature_matrix

SETTINGS = {"model": "m", "dtype": "float32", "vocab_size": 5, "prompt_template": None, "max_new_tokens": 1,
            "hidden": False, "layers": []}


def _rows(root: Path, n: int) -> list[dict]:
    rng = np.random.default_rng(7)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = root / "img" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(20 + 3 * i, 30, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"r{i}", "image": str(path), "question": "what is " * (1 + i % 3) + "this?",
                     "label": i % 2})
    return rows


@pytest.fixture(scope="module")
def llava(tiny_ckpt, tmp_path_factory):
    """(checkpoint, backend, rows): one tiny LLaVA and 8 rows for the whole module."""
    ckpt = tiny_ckpt("llava")
    return ckpt, Backend(ckpt, device="cpu"), _rows(tmp_path_factory.mktemp("rows"), 8)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(path.glob("*.npy"))}


# ------------------------------------------------------------------------------------------------ resume
def test_resume_sends_only_uncommitted_rows_to_the_model(llava, tmp_path, monkeypatch):
    """Catches: resume deleting (or ignoring) the committed shards and recomputing every row."""
    _, backend, rows = llava
    kwargs = dict(batch_size=2, shard_size=2, workers=0, progress=False, store_dtype="float32")
    clean = extract(backend, rows, tmp_path / "clean", **kwargs)

    sent: list[list[str]] = []
    real_prefill = Backend.prefill

    def crash_after_three(self, batch, **kw):
        if len(sent) == 3:
            raise KeyboardInterrupt  # the process "dies" in the 4th batch
        sent.append(batch["input_ids"].shape[0])
        return real_prefill(self, batch, **kw)

    monkeypatch.setattr(Backend, "prefill", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        extract(backend, rows, tmp_path / "r", **kwargs)
    committed = sorted((tmp_path / "r" / "shards").glob("*.safetensors"))
    assert len(committed) == 3  # 3 batches of 2 = 3 shards of 2 rows, committed before the crash
    stamps = {p.name: p.stat().st_mtime_ns for p in committed}

    sent.clear()
    seen: list[int] = []

    def count(self, batch, **kw):
        seen.append(batch["input_ids"].shape[0])
        return real_prefill(self, batch, **kw)

    monkeypatch.setattr(Backend, "prefill", count)
    resumed = extract(backend, rows, tmp_path / "r", **kwargs)
    assert sum(seen) == len(rows) - 6  # only the rows no shard holds went to the model
    assert resumed.ids == clean.ids and resumed.meta == clean.meta
    for name, arr in _arrays(clean.path).items():
        np.testing.assert_array_equal(_arrays(resumed.path)[name], arr)
    assert stamps and not (tmp_path / "r" / "shards").exists()  # consolidated, shards gone only at the end

    seen.clear()
    again = extract(backend, rows, tmp_path / "r", **kwargs)  # a finished run: no model work at all
    assert seen == [] and again.ids == clean.ids


def test_run_writer_reopens_committed_shards_without_rewriting_them(tmp_path):
    """Catches: RunWriter recreating the shards folder (or restarting shard numbering) when it resumes."""
    meta = [{"id": f"r{i}"} for i in range(5)]
    arrays = {"logits": np.arange(25, dtype=np.float32).reshape(5, 1, 5), "n_tokens": np.ones(5, dtype=np.int32),
              "row_index": np.arange(5)}
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=2)
    w.append(meta[:4], {k: v[:4] for k, v in arrays.items()})
    first = {p.name: p.read_bytes() for p in (tmp_path / "r" / "shards").glob("*.safetensors")}
    assert sorted(first) == ["000000.safetensors", "000001.safetensors"]
    w.release()  # as when the process dies: its lock goes with it
    w = RunWriter(tmp_path / "r", SETTINGS, shard_size=99)  # the stored shard size wins on resume
    assert w.shard_size == 2 and w.done_ids == {"r0", "r1", "r2", "r3"}
    w.append(meta[4:], {k: v[4:] for k, v in arrays.items()})
    w._flush()
    now = {p.name: p.read_bytes() for p in (tmp_path / "r" / "shards").glob("*.safetensors")}
    assert sorted(now) == [*sorted(first), "000002.safetensors"]
    assert all(now[k] == v for k, v in first.items())
    run = w.close()
    np.testing.assert_array_equal(run.logits(0), arrays["logits"][:, 0])
    assert run.manifest["n_rows"] == 5 and run.manifest["shard_size"] == 2


# ------------------------------------------------------------------------------------------------ extraction
def test_short_answers_are_zero_padded_and_counted(llava, tmp_path):
    """Catches: rows that stop early dropped, mis-counted (n_tokens) or padded with the last logits."""
    ckpt, backend, rows = llava
    k = 4
    free = extract(backend, rows, tmp_path / "free", max_new_tokens=k, batch_size=4, workers=0, progress=False,
                   store_dtype="float32")
    # The same weights whose end-of-sequence token is the second token generated for row 0: some rows stop early.
    batch = backend.encode([Image.open(r["image"]).convert("RGB") for r in rows], [r["question"] for r in rows])
    seq = backend.generate(batch, max_new_tokens=k)["sequences"]
    eos = int(seq[0, 1])
    stop_ckpt = tmp_path / "stop_ckpt"
    shutil.copytree(ckpt, stop_ckpt)
    gen = json.loads((stop_ckpt / "generation_config.json").read_text())
    (stop_ckpt / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    stopped = extract(Backend(stop_ckpt, device="cpu"), rows, tmp_path / "stopped", max_new_tokens=k, batch_size=4,
                      workers=0, progress=False, store_dtype="float32")
    expected_n = [row.index(eos) + 1 if eos in row else k for row in seq.tolist()]
    assert stopped.n_tokens.tolist() == expected_n and min(expected_n) <= 2 and max(expected_n) == k
    for t in range(k):
        live = np.array(expected_n) > t
        np.testing.assert_allclose(stopped.logits(t)[live], free.logits(t)[live], atol=1e-4)
        assert (stopped.logits(t)[~live] == 0).all()
    short = int(np.argmin(expected_n))
    with pytest.raises(LvlmlpError, match=f"row 'r{short}': has no generated token"):
        feature_matrix(stopped, token=k - 1)
    assert stopped.responses[short] != free.responses[short]


def test_layer_minus_one_and_hidden_equal_transformers_hidden_states(llava, tmp_path):
    """Catches: layer(-1) taken from another index of output_hidden_states, or at another position."""
    ckpt, backend, rows = llava
    run = extract(backend, rows[:3], tmp_path / "run", layers=[-1, 1], hidden=True, batch_size=3, workers=0,
                  progress=False, store_dtype="float32")
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    proc = AutoProcessor.from_pretrained(ckpt)
    for i, row in enumerate(rows[:3]):  # one row at a time: no padding in the reference
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}]
        inputs = proc(images=[Image.open(row["image"]).convert("RGB")],
                      text=[proc.apply_chat_template(conv, add_generation_prompt=True)], return_tensors="pt")
        with torch.inference_mode():
            states = model(**inputs, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(run.layer(-1)[i], states[-1][0, -1].numpy(), atol=1e-4)
        np.testing.assert_allclose(run.layer(1)[i], states[1][0, -1].numpy(), atol=1e-4)
        np.testing.assert_allclose(run.hidden()[i], states[-1][0, -1].numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------------ merge
def _shard_run(path: Path, spec: str, rows: list[int], data_hash: str = "h") -> Path:
    w = RunWriter(path, {**SETTINGS, "shard": spec, "data_hash": data_hash, "n_input_rows": 6}, shard_size=4)
    w.append([{"id": f"r{i}"} for i in rows],
             {"logits": np.full((len(rows), 1, 5), 1.0, dtype=np.float32) * np.array(rows)[:, None, None],
              "n_tokens": np.ones(len(rows), dtype=np.int32), "row_index": np.array(rows)})
    return w.close().path


def test_merge_refuses_missing_overlapping_shards_and_an_existing_output(tmp_path, capsys):
    """Catches: merge silently writing a run with a shard missing, rows twice, or over an existing run."""
    s0 = _shard_run(tmp_path / "s0", "0/3", [0, 1])
    s1 = _shard_run(tmp_path / "s1", "1/3", [2, 3])
    s2 = _shard_run(tmp_path / "s2", "2/3", [4, 5])
    with pytest.raises(LvlmlpError, match=r"merge: shard 1/3 is missing"):
        merge_runs([s0, s2], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    dup = _shard_run(tmp_path / "dup", "1/3", [3])
    with pytest.raises(LvlmlpError, match=r"shard 1/3 given twice|more than one run"):
        merge_runs([s0, s1, dup, s2], tmp_path / "m")
    with pytest.raises(LvlmlpError, match=r"the same input row appears in more than one run"):
        merge_runs([s0, _shard_run(tmp_path / "ov", "1/3", [1, 2, 3]), s2], tmp_path / "m")  # row 1 twice
    merged = merge_runs([s2, s0, s1], tmp_path / "ok")
    assert merged.ids == [f"r{i}" for i in range(6)]
    np.testing.assert_array_equal(merged.logits(0)[:, 0], np.arange(6))
    with pytest.raises(LvlmlpError, match=r"ok: holds a run with other settings \(merged_from differ\)"):
        merge_runs([s0, s1, s2], tmp_path / "ok")
    assert main(["merge", str(s0), str(s2), "--out", str(tmp_path / "cli")]) == 2
    assert "lvlmlp: error: merge: shard 1/3 is missing" in capsys.readouterr().err


def test_malformed_shard_spec_is_a_one_line_error(tmp_path, capsys):
    """Catches: --shard parsed leniently (a traceback or a silent whole-manifest run)."""
    (tmp_path / "d.jsonl").write_text('{"id": "a", "image": "a.png", "question": "q?"}\n')
    for spec, message in (("1of2", "--shard: expected I/N such as 0/4, got '1of2'"),
                          ("2/2", "--shard: need 0 <= I < N, got '2/2'"),
                          ("0/0", "--shard: need 0 <= I < N, got '0/0'")):
        assert main(["extract", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out",
                     str(tmp_path / "o"), "--shard", spec]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ open_run
def test_open_run_errors_name_the_folder_and_what_is_missing(tmp_path):
    """Catches: open_run accepting an incomplete run, or arrays/tokens/layers it does not hold."""
    with pytest.raises(LvlmlpError, match=r"not a run folder \(no manifest.json\)"):
        open_run(tmp_path)
    w = RunWriter(tmp_path / "r", {**SETTINGS, "layers": [2]}, shard_size=2)
    w.append([{"id": "a"}, {"id": "b"}], {"logits": np.zeros((2, 1, 5), dtype=np.float32),
                                         "n_tokens": np.ones(2, dtype=np.int32), "row_index": np.arange(2),
                                         "layers": np.ones((2, 1, 3), dtype=np.float32)})
    with pytest.raises(LvlmlpError, match=r"run is incomplete; re-run the same extract command"):
        open_run(tmp_path / "r")
    run = w.close()
    assert len(run) == 2 and repr(run) == f"Run({str(run.path)!r}, rows=2, model='m')"
    with pytest.raises(LvlmlpError, match=r"this run has no 'hidden' array"):
        run.hidden()
    with pytest.raises(LvlmlpError, match=r"token 1 not stored \(this run keeps 1 token\(s\)\)"):
        run.logits(1)
    np.testing.assert_array_equal(run.logits(-1), run.logits(0))  # negative tokens count from the end
    with pytest.raises(LvlmlpError, match=r"token -2 not stored"):
        run.logits(-2)
    with pytest.raises(LvlmlpError, match=r"layer -1 not extracted \(have \[2\]\)"):
        run.layer(-1)
    np.testing.assert_array_equal(run.layer(2), np.ones((2, 3)))
    assert np.isnan(run.labels).all() and run.splits == [None, None] and run.responses == [None, None]
    with pytest.raises(ValueError):
        run.n_tokens[0] = 5  # cached arrays are read-only
    assert run.failures == [] and run.n_logit_tokens == 1
