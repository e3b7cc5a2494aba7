"""Paired comparison of two evaluations of the same rows: which signal flags the rows better, and is it chance?

`lvlmlp probe compare EVAL_A EVAL_B` reads two `probe eval` folders (scores.jsonl + metrics.json), checks that they
scored the same rows with the same labels, and reports the AUROC of each, their difference (A minus B) with a
paired bootstrap interval (both scores resampled on the same rows, seeded), and DeLong's test for two correlated
AUROCs (DeLong, DeLong & Clarke-Pearson 1988, computed from midranks as in Sun & Xu 2014).

The two AUROCs are measured on the same rows, so their errors are correlated: comparing two separate 95% intervals
would be too conservative, which is why both the interval and the test here are paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from lvlmlp.defaults import N_BOOT
from lvlmlp.errors import LvlmlpError
from lvlmlp.probing.metrics import binary_arrays, resampled_auroc


@dataclass(frozen=True)
class EvalScores:
    """The labelled rows of one evaluation: ids, 0/1 labels and the compared score (the probe's or a baseline's)."""

    path: Path
    column: str  # "probe" or the baseline's name
    ids: list[str]
    labels: np.ndarray
    scores: np.ndarray
    n_unlabelled: int


def read_eval(folder: str | Path, baseline: str | None = None) -> EvalScores:
    """The labelled rows of a `probe eval` folder with the probe's score, or baseline `baseline`'s column."""
    from lvlmlp.data import iter_json_lines
    from lvlmlp.outputs import read_json

    path = Path(folder)
    scores_path, metrics_path = path / "scores.jsonl", path / "metrics.json"
    for needed in (scores_path, metrics_path):
        if not needed.is_file():
            raise LvlmlpError(f"{path}: not an evaluation folder (missing {needed.name}; `lvlmlp probe eval` writes it)")
    metrics = read_json(metrics_path)  # a damaged file: one line naming it
    if metrics.get("task") != "binary":
        task = metrics.get("task")
        raise LvlmlpError(f"{metrics_path}: task {task!r}; probe compare compares binary evaluations (AUROC) only")
    ids: list[str] = []
    labels: list[int] = []
    scores: list[float] = []
    seen: set[str] = set()
    unlabelled = 0
    for lineno, rec in iter_json_lines(scores_path):
        where = f"{scores_path}:{lineno}"
        row_id = rec.get("id")
        if not isinstance(row_id, str):
            raise LvlmlpError(f"{where}: record has no string 'id'")
        if row_id in seen:
            raise LvlmlpError(f"{where}: row {row_id!r} appears twice")
        seen.add(row_id)
        label = rec.get("label")
        if label is None:
            unlabelled += 1
            continue
        if label not in (0, 1) or isinstance(label, bool):
            raise LvlmlpError(f"{where}: row {row_id!r} has label {label!r} (expected 0, 1 or null)")
        if baseline is None:
            value = rec.get("score")
        else:
            value = (rec.get("baselines") or {}).get(baseline)
            if value is None:
                have = ", ".join(rec.get("baselines") or {}) or "none"
                raise LvlmlpError(f"{where}: row {row_id!r} has no baseline {baseline!r} (baselines: {have}; "
                                  f"add it with `probe eval --baseline {baseline}`)")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise LvlmlpError(f"{where}: row {row_id!r} has score {value!r} (expected a finite number)")
        ids.append(row_id)
        labels.append(int(label))
        scores.append(float(value))
    if len(set(labels)) < 2:
        raise LvlmlpError(f"{scores_path}: {len(labels)} labelled row(s) of one class only; AUROC needs both labels")
    return EvalScores(path, baseline or "probe", ids, np.asarray(labels, dtype=np.int64),
                      np.asarray(scores, dtype=np.float64), unlabelled)


def paired(a: EvalScores, b: EvalScores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores of A, scores of B) on the same rows, B put in A's row order; refused when the two
    evaluations hold other rows or other labels."""
    if set(a.ids) != set(b.ids):
        only_a, only_b = sorted(set(a.ids) - set(b.ids)), sorted(set(b.ids) - set(a.ids))
        first = f"row {only_a[0]!r} is in {a.path} only" if only_a else f"row {only_b[0]!r} is in {b.path} only"
        raise LvlmlpError(f"{a.path} and {b.path} scored different labelled rows ({len(a.ids)} vs {len(b.ids)}; "
                          f"{first}): a paired comparison needs the same rows")
    order = {row_id: i for i, row_id in enumerate(b.ids)}
    pos = np.array([order[row_id] for row_id in a.ids], dtype=np.int64)
    differ = np.flatnonzero(a.labels != b.labels[pos])
    if differ.size:
        i = int(differ[0])
        raise LvlmlpError(f"row {a.ids[i]!r} has label {int(a.labels[i])} in {a.path} but {int(b.labels[pos[i]])} in "
                          f"{b.path} ({differ.size} row(s) differ): a paired comparison needs the same labels")
    return a.labels, a.scores, b.scores[pos]


