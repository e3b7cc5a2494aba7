"""Uncertainty-estimator baselines (maximum sequence probability, mean token entropy, perplexity) from the stored
tokens, each against a direct numpy computation on rows of varying length, and through `probe eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.probing.baselines import baseline_scores, check_baseline_name, describe_baseline
from tests.probing.test_probes import make_run

N_TOKENS = [4, 1, 3, 0, 2, 4, 4, 1]


def direct(logits: np.ndarray, n_tokens: list[int]) -> dict[str, list[float]]:
    """Each estimator written out per row with numpy, over the row's generated tokens (greedy: the token taken is
    the most probable, so p(token) is the step's largest probability)."""
    out: dict[str, list[float]] = {"seq-prob": [], "mean-entropy": [], "perplexity": []}
    for row, n in zip(logits, n_tokens):
        if n == 0:
            continue
        z = row[:n].astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        log_top = np.log(p.max(axis=1))
        out["seq-prob"].append(float(np.log(np.prod(p.max(axis=1)))))
        out["perplexity"].append(-float(np.log(np.exp(-log_top.mean()))))  # minus log(perplexity)
        out["mean-entropy"].append(-float(np.mean(-np.sum(p * np.log(p), axis=1))))
    return out


@pytest.mark.parametrize("name", ["seq-prob", "mean-entropy", "perplexity"])
def test_sequence_estimators_equal_a_direct_numpy_computation(tmp_path: Path, name):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(8, 4, 7)) * 3).astype(np.float32)
    meta = [{"id": f"r{i}"} for i in range(8)]
    run = make_run(tmp_path / "run", logits, meta, n_tokens=N_TOKENS)
    rows = [i for i, n in enumerate(N_TOKENS) if n > 0]
    expected = direct(logits, N_TOKENS)[name]
    np.testing.assert_allclose(baseline_scores(run, name, rows), expected, rtol=1e-9, atol=1e-12)
    shuffled = [6, 0, 4, 1]  # rows in any order
    np.testing.assert_allclose(baseline_scores(run, name, shuffled), [expected[rows.index(i)] for i in shuffled],
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(LvlmlpError, match=f"row 'r3' generated no token: the {name} baseline needs at least one"):
        baseline_scores(run, name, [2, 3])
    check_baseline_name(name)
    assert "first K stored tokens" in describe_baseline(name)


def test_sequence_estimators_through_probe_eval(tmp_path: Path):
    rng = np.random.default_rng(1)
    n, k, v = 100, 3, 8
    y = np.arange(n) % 2
    n_tokens = rng.integers(1, k + 1, n)
    logits = rng.normal(size=(n, k, v)).astype(np.float32)
    logits[:, :, 0] += 2.5 * y[:, None]  # confident answers are the label-1 rows
    meta = [{"id": f"r{i}", "label": int(y[i]), "split": "train" if i < 60 else "test"} for i in range(n)]
    run = make_run(tmp_path / "run", logits, meta, n_tokens=n_tokens)
    assert main(["probe", "train", "--run", str(run.path), "--split", "train", "--out", str(tmp_path / "p")]) == 0
    names = ["seq-prob", "mean-entropy", "perplexity"]
    flags = [arg for name in names for arg in ("--baseline", name)]
    assert main(["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(run.path), "--split", "test",
                 "--n-boot", "10", *flags, "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    recs = [json.loads(line) for line in (tmp_path / "e" / "scores.jsonl").read_text().splitlines()]
    expected = direct(logits[60:], n_tokens[60:].tolist())
    for name in names:
        got = [r["baselines"][name] for r in recs]
        np.testing.assert_allclose(got, expected[name], rtol=1e-9)
        assert metrics["baselines"][name]["auroc"] == roc_auc_score(y[60:], got)
        assert set(metrics["baselines"][name]) == {"auroc", "auprc", "auroc_ci", "n"}
