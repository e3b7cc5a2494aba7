"""Run folder: atomic shards, consolidation into memory-mapped arrays, resume, refusal, merge."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import lvlmlp
from lvlmlp import LvlmlpError, locking, open_run
from lvlmlp.cli import main
from lvlmlp.extraction import store
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import extract
from lvlmlp.extraction.store import RunWriter, check_output_folder, is_complete_run, merge_runs
from lvlmlp.probing.features import feature_matrix

SETTINGS = {"model": "m", "dtype": "float16", "vocab_size": 7, "prompt_template": "{question}", "max_new_tokens": 2}


def _rows(n: int, k: int = 2, v: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    meta = [{"id": f"r{i}", "question": f"q{i}", "label": i % 2, "split": "train"} for i in range(n)]
    arrays = {
        "logits": rng.normal(size=(n, k, v)).astype(np.float16),
        "n_tokens": rng.integers(1, k + 1, size=n).astype(np.int32),
        "row_index": np.arange(n, dtype=np.int64),
        "hidden": rng.normal(size=(n, 5)).astype(np.float32),
        "layers": rng.normal(size=(n, 3, 5)).astype(np.float32),
    }
    return meta, arrays


def test_round_trip_across_shards(tmp_path):
    meta, arrays = _rows(10)
    w = RunWriter(tmp_path / "run", {**SETTINGS, "layers": [0, 2, -1]}, shard_size=3)
    for s in range(0, 10, 4):  # batches that do not line up with shards
        w.append(meta[s : s + 4], {k: v[s : s + 4] for k, v in arrays.items()})
    run = w.close()
    assert run.ids == [m["id"] for m in meta]
    assert run.meta == meta
    for t in range(2):
        np.testing.assert_array_equal(run.logits(t), arrays["logits"][:, t])
        assert isinstance(open_run(run.path).logits(t), np.memmap)
    np.testing.assert_array_equal(run.n_tokens, arrays["n_tokens"])
    np.testing.assert_array_equal(run.hidden(), arrays["hidden"])
    np.testing.assert_array_equal(run.layer(-1), arrays["layers"][:, 2])
    np.testing.assert_array_equal(run.labels, [i % 2 for i in range(10)])
    assert run.manifest["complete"] and run.manifest["n_rows"] == 10
    assert not (run.path / "shards").exists()
    with pytest.raises(LvlmlpError, match="token 2 not stored"):
        run.logits(2)
    with pytest.raises(LvlmlpError, match="layer 1 not extracted"):
        run.layer(1)


def test_resume_skips_committed_rows_and_refuses_other_settings(tmp_path):
    meta, arrays = _rows(7)
    w = RunWriter(tmp_path / "run", SETTINGS, shard_size=2)
    w.append(meta[:5], {k: v[:5] for k, v in arrays.items()})  # 2 shards committed, 1 row only buffered
    del w  # the process "dies" here
    assert sorted((tmp_path / "run" / "shards").glob("*.safetensors"))[-1].name == "000001.safetensors"
    with pytest.raises(LvlmlpError, match="vocab_size differ"):
        RunWriter(tmp_path / "run", {**SETTINGS, "vocab_size": 8})
    with pytest.raises(LvlmlpError, match="incomplete"):
        open_run(tmp_path / "run")
    w = RunWriter(tmp_path / "run", SETTINGS)
    assert w.done_ids == {"r0", "r1", "r2", "r3"}
    w.append(meta[4:], {k: v[4:] for k, v in arrays.items()})
    run = w.close()
    assert run.ids == [m["id"] for m in meta]
    np.testing.assert_array_equal(run.logits(1), arrays["logits"][:, 1])


def test_a_resumed_run_refuses_committed_rows_whose_images_were_replaced(tmp_path):
    """A partial run (killed after some shards) whose already-extracted rows had their images replaced in place:
    resuming would mix old features with new images, so the shard holding them is named with the remedy; images of
    rows not yet committed may change (a missing image fixed before the re-run)."""
    from lvlmlp.data import image_stamp

    images = []
    for i in range(5):
        images.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(images[-1])
    rows = [{"id": f"r{i}", "image": str(images[i])} for i in range(5)]

    def stamps() -> dict[str, str]:
        return {r["id"]: image_stamp(r) for r in rows}

    meta, arrays = _rows(5)
    w = RunWriter(tmp_path / "run", SETTINGS, shard_size=2, image_stamps=stamps())
    w.append(meta[:4], {k: v[:4] for k, v in arrays.items()})  # shards 0 (r0, r1) and 1 (r2, r3) committed
    del w
    Image.new("RGB", (9, 9), (0, 0, 0)).save(images[4])  # r4 was never committed: its new image is fine
    w = RunWriter(tmp_path / "run", SETTINGS, image_stamps=stamps())
    assert w.done_ids == {"r0", "r1", "r2", "r3"}
    w.release()
    Image.new("RGB", (9, 9), (0, 0, 0)).save(images[3])  # r3's image replaced under the partial run
    shard = tmp_path / "run" / "shards" / "000001.safetensors"
    with pytest.raises(LvlmlpError) as err:
        RunWriter(tmp_path / "run", SETTINGS, image_stamps=stamps())
    assert str(err.value) == (f"{shard}: the image of row 'r3' changed since this shard was committed (file size or "
                              f"modification time); {store._REMEDY}")
    shard.unlink()  # the remedy: its rows are extracted again
    w = RunWriter(tmp_path / "run", SETTINGS, image_stamps=stamps())
    assert w.done_ids == {"r0", "r1"}
    w.release()


def test_failures_are_committed_with_shards(tmp_path):
    meta, arrays = _rows(3)
    w = RunWriter(tmp_path / "run", SETTINGS, shard_size=2)
    w.fail("bad", "row 'bad': image not found: x.png")
    w.append(meta, arrays)
    run = w.close()
    assert run.failures == [{"id": "bad", "error": "row 'bad': image not found: x.png"}]
    assert RunWriter(tmp_path / "run", SETTINGS).done_ids == {"r0", "r1", "r2", "bad"}


def test_merge_restores_input_order(tmp_path):
    meta, arrays = _rows(9)
    order = [np.array([0, 3, 6, 7]), np.array([1, 2, 4, 5, 8])]  # interleaved on purpose
    dirs = []
    for s, idx in enumerate(order):
        w = RunWriter(tmp_path / f"s{s}", {**SETTINGS, "shard": f"{s}/2", "data_hash": str(s)}, shard_size=2)
        w.append([meta[i] for i in idx], {k: v[idx] for k, v in arrays.items()})
        dirs.append(w.close().path)
    run = merge_runs(dirs, tmp_path / "merged")
    assert run.ids == [m["id"] for m in meta]
    np.testing.assert_array_equal(run.logits(0), arrays["logits"][:, 0])
    np.testing.assert_array_equal(run.hidden(), arrays["hidden"])
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert "shard" not in manifest and len(manifest["merged_from"]) == 2
    w = RunWriter(tmp_path / "other", {**SETTINGS, "model": "other"}, shard_size=2)
    w.append(meta[:1], {k: v[:1] for k, v in arrays.items()})
    with pytest.raises(LvlmlpError, match="model differ"):
        merge_runs([dirs[0], w.close().path], tmp_path / "bad")


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_store.py (marked `mutation_guard`):
# Guards of the run folder and the extractor: resume reuses what was committed, short answers are padded and
# counted, layer(-1) is transformers' last hidden state, merge and open_run refuse what they cannot do. Each test
# names the breakage it catches (checked by hand once).

GUARD_SETTINGS = {"model": "m", "dtype": "float32", "vocab_size": 5, "prompt_template": None, "max_new_tokens": 1,
                  "hidden": False, "layers": []}


def _guard_rows(root: Path, n: int) -> list[dict]:
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
    return ckpt, Backend(ckpt, device="cpu"), _guard_rows(tmp_path_factory.mktemp("rows"), 8)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(path.glob("*.npy"))}


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
def test_run_writer_reopens_committed_shards_without_rewriting_them(tmp_path):
    """Catches: RunWriter recreating the shards folder (or restarting shard numbering) when it resumes."""
    meta = [{"id": f"r{i}"} for i in range(5)]
    arrays = {"logits": np.arange(25, dtype=np.float32).reshape(5, 1, 5), "n_tokens": np.ones(5, dtype=np.int32),
              "row_index": np.arange(5)}
    w = RunWriter(tmp_path / "r", GUARD_SETTINGS, shard_size=2)
    w.append(meta[:4], {k: v[:4] for k, v in arrays.items()})
    first = {p.name: p.read_bytes() for p in (tmp_path / "r" / "shards").glob("*.safetensors")}
    assert sorted(first) == ["000000.safetensors", "000001.safetensors"]
    w.release()  # as when the process dies: its lock goes with it
    w = RunWriter(tmp_path / "r", GUARD_SETTINGS, shard_size=99)  # the stored shard size wins on resume
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
@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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
    w = RunWriter(path, {**GUARD_SETTINGS, "shard": spec, "data_hash": data_hash, "n_input_rows": 6}, shard_size=4)
    w.append([{"id": f"r{i}"} for i in rows],
             {"logits": np.full((len(rows), 1, 5), 1.0, dtype=np.float32) * np.array(rows)[:, None, None],
              "n_tokens": np.ones(len(rows), dtype=np.int32), "row_index": np.array(rows)})
    return w.close().path


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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
@pytest.mark.mutation_guard
def test_open_run_errors_name_the_folder_and_what_is_missing(tmp_path):
    """Catches: open_run accepting an incomplete run, or arrays/tokens/layers it does not hold."""
    with pytest.raises(LvlmlpError, match=r"not a run folder \(no manifest.json\)"):
        open_run(tmp_path)
    w = RunWriter(tmp_path / "r", {**GUARD_SETTINGS, "layers": [2]}, shard_size=2)
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


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_store_edges.py (marked `mutation_guard`):
# Guards of the feature store (extraction/store.py) written against its surviving mutants (docs/mutation-report.md):
# merge of failures and of one whole run, the exact one-line errors of a damaged folder, manifest or shard set, and
# the defaults of `Run.logits` and `merge_runs`. No model: every run here is written by `RunWriter` itself.

EDGE_SETTINGS = {"model": "m", "dtype": "float32", "vocab_size": 3, "prompt_template": None, "max_new_tokens": 2}


def _edge_arrays(rows: list[int]) -> dict[str, np.ndarray]:
    # each row's values depend on its input position only, so a merged run can be compared with `_edge_arrays(all rows)`
    logits = np.arange(6, dtype=np.float32).reshape(1, 2, 3) + 100 * np.array(rows, dtype=np.float32)[:, None, None]
    return {"logits": logits, "n_tokens": np.full(len(rows), 2, dtype=np.int32), "row_index": np.array(rows)}


def _run(path: Path, rows: list[int], failed: tuple[int, ...] = (), shard: str | None = None, **extra) -> Path:
    settings = {**EDGE_SETTINGS, **extra, **({"shard": shard, "data_hash": "h"} if shard else {})}
    w = RunWriter(path, settings, shard_size=2)
    w.append([{"id": f"r{i}"} for i in rows], _edge_arrays(rows))
    for i in failed:
        w.fail(f"r{i}", f"row {i}: unreadable image")
    return w.close().path


@pytest.mark.mutation_guard
def test_merge_keeps_every_shards_failures_and_copies_one_whole_run(tmp_path: Path):
    """Catches: failures dropped, mis-keyed or doubled by merge, one whole (unsharded) run refused or read as two,
    the output's shard size not the chunk asked for (default 256)."""
    s0 = _run(tmp_path / "s0", [0, 3], failed=(1,), shard="0/2")
    s1 = _run(tmp_path / "s1", [2, 5], failed=(4,), shard="1/2")
    merged = merge_runs([s1, s0], tmp_path / "m", chunk=3)
    assert merged.ids == ["r0", "r2", "r3", "r5"]
    assert sorted(merged.failures, key=lambda f: f["id"]) == [{"id": "r1", "error": "row 1: unreadable image"},
                                                              {"id": "r4", "error": "row 4: unreadable image"}]
    assert merged.manifest["n_failed"] == 2 and merged.manifest["shard_size"] == 3
    np.testing.assert_array_equal(merged.logits(1), _edge_arrays([0, 2, 3, 5])["logits"][:, 1])
    assert merge_runs([s1, s0], tmp_path / "m", chunk=3).failures == merged.failures  # finished: nothing added
    whole = _run(tmp_path / "whole", [0, 1, 2], failed=(3,))
    copy = merge_runs([whole], tmp_path / "copy")
    assert copy.ids == ["r0", "r1", "r2"] and copy.failures == [{"id": "r3", "error": "row 3: unreadable image"}]
    assert copy.manifest["shard_size"] == 256
    for name in ("logits", "n_tokens", "row_index"):
        np.testing.assert_array_equal(np.load(copy.path / f"{name}.npy"), np.load(whole / f"{name}.npy"))


