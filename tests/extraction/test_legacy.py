"""`import-legacy`: the paper's JSON lines into a run folder, exactly, streamed, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.legacy import import_legacy
from lvlmlp.extraction.store import open_run
from lvlmlp.probing.features import feature_matrix

V = 12


def write_legacy(path: Path, n: int = 7, seed: int = 0, tokens: int | None = None) -> list[dict]:
    """Lines shaped like the paper's run_model.py output (float32 logits written as JSON text)."""
    rng = np.random.default_rng(seed)
    rows = []
    with path.open("w") as f:
        for i in range(n):
            if tokens is None:
                logits = rng.normal(size=V).astype(np.float32) * 10
            else:
                logits = rng.normal(size=(1 + i % tokens, V)).astype(np.float32)
            row = {
                "image": f"img_{i}.jpg", "model_name": "LLaVA-7B", "question": f"q {i}?", "label": i % 2,
                "response": f"answer {i}", "output_ids": [1, 2, i], "logits": logits.tolist(),
                "scenario": f"0{i % 3}-Scenario.json",
            }
            rows.append(row)
            f.write(json.dumps(row) + "\n")
    return rows


def test_import_round_trips_labels_responses_logits_and_metadata(tmp_path: Path):
    rows = write_legacy(tmp_path / "out.jsonl")
    run = import_legacy(tmp_path / "out.jsonl", tmp_path / "run", shard_size=3)
    assert run.ids == [str(i) for i in range(1, 8)]  # no question_id: 1-based line numbers
    assert run.labels.tolist() == [r["label"] for r in rows]
    assert run.responses == [r["response"] for r in rows]
    expected = np.array([r["logits"] for r in rows], dtype=np.float32)
    assert run.logits(0).dtype == np.float32 and np.array_equal(np.asarray(run.logits(0)), expected)
    assert run.meta[4]["scenario"] == "01-Scenario.json" and run.meta[4]["output_ids"] == [1, 2, 4]
    assert run.manifest["model"] == "LLaVA-7B" and run.manifest["vocab_size"] == V
    assert run.n_tokens.tolist() == [1] * 7


def test_import_multi_token_logits_ids_and_yes_no_labels(tmp_path: Path):
    rows = write_legacy(tmp_path / "out.jsonl", n=5, tokens=3)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    with (tmp_path / "pope.jsonl").open("w") as f:
        for i, line in enumerate(lines):
            obj = json.loads(line)
            obj.update(question_id=100 + i, label="yes" if i % 2 else "no")
            f.write(json.dumps(obj) + "\n\n")  # blank lines are skipped
    run = import_legacy(tmp_path / "pope.jsonl", tmp_path / "run", max_tokens=3)
    assert run.ids == ["100", "101", "102", "103", "104"]
    assert run.labels.tolist() == [0, 1, 0, 1, 0]
    assert run.n_tokens.tolist() == [1, 2, 3, 1, 2]
    for i, row in enumerate(rows):
        for t, values in enumerate(row["logits"]):
            assert np.array_equal(run.logits(t)[i], np.asarray(values, dtype=np.float32))
    assert not run.logits(2)[0].any()  # padding past a row's last token
    assert np.array_equal(feature_matrix(run, token=2, rows=[2]), np.asarray([rows[2]["logits"][2]], np.float32))


def test_import_errors_name_the_line(tmp_path: Path):
    write_legacy(tmp_path / "a.jsonl", n=3)
    text = (tmp_path / "a.jsonl").read_text().splitlines()
    bad = json.loads(text[1])
    bad["logits"] = bad["logits"][:-1]
    (tmp_path / "b.jsonl").write_text("\n".join([text[0], json.dumps(bad), text[2]]) + "\n")
    with pytest.raises(LvlmlpError, match=r"b.jsonl:2: token 0 has 11 logits, expected 12"):
        import_legacy(tmp_path / "b.jsonl", tmp_path / "r1")
    (tmp_path / "c.jsonl").write_text(text[0] + "\n{not json\n")
    with pytest.raises(LvlmlpError, match=r"c.jsonl:2: line is not JSON"):
        import_legacy(tmp_path / "c.jsonl", tmp_path / "r2")
    with pytest.raises(LvlmlpError, match="a.jsonl:1: token 0 has 12 logits, expected 32000"):
        import_legacy(tmp_path / "a.jsonl", tmp_path / "r3", vocab_size=32000)
    no_logits = json.loads(text[0])
    del no_logits["logits"]
    (tmp_path / "d.jsonl").write_text(json.dumps(no_logits) + "\n")
    with pytest.raises(LvlmlpError, match="d.jsonl:1: no 'logits' field"):
        import_legacy(tmp_path / "d.jsonl", tmp_path / "r4")


def test_import_legacy_cli_float16_and_rerun(tmp_path: Path, capsys):
    rows = write_legacy(tmp_path / "x.jsonl", n=4)
    args = ["import-legacy", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "run"), "--dtype", "float16"]
    assert main(args) == 0
    assert main(args) == 0  # re-running a finished import is a no-op, not a duplicate
    run = open_run(tmp_path / "run")
    assert len(run) == 4 and run.logits(0).dtype == np.float16
    np.testing.assert_array_equal(run.logits(0), np.array([r["logits"] for r in rows], dtype=np.float16))
    assert main(["import-legacy", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
