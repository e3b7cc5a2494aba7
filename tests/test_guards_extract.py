"""Guards of the extractor, in-process on a tiny LLaVA: --shard parsing and row blocks, the option checks, what a
run's manifest records, recognising a finished run without its weights, last-token logits and store dtypes, the
start line and progress bar, defaults, the context check and a row lost before the store. Each test names the
breakage it catches (written against the survivors of `make mutation MODULES=extract`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp.data import images_fingerprint, rows_fingerprint
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import (
    backend_settings,
    extract,
    finished_run,
    parse_shard,
    run_settings,
    shard_rows,
)
from lvlmlp.extraction.options import ExtractOptions, flag_names


def test_parse_shard_accepts_exactly_0_le_i_lt_n():
    """Catches: an off-by-one bound (I == N, N == 0, I < 0 accepted, or I == 0 / N == 1 refused), a lenient split."""
    assert parse_shard(None) is None
    for spec, want in (("0/1", (0, 1)), ("0/4", (0, 4)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))):
        assert parse_shard(spec) == want
    for spec in ("4/4", "5/4", "-1/4", "0/0", "1/0", "0/-1"):
        with pytest.raises(LvlmlpError) as err:
            parse_shard(spec)
        assert str(err.value) == f"--shard: need 0 <= I < N, got {spec!r}"
    for spec in ("1of2", "1/2/3", "1", "", "a/b", "1.0/2"):
        with pytest.raises(LvlmlpError) as err:
            parse_shard(spec)
        assert str(err.value) == f"--shard: expected I/N such as 0/4, got {spec!r}"


def test_shard_rows_are_contiguous_blocks_that_remember_their_input_position():
    """Catches: blocks that overlap, skip or reorder rows, a wrong boundary rounding, rows not numbered by their
    input position, or the caller's rows modified."""
    rows = [{"id": f"r{i}"} for i in range(10)]
    every = shard_rows(rows)
    assert every == [{"id": f"r{i}", "_row_index": i} for i in range(10)]
    assert rows == [{"id": f"r{i}"} for i in range(10)]  # the caller's dicts are left alone
    # Boundaries len * i // n: 0, 2, 5, 7, 10 for 10 rows in 4 shards (an independent count, not the formula's code).
    blocks = [shard_rows(rows, (i, 4)) for i in range(4)]
    assert [[r["_row_index"] for r in b] for b in blocks] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [r for b in blocks for r in b] == every
    assert shard_rows(rows, (0, 1)) == every
    assert [len(shard_rows(rows[:3], (i, 5))) for i in range(5)] == [0, 1, 0, 1, 1]


def test_extract_options_refuse_each_bad_option_with_its_message():
    """Catches: a check dropped or inverted, or a message naming the wrong option or choices (by its field, or by
    the caller's name for it: the CLI's flag)."""
    ok = dict(store_dtype="float16", on_error="fail", batch_size=1, max_new_tokens=0)
    ExtractOptions(**ok).check_labels(False, "s")
    ExtractOptions(**{**ok, "store_dtype": "float32", "on_error": "skip", "max_new_tokens": 1}).check_labels(True, "s")
    with pytest.raises(LvlmlpError) as err:
        ExtractOptions(**ok).check_labels(True, "s")
    assert str(err.value) == "s: labels come from the model's answers here; give max_new_tokens K (> 0)"
    assert err.value.named(flag_names()) == "s: labels come from the model's answers here; give --max-new-tokens K (> 0)"
    cases = (
        ({"store_dtype": "int8"}, "{store_dtype}: expected one of ['float16', 'float32'], got 'int8'"),
        ({"on_error": "retry"}, "{on_error}: expected fail or skip, got 'retry'"),
        ({"batch_size": 0}, "{batch_size} must be >= 1 and {max_new_tokens} >= 0"),
        ({"max_new_tokens": -1}, "{batch_size} must be >= 1 and {max_new_tokens} >= 0"),
        ({"shard": (2, 2)}, "{shard}: need 0 <= I < N, got '2/2'"),
    )
    for change, message in cases:
        with pytest.raises(LvlmlpError) as err:
            ExtractOptions(**{**ok, **change})
        fields = ("store_dtype", "on_error", "batch_size", "max_new_tokens", "shard")
        assert str(err.value) == message.format(**{f: f for f in fields})
        assert err.value.named(flag_names()) == message.format(**{f: "--" + f.replace("_", "-") for f in fields})


