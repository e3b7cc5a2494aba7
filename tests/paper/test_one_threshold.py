"""Issue 26 item 5: one threshold. The probe's own (probe.json, set by the config's `probe: {threshold: T}`) is the
one the evaluation, the cross-validation folds and probe-guided decoding use, and the report says so; each figure
is recomputed here from the saved scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold

from lvlmlp.cli import main
from lvlmlp.probing.probes import load_probe
from lvlmlp.testing import tiny_manifest

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ci_tiny.yaml"
T = 0.3


def scores_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]


def test_a_config_threshold_reaches_evaluation_folds_and_steering(tiny_ckpt, tmp_path):
    manifest = tiny_manifest(tmp_path / "data")
    out = tmp_path / "out"
    # A strongly regularised probe keeps its scores near 0.5, so that 0.3 and 0.5 cut differently (checked below).
    argv = ["run", str(CONFIG), "--model", str(tiny_ckpt("llava")), "--out", str(out), "--no-progress",
            "--set", f"data_root={manifest}", "--set", "prompt=[oe]", "--set", f"probe={{kind: logistic, C: 1.0e-4, "
            f"threshold: {T}}}", "--set", "analyses={token_decay: false, layer_sweep: false}",
            "--set", "steering={template: 'Sorry.'}"]
    assert main(argv) == 0
    assert load_probe(out / "probes" / "oe").threshold == T
    metrics = json.loads((out / "evals" / "oe" / "metrics.json").read_text())
    records = scores_of(out / "evals" / "oe")
    y = np.array([r["label"] for r in records])
    s = np.array([r["score"] for r in records])
    assert ((s >= T) != (s >= 0.5)).any()  # the threshold matters on these rows
    assert metrics["probe"]["threshold"] == metrics["threshold"] == T
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, s >= T), abs=1e-12)
    assert metrics["f1"] == pytest.approx(f1_score(y, s >= T), abs=1e-12)
    # steering: the saved probe's threshold flags the rows
    steer = json.loads((out / "analyses" / "steering-oe.json").read_text())
    rows = [json.loads(line) for line in (out / "analyses" / "steering-oe.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r["score"] for r in records}
    assert steer["threshold"] == T
    assert [r["flagged"] for r in rows] == [by_id[r["id"]] < T for r in rows]
    assert steer["flagged"] == sum(by_id[r["id"]] < T for r in rows) != sum(by_id[r["id"]] < 0.5 for r in rows)
    report = (out / "report" / "report.md").read_text()
    assert f"Accuracy and F1 of the probe at threshold {T:g}, of the baselines at 0.5." in report
    assert f"(score < {T})" in report

    # `probe eval`: the probe's threshold, unless --threshold sets another
    for flags, t in (([], T), (["--threshold", "0.4"], 0.4)):
        ev = tmp_path / f"eval{t}"
        assert main(["probe", "eval", "--probe", str(out / "probes" / "oe"), "--run", str(out / "runs" / "oe-test"),
                     "--n-boot", "0", *flags, "--out", str(ev)]) == 0
        m = json.loads((ev / "metrics.json").read_text())
        assert m["probe"]["threshold"] == m["threshold"] == t
        assert m["accuracy"] == pytest.approx(accuracy_score(y, s >= t), abs=1e-12)

    # k-fold: each fold's accuracy and F1 at the same threshold (the fold predicts 1 above it, as sklearn's predict)
    cv_out = tmp_path / "cv"
    shutil.copytree(out, cv_out)
    assert main([*argv, "--out", str(cv_out), "--set", "splits={cv: 4, split: test}", "--set", "steering=null"]) == 0
    metrics = json.loads((cv_out / "evals" / "oe" / "metrics.json").read_text())
    records = scores_of(cv_out / "evals" / "oe")
    y = np.array([r["label"] for r in records])
    s = np.array([r["score"] for r in records])
    assert metrics["cv"]["threshold"] == T
    folds = list(StratifiedKFold(4).split(np.zeros(len(y)), y))
    assert metrics["cv"]["per_fold"]["accuracy"] == pytest.approx([accuracy_score(y[f], s[f] > T) for _, f in folds])
    assert metrics["cv"]["per_fold"]["f1"] == pytest.approx([f1_score(y[f], s[f] > T, zero_division=0.0)
                                                            for _, f in folds])
    assert "Accuracy and F1 of the probe (pooled and per fold) at threshold 0.3" in (cv_out / "report" /
                                                                                    "report.md").read_text()