@pytest.mark.mutation_guard
def test_merge_messages_name_the_run_and_the_shard(tmp_path: Path):
    """Catches: the merge errors losing what they name (the run, the shard spec, the settings that differ)."""
    with pytest.raises(LvlmlpError, match="^merge: no run folders given$"):
        merge_runs([], tmp_path / "m")
    a = _run(tmp_path / "a", [0], shard="0/2")
    b = _run(tmp_path / "b", [1], shard="1/2", model="other", vocab_size=3, dtype="float16")
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: {b} was made with other settings (dtype, model differ)")):
        merge_runs([a, b], tmp_path / "m")
    whole = _run(tmp_path / "whole", [1])
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: {whole} is not a shard of `extract --shard I/N` "
                                                    "(shard: None)")):
        merge_runs([a, whole], tmp_path / "m")
    third = _run(tmp_path / "third", [1], shard="1/3")
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: {third} is shard 1/3 but another run is of 2 shards")):
        merge_runs([a, third], tmp_path / "m")
    again = _run(tmp_path / "again", [2], shard="0/2")
    with pytest.raises(LvlmlpError, match=re.escape(f"merge: shard 0/2 given twice ({a} and {again})")):
        merge_runs([a, again], tmp_path / "m")
    b_same = _run(tmp_path / "b2", [0], shard="1/2")
    with pytest.raises(LvlmlpError, match="^merge: the same input row appears in more than one run "
                                          r"\(overlapping shards\?\)$"):
        merge_runs([a, b_same], tmp_path / "m")