def delong_components(y: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUROC, V10, V01): DeLong's structural components from midranks (Sun & Xu 2014).

    V10[i] is the share of negatives that positive i outranks (ties count one half), V01[j] the share of positives
    that outrank negative j; AUROC is the mean of either."""
    pos, neg = score[y == 1], score[y == 0]
    m, n = pos.size, neg.size
    ranks_all = rankdata(np.concatenate([pos, neg]))  # midranks: ties share the mean rank
    v10 = (ranks_all[:m] - rankdata(pos)) / n
    v01 = 1.0 - (ranks_all[m:] - rankdata(neg)) / m
    return float(v10.mean()), v10, v01


def delong_test(y: Any, score_a: Any, score_b: Any) -> dict[str, Any]:
    """DeLong's test of AUROC(A) = AUROC(B) on the same rows: z = (AUC_A - AUC_B) / sqrt(Var) with
    Var = S10/m + S01/n from the covariances (ddof 1) of the structural components; two-sided p from the normal.

    When the variance is 0 (e.g. both scores order the rows identically, or one is constant and the other
    perfect), z is 0 and p 1 for equal AUROCs, else z is None and p 0."""
    y_arr, a = binary_arrays(y, score_a)
    _, b = binary_arrays(y, score_b)
    if a.shape != b.shape:
        raise LvlmlpError(f"scores of A {a.shape} and B {b.shape} must be of the same rows")
    m, n = int(y_arr.sum()), int((1 - y_arr).sum())
    if m < 2 or n < 2:
        raise LvlmlpError(f"DeLong's test needs 2+ rows of each label ({m} with label 1, {n} with label 0)")
    auc_a, v10_a, v01_a = delong_components(y_arr, a)
    auc_b, v10_b, v01_b = delong_components(y_arr, b)
    s10, s01 = np.cov(np.vstack([v10_a, v10_b])), np.cov(np.vstack([v01_a, v01_b]))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    delta = auc_a - auc_b
    if var <= 1e-15:  # rounding of equal components; a true variance is never this small at these row counts
        z, p = (0.0, 1.0) if abs(delta) < 1e-12 else (None, 0.0)
    else:
        z = delta / math.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    return {"auroc_a": auc_a, "auroc_b": auc_b, "delta": delta, "delong_z": z, "delong_p": p, "delong_var": var}


def paired_bootstrap_delta(y: Any, score_a: Any, score_b: Any, n_boot: int = N_BOOT, confidence: float = 0.95,
                           seed: int = 0) -> tuple[float, float] | None:
    """Percentile interval of AUROC(A) - AUROC(B), both measured on the same resample of rows (seeded);
    resamples of one label only are dropped (None when all are)."""
    y_arr, a = binary_arrays(y, score_a)
    _, b = binary_arrays(y, score_b)
    auc_a, auc_b = resampled_auroc(y_arr, a), resampled_auroc(y_arr, b)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, y_arr.size, y_arr.size)
        va, vb = auc_a(idx), auc_b(idx)
        if va is not None and vb is not None:
            deltas.append(va - vb)
    if not deltas:
        return None
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(deltas, [tail, 100 - tail])
    return float(lo), float(hi)


def compare_evals(eval_a: str | Path, eval_b: str | Path, baseline_a: str | None = None,
                  baseline_b: str | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The paired comparison of two evaluations (the probe's scores, or a baseline column of either): a JSON-ready
    dict with `auroc_a`, `auroc_b`, `delta` (A - B), `delta_ci`, `delong_z`, `delong_p`, `n` and what was read."""
    a, b = read_eval(eval_a, baseline_a), read_eval(eval_b, baseline_b)
    y, sa, sb = paired(a, b)
    test = delong_test(y, sa, sb)
    ci = paired_bootstrap_delta(y, sa, sb, n_boot=n_boot, seed=seed)
    return {
        "a": {"eval": str(a.path), "score": a.column},
        "b": {"eval": str(b.path), "score": b.column},
        "auroc_a": test["auroc_a"],
        "auroc_b": test["auroc_b"],
        "delta": test["delta"],
        "delta_ci": list(ci) if ci is not None else None,
        "delong_z": test["delong_z"],
        "delong_p": test["delong_p"],
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_unlabelled": a.n_unlabelled,
        "n_boot": n_boot,
        "seed": seed,
    }


def describe(result: dict[str, Any]) -> str:
    """The one line `probe compare` prints."""
    def name(side: dict[str, str]) -> str:
        return side["eval"] + ("" if side["score"] == "probe" else f" [{side['score']}]")

    ci = result["delta_ci"]
    ci_text = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[n/a]"
    z = result["delong_z"]
    z_text = "z n/a" if z is None else f"z={z:.2f}"
    return (f"AUROC A {result['auroc_a']:.3f} ({name(result['a'])}) vs B {result['auroc_b']:.3f} "
            f"({name(result['b'])}): delta {result['delta']:+.3f} 95% CI {ci_text}, DeLong {z_text} "
            f"p={result['delong_p']:.3g} (n={result['n']})")
