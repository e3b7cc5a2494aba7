"""Guards of the metrics (probing/metrics.py) written against its surviving mutants (docs/mutation-report.md): each
metric against an independent computation at its documented defaults, at the edges (a score equal to the threshold,
one row, no positives, a class missing from a fold) and its error messages."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from lvlmlp.errors import LvlmlpError
from lvlmlp.probing.metrics import (
    attack_success_rate,
    auprc,
    binary_metrics,
    binary_report,
    bootstrap_ci,
    cross_val_folds,
    cross_val_scores,
    fold_metrics,
    pope_metrics,
    top1_accuracy,
)
from lvlmlp.probing.probes import LDAProbe, LogisticProbe


def _scores(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1)


def _percentile_ci(values: list[float]) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _accuracy_ci_by_hand(y: np.ndarray, s: np.ndarray, threshold: float, n_boot: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        values.append(np.mean((s[idx] >= threshold).astype(int) == y[idx]))
    return _percentile_ci(values)


def test_binary_metrics_default_threshold_ties_edges_and_messages():
    """Catches: another default threshold, `>` instead of `>=` (a score equal to the threshold is label 1), F1 of
    no positives 1.0 or warned about, the threshold key renamed, one row refused, the messages lost."""
    y, s = _scores()
    got = binary_metrics(y, s)
    assert got["accuracy"] == accuracy_score(y, s >= 0.5) and got["threshold"] == 0.5
    tie = binary_metrics([1, 0, 1], [0.3, 0.2, 0.25], threshold=0.3)
    assert tie["accuracy"] == pytest.approx(2 / 3) and tie["f1"] == pytest.approx(f1_score([1, 0, 1], [1, 0, 0]))
    assert tie["threshold"] == 0.3 and tie["n"] == 3 and tie["n_positive"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no positive labels and none predicted: F1 is 0, without a warning
        none = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert none["f1"] == 0.0 and none["auroc"] is None and none["auprc"] is None and none["accuracy"] == 1.0
    one = binary_metrics([1], [0.9])
    assert one["accuracy"] == 1.0 and one["n"] == 1
    with pytest.raises(LvlmlpError, match="^no labelled rows to evaluate$"):
        binary_metrics([], [])
    with pytest.raises(LvlmlpError, match=re.escape("labels (2, 2) and scores (2, 2) must be 1-D")):
        binary_metrics([[0, 1], [1, 0]], [[0.1, 0.9], [0.8, 0.2]])
    assert auprc([0, 0], [0.2, 0.7]) is None
    with pytest.raises(LvlmlpError, match=re.escape("binary metrics need labels 0/1, got [0, 2]")):
        binary_metrics([0, 2, 2], [0.1, 0.2, 0.3])
    with pytest.raises(LvlmlpError, match=re.escape("got [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]") + "$"):  # the first ten
        binary_metrics(np.arange(12), np.zeros(12))


def test_attack_success_rate_without_unsafe_rows_and_its_message():
    """Catches: an average over no scenarios (NaN instead of None), the length message lost."""
    assert attack_success_rate([1, 1], [0.9, 0.1], ["a", "b"]) == {"per_scenario": {}, "n_unsafe": {},
                                                                   "average": None}
    with pytest.raises(LvlmlpError, match="^3 scenarios for 2 rows$"):
        attack_success_rate([0, 1], [0.9, 0.1], ["a", "b", "c"])


def _pope_by_hand(y: list[int], pred: list[int]) -> dict:
    tp = sum(p == 1 and t == 1 for t, p in zip(y, pred))
    fp = sum(p == 1 and t == 0 for t, p in zip(y, pred))
    fn = sum(p == 0 and t == 1 for t, p in zip(y, pred))
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n": len(y)}


@pytest.mark.parametrize("y, pred", [
    ([1, 0, 1, 0], [1, 1, 0, 0]),   # tp == fp == fn == 1: precision = recall = 1/2
    ([0, 0, 1], [0, 0, 0]),         # nothing predicted "yes": precision 0
    ([0, 0, 0], [0, 1, 0]),         # no "yes" labels: recall 0, F1 0
    ([0, 0], [0, 0]),               # no "yes" at all
    ([1], [1]),                     # one row
])
def test_pope_metrics_at_the_zero_division_edges(y, pred):
    """Catches: `tp - fp` / `tp - fn` as the zero test, 1.0 instead of 0.0 for an undefined precision, recall or
    F1, the `n` key renamed, one row refused."""
    got = pope_metrics(y, pred)
    for key, value in _pope_by_hand(y, pred).items():
        assert got[key] == pytest.approx(value), key


def test_pope_and_top1_messages_and_one_row():
    """Catches: one row refused, the messages lost or changed."""
    with pytest.raises(LvlmlpError, match="^no rows for POPE metrics$"):
        pope_metrics([], [])
    assert top1_accuracy([3], [3]) == 1.0 and top1_accuracy(np.array([2, 1]), np.array([2, 0])) == 0.5
    with pytest.raises(LvlmlpError, match="^no labelled rows to evaluate$"):
        top1_accuracy([], [])


def test_bootstrap_defaults_one_row_and_unknown_metric():
    """Catches: another default number of resamples or seed, one row giving None, the unknown-metric message."""
    y, s = _scores(30, seed=2)
    assert bootstrap_ci(y, s, "accuracy") == pytest.approx(_accuracy_ci_by_hand(y, s, 0.5, 1000, 0), abs=1e-12)
    # AUROC (the default metric) is continuous enough to tell 1000 resamples with seed 0 from any other; its
    # resampling is checked against roc_auc_score in test_metrics.
    assert bootstrap_ci(y, s) == bootstrap_ci(y, s, "auroc", n_boot=1000, seed=0)
    assert bootstrap_ci(y, s) not in (bootstrap_ci(y, s, n_boot=1001), bootstrap_ci(y, s, seed=1))
    assert bootstrap_ci([1], [0.9], "accuracy") == (1.0, 1.0)
    assert bootstrap_ci([], [], "accuracy") is None
    with pytest.raises(LvlmlpError, match=re.escape("bootstrap: unknown metric 'f1' (choose from auroc, auprc, "
                                                    "accuracy)")):
        bootstrap_ci(y, s, "f1")


def test_binary_report_passes_its_threshold_resamples_and_seed_on():
    """Catches: defaults changed, the threshold, metric name, resamples or seed not passed to `bootstrap_ci` and
    `binary_metrics`, an undefined AUROC interval not None."""
    y, s = _scores(30, seed=4)
    default = binary_report(y, s)
    assert default["accuracy"] == accuracy_score(y, s >= 0.5)
    assert default["accuracy_ci"] == pytest.approx(_accuracy_ci_by_hand(y, s, 0.5, 1000, 0), abs=1e-12)
    assert default["auroc_ci"] == list(bootstrap_ci(y, s, "auroc", n_boot=1000, seed=0))
    got = binary_report(y, s, threshold=0.35, n_boot=200, seed=7)
    assert got["accuracy"] == accuracy_score(y, s >= 0.35) and got["threshold"] == 0.35
    assert got["accuracy_ci"] == pytest.approx(_accuracy_ci_by_hand(y, s, 0.35, 200, 7), abs=1e-12)
    assert got["auroc_ci"] == list(bootstrap_ci(y, s, "auroc", n_boot=200, seed=7))
    single = binary_report([1, 1, 1], [0.2, 0.6, 0.9], n_boot=20)
    assert single["auroc_ci"] is None and single["accuracy_ci"] is not None


def _data(n_per_class: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n_per_class)])
    rng.shuffle(y)
    X = (rng.normal(size=(y.size, 4)) + y[:, None]).astype(np.float32)
    return X, y


def test_cross_val_defaults_are_unshuffled_stratified_10_fold():
    """The original's `cross_validate(model, X, y, cv=10)`. Catches: another default number of folds, shuffling
    by default, a random_state passed without shuffling, folds numbered as floats."""
    X, y = _data((10, 12))
    oof, fold_of = cross_val_folds(LogisticProbe, X, y)
    expected, expected_fold = np.zeros(y.size), np.zeros(y.size, dtype=np.int64)
    for fold, (train, test) in enumerate(StratifiedKFold(10).split(X, y)):
        expected[test] = LogisticRegression().fit(X[train], y[train]).predict_proba(X[test])[:, 1]
        expected_fold[test] = fold
    np.testing.assert_allclose(oof, expected, atol=1e-6)
    np.testing.assert_array_equal(fold_of, expected_fold)
    assert fold_of.dtype.kind == "i"
    np.testing.assert_allclose(cross_val_scores(LogisticProbe, X, y), expected, atol=1e-6)
    # shuffle=True without a seed shuffles with seed 0
    shuffled = [test for _, test in StratifiedKFold(5, shuffle=True, random_state=0).split(X, y)]
    _, fold_of = cross_val_folds(LDAProbe, X, y, n_splits=5, shuffle=True)
    assert all((fold_of[test] == fold).all() for fold, test in enumerate(shuffled))
    lda = [LDAProbe().fit(X[np.setdiff1d(np.arange(y.size), test)], y[np.setdiff1d(np.arange(y.size), test)])
           for test in shuffled]
    expected = np.zeros(y.size)
    for probe, test in zip(lda, shuffled):
        expected[test] = probe.predict_proba(X[test])[:, 1]
    np.testing.assert_allclose(cross_val_scores(LDAProbe, X, y, n_splits=5, shuffle=True), expected, atol=1e-6)


def test_cross_val_multiclass_columns_and_class_count_message():
    """Catches: only column 1 returned for 3 classes, class counts miscounted in the check or its message,
    exactly n_splits rows per class refused."""
    X, y = _data((6, 5, 7), seed=1)
    oof, _ = cross_val_folds(LDAProbe, X, y, n_splits=5)
    assert oof.shape == (18, 3)
    np.testing.assert_allclose(oof.sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(LvlmlpError, match=re.escape("6-fold cross-validation needs 2+ classes with at least 6 rows "
                                                    "each (class counts {0: 6, 1: 5, 2: 7})")):
        cross_val_folds(LogisticProbe, X, y, n_splits=6)


def test_fold_metrics_equal_per_fold_sklearn_and_skip_undefined_aurocs():
    """The original's per-fold `roc_auc`, `accuracy`, `f1` (prediction: score > threshold) and their means.
    Catches: `>=` instead of `>`, another default threshold, a fold's metric computed on other rows, a fold with
    one class not skipped from the AUROC mean, the fold count."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 30)
    s = np.round(rng.random(30), 1)  # many scores equal to the threshold 0.5
    fold_of = np.repeat([2, 0, 1], 10)
    y[fold_of == 1] = 1  # fold 1 has one class: its AUROC is undefined
    got = fold_metrics(y, s, fold_of)
    per: dict[str, list] = {"auroc": [], "accuracy": [], "f1": []}
    for fold in (0, 1, 2):
        m = fold_of == fold
        pred = (s[m] > 0.5).astype(int)
        per["auroc"].append(roc_auc_score(y[m], s[m]) if fold != 1 else None)
        per["accuracy"].append(accuracy_score(y[m], pred))
        per["f1"].append(f1_score(y[m], pred, zero_division=0.0))
    assert got["n_folds"] == 3 and set(got) == {"mean_of_folds", "per_fold", "n_folds", "threshold"}
    assert got["threshold"] == 0.5  # recorded: the report says which threshold the folds used
    for key, values in per.items():
        assert got["per_fold"][key] == pytest.approx(values), key
        assert got["mean_of_folds"][key] == pytest.approx(np.mean([v for v in values if v is not None])), key
    at = fold_metrics(y, s, fold_of, threshold=0.25)
    assert at["threshold"] == 0.25
    assert at["per_fold"]["accuracy"][0] == pytest.approx(accuracy_score(y[fold_of == 0], s[fold_of == 0] > 0.25))
    one_class = fold_metrics([1, 1, 1, 1], [0.2, 0.6, 0.7, 0.9], [0, 0, 1, 1])
    assert one_class["mean_of_folds"]["auroc"] is None and one_class["per_fold"]["auroc"] == [None, None]
    assert one_class["mean_of_folds"]["accuracy"] == 0.75
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fold without positives, none predicted: F1 0, without a warning
        no_positive = fold_metrics([0, 0, 1, 0], [0.2, 0.4, 0.7, 0.1], [0, 0, 1, 1])
    assert no_positive["per_fold"]["f1"] == [0.0, 1.0]