@pytest.mark.mutation_guard
def test_reopening_a_folder_compares_keys_present_on_one_side_only(tmp_path: Path):
    """Catches: settings compared on the keys both runs have only (a new setting would silently reuse rows)."""
    _run(tmp_path / "r", [0, 1])
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: holds a run with other settings (hidden "
                                                    "differ)")):
        RunWriter(tmp_path / "r", {**EDGE_SETTINGS, "hidden": True})


@pytest.mark.mutation_guard
def test_damaged_manifests_and_foreign_folders_are_named(tmp_path: Path):
    """Catches: the one-line errors of a non-JSON or non-object manifest, a file given as --out, a foreign folder
    (the first three names it holds, then '...') losing their text."""
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'bad' / 'manifest.json'}: not valid JSON (")):
        open_run(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'bad' / 'manifest.json'}: not a run manifest "
                                                    "(a JSON object is expected)") + "$"):
        open_run(tmp_path / "bad")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LvlmlpError, match=re.escape(f"--out {tmp_path / 'file'}: exists and is not a folder") + "$"):
        check_output_folder(tmp_path / "file")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("d.txt", "b.txt", "a.txt", "c.txt"):
        (mine / name).write_text("keep me")
    with pytest.raises(LvlmlpError, match=re.escape(f"--out {mine}: exists and is not an lvlmlp run folder (it holds "
                                                    "a.txt, b.txt, c.txt, ...); give an empty or new folder") + "$"):
        RunWriter(mine, EDGE_SETTINGS)
    (mine / "d.txt").unlink()
    with pytest.raises(LvlmlpError, match=re.escape(f"--out {mine}: exists and is not an lvlmlp run folder (it holds "
                                                    "a.txt, b.txt, c.txt); give an empty or new folder") + "$"):
        check_output_folder(mine)
    (mine / "d.txt").write_text("keep me")
    with pytest.raises(LvlmlpError, match=re.escape(f"--run-dir {mine}: exists and is not an lvlmlp run folder")):
        check_output_folder(mine, what="--run-dir")
    assert sorted(p.name for p in mine.iterdir()) == ["a.txt", "b.txt", "c.txt", "d.txt"]


