"""Guards of the extractor's small parts, in-process: --shard parsing and row blocks, recognising a finished run
without loading the weights, the option checks and what a run's manifest records of the model. Each test names
the breakage it catches (written against the survivors of `make mutation MODULES=extract`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import (
    backend_settings,
    check_options,
    extract,
    finished_run,
    parse_shard,
    shard_rows,
)


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


def test_check_options_refuses_each_bad_option_with_its_message():
    """Catches: a check dropped or inverted, or a message naming the wrong flag or choices."""
    ok = dict(store_dtype="float16", on_error="fail", batch_size=1, max_new_tokens=0, label_fn=None, source="s")
    check_options(**ok)
    check_options(**{**ok, "store_dtype": "float32", "on_error": "skip", "label_fn": len, "max_new_tokens": 1})
    cases = (
        ({"label_fn": len}, "s: labels come from the model's answers here; give --max-new-tokens K (> 0)"),
        ({"store_dtype": "int8"}, "--store-dtype: expected one of ['float16', 'float32'], got 'int8'"),
        ({"on_error": "retry"}, "--on-error: expected fail or skip, got 'retry'"),
        ({"batch_size": 0}, "--batch-size must be >= 1 and --max-new-tokens >= 0"),
        ({"max_new_tokens": -1}, "--batch-size must be >= 1 and --max-new-tokens >= 0"),
    )
    for change, message in cases:
        with pytest.raises(LvlmlpError) as err:
            check_options(**{**ok, **change})
        assert str(err.value) == message


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
