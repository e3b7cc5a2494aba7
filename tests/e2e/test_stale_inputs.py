"""Inputs that change under a finished run, shards of different inputs, a per-group field that is missing, row
metadata too large for a shard header, a probe applied to another task's run (issue 27 items 5 and 7, issue 25)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp.cli import main
from lvlmlp.data import ROW_META_LIMIT
from lvlmlp.extraction import store
from lvlmlp.extraction.store import RunWriter, open_run
from tests.test_outputs import manifest


def extract(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [str(a) for a in ("extract", "--model", ckpt, "--data", data, "--out", out, "--device", "cpu", "--dtype",
                             "float32", "--workers", "0", "--no-progress", *extra)]


def one_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lvlmlp: error: "), err
    return err.removeprefix("lvlmlp: error: ").rstrip("\n")


def test_an_image_replaced_under_a_finished_run_is_noticed(tiny_ckpt, tmp_path, capsys):
    """Catches: a finished run whose images were replaced in place reported "finished already", old logits used."""
    data = manifest(tmp_path / "d")
    argv = extract(tiny_ckpt("llava"), data, tmp_path / "run")
    assert main(argv) == 0
    before = (tmp_path / "run" / "logits.npy").read_bytes()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(tmp_path / "d" / "img" / "2.png")  # same path, another image
    capsys.readouterr()
    assert main(argv) == 2
    assert one_line(capsys) == (f"{tmp_path / 'run'}: the images of its rows changed since it was extracted (file "
                                "size or modification time); extract into another --out, or delete the folder to "
                                "extract them again")
    assert (tmp_path / "run" / "logits.npy").read_bytes() == before


def test_merge_refuses_shards_cut_from_different_manifests(tiny_ckpt, tmp_path, capsys):
    """Catches: shard 0/2 of one manifest and shard 1/2 of another merged into one 'complete' run."""
    one, other = manifest(tmp_path / "a"), manifest(tmp_path / "b", question="what colour is")
    assert main(extract(tiny_ckpt("llava"), one, tmp_path / "s0", "--shard", "0/2")) == 0
    assert main(extract(tiny_ckpt("llava"), other, tmp_path / "s1", "--shard", "1/2")) == 0
    assert main(extract(tiny_ckpt("llava"), one, tmp_path / "t1", "--shard", "1/2")) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")]) == 2
    assert one_line(capsys) == (f"merge: {tmp_path / 's1'} is a shard of other input rows than {tmp_path / 's0'} (a "
                                "changed or another manifest or task selection); merge the shards of one extraction")
    assert not (tmp_path / "m").exists()
    assert main(["merge", str(tmp_path / "s0"), str(tmp_path / "t1"), "--out", str(tmp_path / "m")]) == 0
    assert open_run(tmp_path / "m").ids == ["r0", "r1", "r2", "r3"]


def write_run(folder: Path, meta_extra: dict | None = None, task: str | None = None, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    settings = {"model": "m", "dtype": "float32", "vocab_size": 6, "max_new_tokens": 0, "data_hash": "h",
                "n_input_rows": n, "selection": {"task": task}}
    w = RunWriter(folder, settings, shard_size=8)
    labels = np.arange(n) % 2
    logits = rng.normal(size=(n, 1, 6)).astype(np.float32)
    logits[:, 0, 0] += labels
    w.append([{"id": f"r{i}", "question": "q", "label": int(labels[i]), **(meta_extra or {})} for i in range(n)],
             {"logits": logits, "n_tokens": np.ones(n, dtype=np.int32), "row_index": np.arange(n, dtype=np.int64)})
    return w.close().path


def test_a_per_group_metric_whose_field_is_missing_is_an_error_naming_it(tmp_path, capsys):
    """Catches: probe eval --task mmsafety on rows without 'scenario' giving no per-scenario metrics, no word."""
    run = write_run(tmp_path / "run")
    assert main(["probe", "train", "--run", str(run), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(run), "--task", "mmsafety",
                 "--out", str(tmp_path / "e"), "--n-boot", "10"]) == 2
    assert one_line(capsys) == ("per-group metric attack-success-rate needs the field 'scenario' on every row, but 12 "
                                "of 12 rows have none (e.g. row 'r0'); extract the rows with that field or leave the "
                                "grouping out")
    assert not (tmp_path / "e").exists()


def test_row_metadata_over_the_limit_is_refused_before_the_model_loads(tmp_path, capsys):
    """Catches: safetensors' 'header too large' traceback for rows carrying MBs of metadata."""
    data = manifest(tmp_path / "d", n=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["notes"] = "x" * ROW_META_LIMIT
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(extract(tmp_path / "no-model", data, tmp_path / "run")) == 2
    line = one_line(capsys)
    assert line.startswith(f"{data}: row 'r1' carries ") and line.endswith(
        f" bytes of metadata, over the limit of {ROW_META_LIMIT:,} per row; keep large fields out of the manifest "
        "(a path to a file)"), line


def test_rows_whose_metadata_outgrows_one_header_are_committed_as_several_shards(tmp_path, monkeypatch):
    """Catches: 400 KB x 260 rows (104 MB in one shard header) failing; here the budget is made small instead."""
    assert store.HEADER_BUDGET < 100_000_000  # safetensors' own limit on a header
    monkeypatch.setattr(store, "HEADER_BUDGET", 2_000)
    run = write_run(tmp_path / "run", meta_extra={"notes": "y" * 600}, n=12)
    assert len(list((run / "shards").glob("*"))) == 0  # consolidated; the shards it went through are gone
    reopened = open_run(run)
    assert reopened.ids == [f"r{i}" for i in range(12)] and all(m["notes"] == "y" * 600 for m in reopened.meta)
    w = RunWriter(tmp_path / "open", {"model": "m", "vocab_size": 6}, shard_size=12)
    w.append([{"id": f"r{i}", "notes": "y" * 600} for i in range(12)],
             {"logits": np.zeros((12, 1, 6), np.float32), "n_tokens": np.ones(12, np.int32),
              "row_index": np.arange(12)})
    w._flush()
    assert len(list((tmp_path / "open" / "shards").glob("*.safetensors"))) == 4  # 3 rows of ~620 bytes each
    w.release()


def test_a_probe_applied_to_another_tasks_run_warns(tmp_path, capsys, caplog):
    """Catches: a probe trained on one task's run scoring another task's run of the same model silently."""
    assert main(["probe", "train", "--run", str(write_run(tmp_path / "a", task="pope")),
                 "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["fit_info"]["task"] == "pope"
    other = write_run(tmp_path / "b", task="vizwiz")
    with caplog.at_level(logging.WARNING):
        assert main(["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(other), "--out",
                     str(tmp_path / "e"), "--n-boot", "10"]) == 0
    assert f"{tmp_path / 'p'} was trained on task pope but {other} holds rows of task vizwiz" in caplog.text
