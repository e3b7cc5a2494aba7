"""Run folder: atomic shards, consolidation into memory-mapped arrays, resume, refusal, merge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lvlmlp import LvlmlpError, open_run
from lvlmlp.extraction.store import RunWriter, merge_runs

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