@pytest.mark.mutation_guard
def test_a_shard_with_a_foreign_name_is_named(tmp_path: Path):
    """Catches: the error for a file in shards/ that lvlmlp did not name losing its text."""
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
    w.release()
    shard = next((tmp_path / "r" / "shards").glob("*.safetensors"))
    shutil.copy(shard, shard.with_name("copy.safetensors"))  # a valid shard under a name lvlmlp never writes
    with pytest.raises(LvlmlpError, match=re.escape(f"{shard.with_name('copy.safetensors')}: not a shard lvlmlp "
                                                    "wrote (unexpected name); move it out of the folder") + "$"):
        RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)


@pytest.mark.mutation_guard
def test_run_logits_default_to_the_first_token_and_layer_message_without_layers(tmp_path: Path):
    """Catches: `Run.logits()` defaulting to another token, the layer error without its 'none'."""
    run = open_run(_run(tmp_path / "r", [0, 1]))
    np.testing.assert_array_equal(run.logits(), _edge_arrays([0, 1])["logits"][:, 0])
    with pytest.raises(LvlmlpError, match=re.escape(f"{run.path}: layer 0 not extracted (have none)") + "$"):
        run.layer(0)
    assert json.loads((run.path / "manifest.json").read_text())["n_rows"] == 2


# ------------------------------------------------------------------------------------------------ writer, lock
def _open_shards(path: Path) -> list[Path]:
    return sorted((path / "shards").glob("*.safetensors"))


@pytest.mark.mutation_guard
def test_new_manifest_fields_shard_sizes_and_a_second_close(tmp_path: Path):
    """Catches: the manifest of a run in progress without `complete: false`, a version or a UTC creation time;
    the default shard size; a batch that crosses a half-filled shard making a shard larger than `shard_size`;
    settings or meta that JSON cannot hold natively (a Path) refused; a second close() consolidating again."""
    w = RunWriter(tmp_path / "r", {**EDGE_SETTINGS, "model": tmp_path / "ckpt"}, shard_size=2)
    doc = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert doc["complete"] is False and doc["lvlmlp_version"] == lvlmlp.__version__ and doc["shard_size"] == 2
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", doc["created_at"]) and doc["model"] == str(
        tmp_path / "ckpt")
    w.append([{"id": "r0", "source": tmp_path / "a.png"}], _edge_arrays([0]))
    w.append([{"id": f"r{i}"} for i in (1, 2, 3)], _edge_arrays([1, 2, 3]))  # fills the half shard, then one more
    assert len(_open_shards(tmp_path / "r")) == 2 and len(w._buf_meta) == 0
    run = w.close()
    assert run.meta[0]["source"] == str(tmp_path / "a.png") and run.ids == ["r0", "r1", "r2", "r3"]
    assert w.close().ids == run.ids  # already complete: nothing redone
    w = RunWriter(tmp_path / "default", EDGE_SETTINGS)
    assert json.loads((tmp_path / "default" / "manifest.json").read_text())["shard_size"] == 256
    w.release()