def test_run_settings_record_every_extraction_option_under_its_name():
    """Catches: a manifest key renamed or dropped, the rows' hash taken with their positions, or the stored-token
    count (1 for prefill, else min(max_new_tokens, logits_tokens)) computed wrongly."""
    rows = [{"id": "a", "image": "a.png", "question": "q?"}, {"id": "b", "image": "b.png", "question": "r?", "label": 1}]
    numbered = shard_rows(rows)
    model = {"model": "m", "vocab_size": 7}
    base = dict(batch_size=4, max_new_tokens=0, logits_tokens=None, hidden=False, layers=(), store_dtype="float16",
                shard=None, labels_from_responses=False)
    assert run_settings(model, numbered, **base) == {
        "model": "m", "vocab_size": 7, "dtype": "float16", "max_new_tokens": 0, "logits_tokens": 1, "hidden": False,
        "layers": [], "data_hash": rows_fingerprint(rows), "images_hash": images_fingerprint(rows), "n_input_rows": 2,
        "shard": None, "batch_size": 4,
        "labels_from_responses": False, "selection": None,
    }
    full = run_settings(model, numbered, **{**base, "max_new_tokens": 5, "hidden": True, "layers": (np.int64(3), -1),
                                            "shard": (1, 4), "labels_from_responses": True},
                        selection={"split": "test"})
    assert (full["max_new_tokens"], full["logits_tokens"], full["hidden"], full["layers"]) == (5, 5, True, [3, -1])
    assert type(full["layers"][0]) is int and full["shard"] == "1/4" and full["selection"] == {"split": "test"}
    assert full["labels_from_responses"] is True
    kept = [run_settings(model, numbered, **{**base, "max_new_tokens": 5, "logits_tokens": k})["logits_tokens"]
            for k in (1, 2, 5, 9)]
    assert kept == [1, 2, 5, 5]


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tmp_path_factory) -> tuple[Path, list[dict]]:
    ckpt = tiny_ckpt("llava")
    root = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(3)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": str(root / f"{i}.png"), "question": f"what is {i}?"})
    return ckpt, rows


def test_backend_settings_record_the_models_identity(tiny):
    """Catches: a manifest key renamed or dropped, or a value taken from the wrong attribute."""
    ckpt, _ = tiny
    backend = Backend(ckpt, device="cpu", dtype="float32", prompt_template="Q: {question}")
    assert backend_settings(backend) == {
        "model": str(ckpt), "model_revision": backend.revision, "weights_hash": backend.weights_hash,
        "family": "llava", "compute_dtype": "float32", "vocab_size": backend.vocab_size,
        "prompt_template": backend.prompt("{question}"), "device": "cpu",
    }
    assert backend.vocab_size > 0 and len(backend.weights_hash) >= 16
    assert "Q: {question}" in backend_settings(backend)["prompt_template"]


def test_finished_run_is_recognised_without_weights_and_only_with_the_same_settings_and_rows(tiny, tmp_path):
    """Catches: a finished run not recognised by a weight-less backend (vocab size compared), or a run recognised
    after its settings, its shard or its rows changed."""
    ckpt, rows = tiny
    settings = dict(batch_size=2, max_new_tokens=0, logits_tokens=None, hidden=False, layers=(), store_dtype="float32",
                    shard=(1, 2), labels_from_responses=False)
    shard = shard_rows(rows, (1, 2))  # rows r2, r3 with _row_index 2, 3
    made = extract(Backend(ckpt, device="cpu"), shard, tmp_path / "run", progress=False, workers=0,
                   **{k: v for k, v in settings.items() if k != "labels_from_responses"})
    light = Backend(ckpt, device="cpu", load_model=False)
    found = finished_run(light, shard, tmp_path / "run", **settings)
    assert found is not None and found.path == made.path and found.ids == ["r2", "r3"]
    assert finished_run(light, shard_rows(rows, (0, 2)), tmp_path / "run", **settings) is None
    assert finished_run(light, shard, tmp_path / "run", **{**settings, "batch_size": 4}) is not None  # how, not what
    assert finished_run(light, shard, tmp_path / "run", **{**settings, "store_dtype": "float16"}) is None
    assert finished_run(light, shard, tmp_path / "run", **{**settings, "labels_from_responses": True}) is None
    changed = [dict(shard[0], question="another?"), shard[1]]
    assert finished_run(light, changed, tmp_path / "run", **settings) is None
    assert finished_run(light, shard, tmp_path / "elsewhere", **settings) is None


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict:
    """Runs of the tiny LLaVA on 4 rows, through weights whose end-of-sequence tokens are row 0's first and row 1's
    second generated token (so rows stop after 1, 2 or 3 tokens): all 3 tokens kept (float32, hidden and layers),
    only the first (float16: + each row's last token), and a prefill (hidden and layers)."""
    import shutil

    ckpt, rows = tiny
    root = tmp_path_factory.mktemp("runs")
    backend = Backend(ckpt, device="cpu")
    batch = backend.encode([Image.open(r["image"]).convert("RGB") for r in rows], [r["question"] for r in rows])
    seq = backend.generate(batch, max_new_tokens=3)["sequences"].tolist()
    eos = [seq[0][0], seq[1][1]]
    stop = root / "stop_ckpt"
    shutil.copytree(ckpt, stop)
    gen = json.loads((stop / "generation_config.json").read_text())
    (stop / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))
    stopping = Backend(stop, device="cpu")
    common = dict(batch_size=4, workers=0, progress=False)  # the reference generate's batch (same shapes)
    return {
        "expected_n": [next((t + 1 for t, tok in enumerate(row) if tok in eos), 3) for row in seq],
        "all": extract(stopping, rows, root / "all", max_new_tokens=3, store_dtype="float32", hidden=True,
                       layers=(0, -1), **common),
        "first": extract(stopping, rows, root / "first", max_new_tokens=3, logits_tokens=1, store_dtype="float16",
                         **common),
        "prefill": extract(stopping, rows, root / "prefill", store_dtype="float32", hidden=True, layers=(0, -1),
                           **common),
    }


