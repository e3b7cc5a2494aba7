"""Labels a binary probe cannot mean, probe folders as one unit, damaged result JSON (issue 27 items 3, 4, 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lvlmlp.cli import main
from lvlmlp.extraction.store import RunWriter


def write_run(folder: Path, labels: list[int], v: int = 6, weights: str = "w1", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    n = len(labels)
    settings = {"model": "m", "dtype": "float32", "vocab_size": v, "max_new_tokens": 0, "data_hash": "h",
                "n_input_rows": n, "weights_hash": weights}
    w = RunWriter(folder, settings, shard_size=8)
    logits = rng.normal(size=(n, 1, v)).astype(np.float32)
    logits[:, 0, 0] += np.asarray(labels, dtype=np.float32)
    w.append([{"id": f"r{i}", "question": "q", "label": int(lab)} for i, lab in enumerate(labels)],
             {"logits": logits, "n_tokens": np.ones(n, dtype=np.int32), "row_index": np.arange(n, dtype=np.int64)})
    return w.close().path


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("lvlmlp: error: "), err
    return code, err.removeprefix("lvlmlp: error: ").rstrip("\n")


@pytest.mark.parametrize("labels", [[-1, 1], [1, 2], [0, 10**20]])
def test_binary_training_refuses_labels_other_than_0_and_1(tmp_path, capsys, labels):
    """Catches: probe train writing a probe of labels {-1, 1} / {1, 2} / {0, 1e20} that probe eval then refuses."""
    run = write_run(tmp_path / "run", labels * 6)
    code, err = cli(capsys, "probe", "train", "--run", run, "--out", tmp_path / "p")
    shown = ", ".join(f"{float(c):g}" for c in labels)
    assert code == 2 and err == (f"{run}: a binary probe needs labels 0 and 1, the rows have {shown}; relabel them "
                                 "0/1 (1: the class to score)")
    assert not (tmp_path / "p").exists()


def test_binary_probe_refuses_rows_whose_labels_it_cannot_score(tmp_path, capsys):
    """Catches: probe eval of a binary probe on labels {0, 1, 2} counting 2 as 0, silently."""
    assert cli(capsys, "probe", "train", "--run", write_run(tmp_path / "a", [0, 1] * 6), "--out", tmp_path / "p")[0] == 0
    other = write_run(tmp_path / "b", [0, 1, 2, 0, 1, 2])
    code, err = cli(capsys, "probe", "eval", "--probe", tmp_path / "p", "--run", other, "--out", tmp_path / "e")
    assert code == 2 and err == (f"{other}: row 'r2' has label 2, which the probe cannot score (its classes: 0, 1; "
                                 "2 such row(s))")


def test_a_probe_json_beside_another_probes_weights_is_refused(tmp_path, capsys):
    """Catches: probe.json of one probe used with the probe.safetensors of another of the same width."""
    run = write_run(tmp_path / "run", [0, 1] * 6)
    for name, c in (("p1", "1"), ("p2", "0.01")):
        assert cli(capsys, "probe", "train", "--run", run, "--out", tmp_path / name, "--C", c)[0] == 0
    shutil.copy(tmp_path / "p2" / "probe.safetensors", tmp_path / "p1" / "probe.safetensors")
    code, err = cli(capsys, "probe", "eval", "--probe", tmp_path / "p1", "--run", run, "--out", tmp_path / "e")
    assert code == 2 and err == (f"{tmp_path / 'p1' / 'probe.safetensors'}: not the weights probe.json was saved "
                                 "with (sha256 differs): the folder mixes two probes; train the probe again")


def test_two_thresholds_that_disagree_are_refused(tmp_path, capsys):
    """Catches: a top-level threshold 0.9 silently ignored for params.threshold 0.5."""
    run = write_run(tmp_path / "run", [0, 1] * 6)
    assert cli(capsys, "probe", "train", "--run", run, "--out", tmp_path / "p")[0] == 0
    path = tmp_path / "p" / "probe.json"
    doc = json.loads(path.read_text())
    doc["threshold"] = 0.9
    path.write_text(json.dumps(doc))
    code, err = cli(capsys, "probe", "eval", "--probe", tmp_path / "p", "--run", run, "--out", tmp_path / "e")
    assert code == 2 and err == (f"{path}: 'threshold' 0.9 and 'params.threshold' 0.5 disagree (params.threshold is "
                                 "the one used): make them equal")


def test_a_probe_of_replaced_model_weights_is_refused(tmp_path, capsys):
    """Catches: a probe trained on a model folder whose weights were later replaced scoring the new runs."""
    assert cli(capsys, "probe", "train", "--run", write_run(tmp_path / "a", [0, 1] * 6, weights="aaaa" * 16),
               "--out", tmp_path / "p")[0] == 0
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["fit_info"]["weights_hash"] == "aaaa" * 16
    new = write_run(tmp_path / "b", [0, 1] * 6, weights="bbbb" * 16)
    code, err = cli(capsys, "probe", "eval", "--probe", tmp_path / "p", "--run", new, "--out", tmp_path / "e")
    assert code == 2 and err == (f"{tmp_path / 'p'}: trained on features of other model weights (weights hash "
                                 f"aaaaaaaaaaaa) than {new} (bbbbbbbbbbbb): the model folder changed; extract and "
                                 "train again")


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "invalid JSON ("),
    (lambda text: "[1, 2]", "expected a JSON object, got list"),
    (lambda text: json.dumps({**json.loads(text), "auroc": "high"}), "'auroc' must be a number or null, got 'high'"),
])
def test_report_on_a_damaged_metrics_json_is_one_line_naming_the_file(tmp_path, capsys, damage, message):
    """Catches: JSONDecodeError / AttributeError / format-code tracebacks of `report` (issue 27 item 6)."""
    run = write_run(tmp_path / "run", [0, 1] * 6)
    assert cli(capsys, "probe", "train", "--run", run, "--out", tmp_path / "p")[0] == 0
    assert cli(capsys, "probe", "eval", "--probe", tmp_path / "p", "--run", run, "--out", tmp_path / "e",
               "--n-boot", "10")[0] == 0
    path = tmp_path / "e" / "metrics.json"
    path.write_text(damage(path.read_text()))
    code, err = cli(capsys, "report", tmp_path / "e", "--out", tmp_path / "rep")
    assert code == 2 and err.startswith(f"{path}: {message}"), err
    assert not (tmp_path / "rep").exists()