@pytest.mark.mutation_guard
def test_rows_go_in_input_order_by_row_index_or_in_append_order_without_it(tmp_path: Path):
    """Catches: the committed row_index ignored (rows in arrival order) or required."""
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    for rows in ([3, 1], [2, 0]):  # batches arriving out of order, as from parallel workers
        w.append([{"id": f"r{i}"} for i in rows], _edge_arrays(rows))
        w.fail(f"x{rows[0]}", "bad image")
        w._flush()  # a shard holding a failure only, between the row shards
    run = w.close()
    assert run.ids == ["r0", "r1", "r2", "r3"] and len(run.failures) == 2
    np.testing.assert_array_equal(run.logits(0), _edge_arrays([0, 1, 2, 3])["logits"][:, 0])
    assert run.logits(0).dtype == np.float32 and run.n_tokens.dtype == np.int32 and run.row_index.dtype == np.int64
    w = RunWriter(tmp_path / "plain", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "b"}, {"id": "a"}, {"id": "c"}], {"logits": np.zeros((3, 2, 3), dtype=np.float32),
                                                      "last_logits": np.eye(3, dtype=np.float32)})
    run = w.close()
    assert run.ids == ["b", "a", "c"]
    np.testing.assert_array_equal(run.last_logits(), np.eye(3))


@pytest.mark.mutation_guard
def test_failures_alone_are_committed_and_resumed(tmp_path: Path):
    """Catches: failures buffered after the last full shard lost at close, failed rows redone on resume, the
    check of expected ids skipped, a resumed run keeping the old device instead of the new one."""
    w = RunWriter(tmp_path / "r", {**EDGE_SETTINGS, "device": "cpu"}, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
    w.fail("r2", "bad image")
    w._flush()
    w.release()
    w = RunWriter(tmp_path / "r", {**EDGE_SETTINGS, "device": "cuda:1"}, shard_size=2)
    assert w.done_ids == {"r0", "r1", "r2"}
    w.fail("r3", "bad question")
    with pytest.raises(LvlmlpError, match=re.escape("row 'r4' is missing (1 missing, 0 unexpected)")):
        w.close(["r0", "r1", "r2", "r3", "r4"])
    w = RunWriter(tmp_path / "r", {**EDGE_SETTINGS, "device": "cuda:1"}, shard_size=2)
    run = w.close(["r0", "r1", "r2", "r3"])
    assert run.failures == [{"id": "r2", "error": "bad image"}, {"id": "r3", "error": "bad question"}]
    assert run.manifest["device"] == "cuda:1"


@pytest.mark.mutation_guard
def test_append_message_and_settings_message(tmp_path: Path):
    """Catches: the row-count and other-settings messages losing what they name."""
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    with pytest.raises(ValueError, match=re.escape("array 'logits' has 3 rows for 2 metadata rows")):
        w.append([{"id": "a"}, {"id": "b"}], {"logits": np.zeros((3, 2, 3), dtype=np.float32)})
    w.release()
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: holds a run with other settings (dtype, model "
                                                    "differ); use another --out or delete the folder") + "$"):
        RunWriter(tmp_path / "r", {**EDGE_SETTINGS, "model": "x", "dtype": "bfloat16"})


@pytest.mark.mutation_guard
def test_tampered_shard_meta_or_data_fails_its_checksum(tmp_path: Path):
    """Catches: the checksum leaving out the rows' meta, the failures or the arrays, or not being stored."""
    for part in ("meta", "failures", "data"):
        w = RunWriter(tmp_path / part, EDGE_SETTINGS, shard_size=2)
        w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
        w.fail("r9", "bad")
        w._flush()
        w.release()
        shard = _open_shards(tmp_path / part)[-1 if part == "failures" else 0]  # the failure has a shard of its own
        with safe_open(str(shard), framework="np") as f:
            header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        assert "sha256" in header
        if part == "data":
            tensors["logits"][0, 0, 0] += 1
        else:
            header[part] = header[part].replace("r", "x")
        save_file(tensors, str(shard), metadata=header)
        with pytest.raises(LvlmlpError, match=re.escape(f"{shard}: shard contents do not match its checksum")):
            RunWriter(tmp_path / part, EDGE_SETTINGS, shard_size=2)