def test_last_token_logits_dtypes_and_generation_hidden_states(runs):
    """Catches: each row's last-token logits taken at another position (or stored when every token is kept
    anyway), stored logits not in the store dtype, n_tokens / row_index in other dtypes, and hidden states or
    layers dropped or asked wrongly on the generation path (they are the prefill's: the first generated position)."""
    full, first, prefill = runs["all"], runs["first"], runs["prefill"]
    n = full.n_tokens
    assert n.tolist() == runs["expected_n"] and {1, 2, 3} <= set(n.tolist())  # rows stop after 1, 2 or 3 tokens
    assert first.has_last_logits and not full.has_last_logits and not prefill.has_last_logits
    want = np.stack([full.logits(int(k) - 1)[i] for i, k in enumerate(n)])
    np.testing.assert_allclose(first.last_logits().astype(np.float32), want, rtol=1e-2, atol=1e-2)  # float16
    np.testing.assert_allclose(first.logits(0).astype(np.float32), full.logits(0), rtol=1e-2, atol=1e-2)
    assert (first.logits(0).dtype, full.logits(0).dtype, first.last_logits().dtype) == (
        np.float16, np.float32, np.float16)
    for run in (full, first, prefill):
        assert run.n_tokens.dtype == np.int32 and run.row_index.dtype == np.int64
        assert run.row_index.tolist() == [0, 1, 2, 3]
    assert prefill.n_tokens.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(full.hidden(), prefill.hidden(), atol=1e-4)
    for layer in (0, -1):
        np.testing.assert_allclose(full.layer(layer), prefill.layer(layer), atol=1e-4)


def test_extract_logs_its_plan_shows_its_bar_and_names_skipped_rows(tiny, tmp_path, capsys, caplog):
    """Catches: the start line's fields (model, family, dtype, folder, rows, rows to do, batch, generation) or the
    skipped-rows warning changed or dropped, a bar without its name, unit or total, a bar shown with
    progress=False or hidden by default, and rows counted by batches."""
    ckpt, rows = tiny
    backend = Backend(ckpt, device="cpu", dtype="float32")
    bad = [*rows[:3], dict(rows[3], image=str(tmp_path / "missing.png"))]
    with caplog.at_level("INFO", logger="lvlmlp"):
        extract(backend, bad, tmp_path / "a", batch_size=2, workers=0, on_error="skip", max_new_tokens=2)
    bar = capsys.readouterr().err
    assert "extract: 100%" in bar and "| 4/4 [" in bar and "row/s]" in bar, bar
    with caplog.at_level("INFO", logger="lvlmlp"):
        extract(backend, rows[:3], tmp_path / "b", batch_size=3, workers=0, progress=False)
    assert capsys.readouterr().err == ""
    lines = [r.getMessage() for r in caplog.records if r.name == "lvlmlp"]
    assert f"extract: {ckpt} (llava, float32) -> {tmp_path / 'a'}: 4 rows, 4 to do, batch 2, generate 2 tokens" in lines
    assert f"extract: 1 row(s) skipped, see {tmp_path / 'a' / 'failures.jsonl'}" in lines
    assert f"extract: {ckpt} (llava, float32) -> {tmp_path / 'b'}: 3 rows, 3 to do, batch 3, prefill only" in lines


def test_extract_defaults_manifest_and_messages(tiny, tmp_path):
    """Catches: other defaults (hidden, shard size, the rows' name in messages), an option not reaching the run's
    manifest (batch size, kept tokens, hidden, store dtype, shard, selection), a shard's rows renumbered from 0,
    the label rule checked or applied without the model's answer, and on_error not reaching the row checks (which
refuse a missing image before any folder is written)."""
    ckpt, rows = tiny
    backend = Backend(ckpt, device="cpu")
    run = extract(backend, rows[:2], tmp_path / "d", workers=0, progress=False)
    assert not (tmp_path / "d" / "hidden.npy").exists() and run.manifest["shard_size"] == 256
    with pytest.raises(LvlmlpError, match=r"^rows: no rows to extract$"):
        extract(backend, [], tmp_path / "e", progress=False)
    with pytest.raises(LvlmlpError, match=r"^src: labels come from the model's answers here"):
        extract(backend, rows, tmp_path / "f", label_fn=lambda response, row: 1, source="src", progress=False)
    with pytest.raises(LvlmlpError, match=r"^src: row 'r1': image not found"):
        extract(backend, [rows[0], dict(rows[1], image="nope.png")], tmp_path / "g", source="src", progress=False)
    assert not (tmp_path / "g").exists()  # refused by the row check, before any folder is written
    skipped = extract(backend, [rows[0], dict(rows[1], image="nope.png")], tmp_path / "h", on_error="skip",
                      progress=False, workers=0)
    assert skipped.ids == ["r0"] and [f["id"] for f in skipped.failures] == ["r1"]

    shard = shard_rows(rows, (1, 2))
    label = lambda response, row: len(response) % 2 + 2 * int(row["id"] == "r3")  # noqa: E731
    run = extract(backend, shard, tmp_path / "s", batch_size=3, max_new_tokens=3, logits_tokens=2, hidden=True,
                  store_dtype="float32", shard=(1, 2), selection={"split": "test"}, label_fn=label, workers=0,
                  progress=False)
    m = run.manifest
    assert (m["batch_size"], m["max_new_tokens"], m["logits_tokens"], m["hidden"], m["dtype"], m["shard"],
            m["selection"], m["labels_from_responses"]) == (3, 3, 2, True, "float32", "1/2", {"split": "test"}, True)
    assert run.row_index.tolist() == [2, 3]
    assert [mm["label"] for mm in run.meta] == [label(mm["response"], mm) for mm in run.meta]


def test_rows_too_long_for_prompt_plus_new_tokens_are_refused(tiny, tmp_path, monkeypatch):
    """Catches: the context check made without the tokens to generate (a row whose prompt fits but whose answer
    would run past the model's positions)."""
    ckpt, rows = tiny
    backend = Backend(ckpt, device="cpu")
    batch = backend.encode([Image.open(rows[0]["image"]).convert("RGB")], [rows[0]["question"]])
    length = int(batch["attention_mask"].sum())
    monkeypatch.setattr(backend.model.config.get_text_config(), "max_position_embeddings", length + 1)
    run = extract(backend, rows[:1], tmp_path / "r", max_new_tokens=2, on_error="skip", workers=0, progress=False)
    assert run.ids == [] and run.failures[0]["error"] == (
        f"row 'r0': the prompt is {length} tokens long + 2 to generate, more than the model's maximum of "
        f"{length + 1} (shorten the question)")


def test_a_row_lost_between_the_model_and_the_store_fails_the_run(tiny, tmp_path, monkeypatch):
    """Catches: the run closed without checking that every input row was committed exactly once (a row lost by a
    bug between the model and the store would otherwise leave a complete-looking run one row short)."""
    import lvlmlp.extraction.extract as extract_module

    ckpt, rows = tiny
    run_batch = extract_module.run_batch

    def drop_last(*args, **kwargs):
        meta, arrays = run_batch(*args, **kwargs)
        return meta[:-1], {name: a[:-1] for name, a in arrays.items()}

    monkeypatch.setattr(extract_module, "run_batch", drop_last)
    with pytest.raises(LvlmlpError, match=r"missing"):
        extract(Backend(ckpt, device="cpu"), rows[:2], tmp_path / "lost", workers=0, progress=False)
    manifest = tmp_path / "lost" / "manifest.json"
    assert not manifest.is_file() or not json.loads(manifest.read_text()).get("complete")