@pytest.mark.mutation_guard
def test_full_disk_names_the_run_folder_and_leaves_no_temporary_shard(tmp_path: Path, monkeypatch):
    """Catches: the full-disk error naming no folder, or hidden by the clean-up of a shard never written."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    monkeypatch.setattr(store, "save_file", full)
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: no space left on device")):
        w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
    w.release()
    assert list((tmp_path / "r" / "shards").iterdir()) == []


@pytest.mark.mutation_guard
def test_lock_names_its_holder_is_private_and_is_dropped_by_a_forked_child(tmp_path: Path, monkeypatch):
    """Catches: the in-use message without its holder (pid, host, UTC time, command), the lock file's mode, a
    nested folder not created, a released or child-forgotten descriptor still tracked or unlocked twice."""
    monkeypatch.setattr(sys, "argv", ["/usr/bin/lvlmlp", "extract", "--out", "b"])  # the holder's command line
    folder = tmp_path / "a" / "b"
    lock = locking.FolderLock(folder)
    assert (folder / locking.LOCK_NAME).stat().st_mode & 0o777 == 0o644 & ~_umask()
    command = "lvlmlp extract --out b"
    with pytest.raises(LvlmlpError) as err:
        locking.FolderLock(folder)
    assert re.fullmatch(re.escape(f"{folder}: in use by pid {os.getpid()} on {socket.gethostname()} since ")
                        + r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
                        + re.escape(f" ({command}); wait for it to finish (or stop it) and re-run"), str(err.value))
    fd = lock._fd
    lock.release()
    assert fd not in locking._HELD_LOCKS
    lock.release()  # twice is harmless
    (folder / locking.LOCK_NAME).write_text("")  # a lock file whose holder wrote nothing
    held = locking.FolderLock(folder)
    with open(folder / locking.LOCK_NAME, "r+") as fh:
        fh.truncate(0)
    with pytest.raises(LvlmlpError, match=re.escape(f"{folder}: in use by another process;")):
        locking.FolderLock(folder)
    locking.forget_inherited_locks()  # what a forked child does: its copy closed, not unlocked
    assert locking._HELD_LOCKS == set()
    held.release()  # the child's lock object must not unlock or close a descriptor it no longer has
    locking.FolderLock(folder).release()  # the lock is free: its only descriptor was closed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.mutation_guard
def test_is_complete_run_compares_the_identity_and_honours_ignore(tmp_path: Path):
    """Catches: is_complete_run true for a missing, unfinished or differently-made run, or blind to `ignore`."""
    assert not is_complete_run(tmp_path / "none", EDGE_SETTINGS)
    w = RunWriter(tmp_path / "r", {**EDGE_SETTINGS, "model": tmp_path / "ckpt"}, shard_size=2)
    w.append([{"id": "r0"}], _edge_arrays([0]))
    w._flush()
    assert not is_complete_run(tmp_path / "r", {**EDGE_SETTINGS, "model": tmp_path / "ckpt"})  # not finished
    w.close()
    assert is_complete_run(tmp_path / "r", {**EDGE_SETTINGS, "model": tmp_path / "ckpt", "device": "cuda"})
    assert not is_complete_run(tmp_path / "r", {**EDGE_SETTINGS, "model": tmp_path / "ckpt", "max_new_tokens": 3})
    assert is_complete_run(tmp_path / "r", {**EDGE_SETTINGS, "model": tmp_path / "ckpt", "max_new_tokens": 3},
                           ignore=("max_new_tokens",))


# ------------------------------------------------------------------------------------------------ damaged folders
DAMAGED = "the run folder is damaged (extract it again)"
REMEDY = "delete this file and re-run the same command: its rows will be done again"


def _safetensors_error(path: Path) -> str:
    """The first line of what safetensors itself says about a damaged file."""
    with pytest.raises(Exception) as err:
        with safe_open(str(path), framework="np") as f:
            [f.get_tensor(k) for k in f.keys()]
    return str(err.value).splitlines()[0]


@pytest.mark.mutation_guard
def test_damaged_run_folders_are_named_with_their_remedy(tmp_path: Path):
    """Catches: the one-line errors of a damaged run folder (meta missing or short, a row without an id, an array
    truncated, unreadable or of another vocabulary) losing what they name, or an array's rows read on another
    axis (logits are token-major)."""
    def fresh(name: str) -> Path:
        return _run(tmp_path / name, [0, 1, 2])

    r = fresh("meta")
    (r / "meta.jsonl").unlink()
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'meta.jsonl'}: missing; {DAMAGED}") + "$"):
        open_run(r)
    r = fresh("short")
    (r / "meta.jsonl").write_text('{"id": "r0"}\n{"id": "r1"}\n')
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'meta.jsonl'}: 2 rows, the manifest says 3; {DAMAGED}")
                       + "$"):
        open_run(r)
    r = fresh("noid")
    (r / "meta.jsonl").write_text('{"id": "r0"}\n{"id": 1}\n{"id": "r2"}\n')
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'meta.jsonl'}: row 2 has no string 'id'") + "$"):
        open_run(r)
    r = fresh("rows")
    np.save(r / "n_tokens.npy", np.ones(2, dtype=np.int32))
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'n_tokens.npy'}: holds 2 rows but meta.jsonl has 3; "
                                                    f"{DAMAGED}") + "$"):
        open_run(r)
    r = fresh("scalar")
    np.save(r / "row_index.npy", np.int64(3))
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'row_index.npy'}: holds -1 rows but meta.jsonl has 3")):
        open_run(r)
    r = fresh("unreadable")
    (r / "logits.npy").write_bytes(b"\x93NUMPY garbage\nsecond line")
    with pytest.raises(ValueError) as numpy_says:
        np.load(r / "logits.npy", mmap_mode="r")
    first = str(numpy_says.value).splitlines()[0]
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'logits.npy'}: unreadable array ({first}); {DAMAGED}")
                       + "$"):
        open_run(r)
    r = fresh("vocab")
    np.save(r / "logits.npy", np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(LvlmlpError, match=re.escape(f"{r / 'logits.npy'}: 4 logits per row, the manifest says "
                                                    "vocab_size 3") + "$"):
        open_run(r)
    run = open_run(fresh("ok"))  # logits (K=2, N=3, V=3): rows on axis 1, and K != N so the axis matters
    assert np.load(run.path / "logits.npy", mmap_mode="r").shape == (2, 3, 3)


@pytest.mark.mutation_guard
def test_corrupt_and_doubled_shards_are_named(tmp_path: Path):
    """Catches: a corrupt shard's message without the file, the reason's first line or the remedy; a row in two
    shards named without the row or the two files; the ids check reporting the wrong row or count."""
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
    w.release()
    shard = _open_shards(tmp_path / "r")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(LvlmlpError, match=re.escape(f"{shard}: corrupt shard ({_safetensors_error(shard)}); {REMEDY}")
                       + "$"):
        RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    shard.write_bytes(data)
    shutil.copy(shard, shard.with_name("000007.safetensors"))  # the same rows committed twice
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: row 'r0' is in two shards (000000.safetensors "
                                                    "and 000007.safetensors); remove one of them and re-run the same "
                                                    "command") + "$"):
        w.close()
    shard.with_name("000007.safetensors").unlink()
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "x1"}, {"id": "x2"}, {"id": "r2"}], _edge_arrays([5, 6, 2]))
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: row 'r3' is missing (2 missing, 2 unexpected);"
                                                    " the run is not marked complete; re-run the same command") + "$"):
        w.close(["r0", "r1", "r2", "r3", "r4"])
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r'}: row 'x1' is not in the input (0 missing, 2 "
                                                    "unexpected)")):
        w.close(["r0", "r1", "r2"])
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    w.fail("r9", "bad image")  # a failed row counts as done
    assert w.close(["r0", "r1", "r2", "x1", "x2", "r9"]).failures == [{"id": "r9", "error": "bad image"}]
    w = RunWriter(tmp_path / "pos", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "a"}, {"id": "b"}], _edge_arrays([0, 0]))  # two rows claiming one input position
    with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'pos'}: two shards hold rows of the same input "
                                                    "position; the run is not complete") + "$"):
        w.close()


@pytest.mark.mutation_guard
def test_a_shard_damaged_before_close_stale_temporaries_and_exact_array_files(tmp_path: Path, monkeypatch):
    """Catches: a shard damaged between commit and close() named without safetensors' own reason; stale or
    half-written `*.npy.tmp` files left behind; a full disk during consolidation naming no folder; final arrays
    with bytes beyond their data."""
    w = RunWriter(tmp_path / "r", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
    shard = _open_shards(tmp_path / "r")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:40])
    with pytest.raises(LvlmlpError, match=re.escape(f"{shard}: corrupt shard ({_safetensors_error(shard)}); {REMEDY}")
                       + "$"):
        w.close()

    shard.write_bytes(data)
    with safe_open(str(shard), framework="np") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["logits"][1, 1, 1] = -1  # header and row_index intact: only the copy's checksum sees it
    save_file(tensors, str(shard), metadata=header)
    w = RunWriter(tmp_path / "r2", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
    shutil.copy(shard, _open_shards(tmp_path / "r2")[0])
    with pytest.raises(LvlmlpError, match="shard contents do not match its checksum"):
        w.close()
    assert list((tmp_path / "r2").glob("*.npy.tmp")) == [] and list((tmp_path / "r2").glob("*.npy")) == []

    w = RunWriter(tmp_path / "r3", EDGE_SETTINGS, shard_size=2)
    w.append([{"id": "r0"}, {"id": "r1"}], _edge_arrays([0, 1]))
    (tmp_path / "r3" / "logits.npy.tmp").write_bytes(b"left by a killed consolidation")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", full)
        with pytest.raises(LvlmlpError, match=re.escape(f"{tmp_path / 'r3'}: no space left on device")):
            w.close()
    w = RunWriter(tmp_path / "r3", EDGE_SETTINGS, shard_size=2)
    # left by a killed consolidation of an array this run does not write (so not overwritten by this one)
    (tmp_path / "r3" / "hidden.npy.tmp").write_bytes(b"left by a killed consolidation")
    run = w.close()
    assert list(run.path.glob("*.tmp")) == [] and not (run.path / "shards").exists()
    for path in run.path.glob("*.npy"):
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                               np.lib.format.read_array_header_2_0)(fh)
            assert path.stat().st_size == fh.tell() + int(np.prod(shape)) * dtype.itemsize, path.name


def _shard_rows(run_dir: Path) -> list[list[str]]:
    """The row ids of each committed shard of a partial run, in commit order."""
    out = []
    for path in sorted((run_dir / "shards").glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            out.append([m["id"] for m in json.loads(f.metadata()["meta"])])
    return out


@pytest.mark.mutation_guard
def test_rows_with_large_metadata_are_committed_as_shards_under_the_header_budget(tmp_path: Path, monkeypatch):
    """Catches: a shard's header packed past HEADER_BUDGET (or below it: a row's size is its JSON and the 2
    characters that separate it in the list), a row larger than the budget not committed alone, rows skipped
    between parts, and a failure written into every part instead of once."""
    meta, arrays = _rows(5)
    meta = [dict(m, question="x" * 100) for m in meta]
    size = len(json.dumps(meta[0])) + 2  # every row has this size (ids r0..r4: same length)
    assert {len(json.dumps(m)) + 2 for m in meta} == {size}
    for budget, expected in ((2 * size, [["r0", "r1"], ["r2", "r3"], ["r4"]]),  # exactly two rows a shard
                             (3 * size - 12, [["r0", "r1"], ["r2", "r3"], ["r4"]]),  # 4 characters a row short of 3
                             (size // 2, [["r0"], ["r1"], ["r2"], ["r3"], ["r4"]])):  # each row alone, over budget
        monkeypatch.setattr(store, "HEADER_BUDGET", budget)
        folder = tmp_path / f"b{budget}"
        w = RunWriter(folder, SETTINGS, shard_size=5)
        w.fail("bad", "row 'bad': image not found: x.png")
        w.append(meta, arrays)  # 5 rows: flushed now, as parts
        assert _shard_rows(folder) == expected
        run = w.close()
        assert run.ids == ["r0", "r1", "r2", "r3", "r4"] and run.meta == meta
        assert run.failures == [{"id": "bad", "error": "row 'bad': image not found: x.png"}]


@pytest.mark.mutation_guard
def test_image_stamps_recorded_per_shard_and_a_finished_runs_images_hash_compared(tmp_path: Path):
    """Catches: a row without a stamp recorded as other than "missing"; shards written without stamps (or a row the
    caller has no stamp for) refused on resume; a finished run reopened with another images_hash not refused with
    `images_changed` (or refused with the same one, or without one, or while unfinished); check_images_unchanged
    not comparing the finished run of the same rows; Run.vision not reading vision.npy; merge not refusing shards
    cut from other input rows."""
    meta, arrays = _rows(3)
    w = RunWriter(tmp_path / "stamped", SETTINGS, shard_size=2, image_stamps={"r0": "10\0t0"})
    w.append(meta[:2], {k: v[:2] for k, v in arrays.items()})
    with safe_open(str(tmp_path / "stamped" / "shards" / "000000.safetensors"), framework="np") as f:
        assert json.loads(f.metadata()["images"]) == {"r0": "10\0t0", "r1": "missing"}
    w.release()
    assert RunWriter(tmp_path / "stamped", SETTINGS, image_stamps={}).done_ids == {"r0", "r1"}  # r0, r1: no stamp now
    plain = RunWriter(tmp_path / "plain", SETTINGS, shard_size=2)  # shards without stamps (no `images` header)
    plain.append(meta[:2], {k: v[:2] for k, v in arrays.items()})
    plain.release()
    assert RunWriter(tmp_path / "plain", SETTINGS, image_stamps={"r0": "x"}).done_ids == {"r0", "r1"}

    hashed = {**SETTINGS, "images_hash": "a", "data_hash": "d"}
    w = RunWriter(tmp_path / "run", hashed, shard_size=2)
    w.append(meta[:2], {k: v[:2] for k, v in arrays.items()})
    w.release()
    RunWriter(tmp_path / "run", {**hashed, "images_hash": "b"}).release()  # unfinished: its rows may be re-stamped
    w = RunWriter(tmp_path / "run", hashed)
    w.append(meta[2:], {k: v[2:] for k, v in arrays.items()})
    w.close()
    changed = (f"{tmp_path / 'run'}: the images of its rows changed since it was extracted (file size or "
               "modification time); extract into another --out, or delete the folder to extract them again")
    with pytest.raises(LvlmlpError) as err:
        RunWriter(tmp_path / "run", {**hashed, "images_hash": "b"})
    assert str(err.value) == changed
    RunWriter(tmp_path / "run", hashed).release()
    RunWriter(tmp_path / "run", SETTINGS | {"data_hash": "d"}).release()  # no images hash given: not compared
    with pytest.raises(LvlmlpError) as err:
        store.check_images_unchanged(tmp_path / "run", "d", "b")
    assert str(err.value) == changed
    store.check_images_unchanged(tmp_path / "run", "d", "a")
    store.check_images_unchanged(tmp_path / "run", "other rows", "b")  # other rows: refused later, by settings
    store.check_images_unchanged(tmp_path / "nowhere", "d", "b")

    vision = np.arange(12, dtype=np.float32).reshape(3, 4)
    w = RunWriter(tmp_path / "vision", SETTINGS, shard_size=2)
    w.append(meta, {**arrays, "vision": vision})
    np.testing.assert_array_equal(w.close().vision(), vision)

    dirs = []
    for s, input_hash in enumerate(("h", "other")):
        w = RunWriter(tmp_path / f"s{s}", {**SETTINGS, "shard": f"{s}/2", "data_hash": str(s),
                                          "selection": {"input_hash": input_hash}}, shard_size=2)
        w.append(meta[s : s + 1], {k: v[s : s + 1] for k, v in arrays.items()})
        dirs.append(w.close().path)
    with pytest.raises(LvlmlpError) as err:
        merge_runs(dirs, tmp_path / "merged")
    assert str(err.value) == (f"merge: {dirs[1]} is a shard of other input rows than {dirs[0]} (a changed or another "
                              "manifest or task selection); merge the shards of one extraction")
