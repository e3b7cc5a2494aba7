"""`probe compare`: DeLong's test for correlated AUROCs against a plain-loop implementation, the paired bootstrap,
refusals of unpaired evaluations, and the command's round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.probing.compare import compare_evals, delong_test, paired_bootstrap_delta
from tests.probing.test_probes import make_run


def delong_by_loops(y: list[int], a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """(AUC_A, AUC_B, z, p) from DeLong et al. (1988) written out: placement values V10 (each positive against every
    negative) and V01 (each negative against every positive) with psi = 1 / 0.5 / 0, their sample covariances
    summed by hand, Var(AUC_A - AUC_B) = S10/m + S01/n."""
    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    pos = [i for i, lab in enumerate(y) if lab == 1]
    neg = [i for i, lab in enumerate(y) if lab == 0]
    m, n = len(pos), len(neg)
    v10 = {k: [sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for k, s in (("a", a), ("b", b))}
    v01 = {k: [sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for k, s in (("a", a), ("b", b))}
    auc = {k: sum(v10[k]) / m for k in ("a", "b")}

    def cov(u: list[float], w: list[float], mu_u: float, mu_w: float) -> float:
        return sum((x - mu_u) * (z - mu_w) for x, z in zip(u, w)) / (len(u) - 1)

    s = {(p, q): cov(v10[p], v10[q], auc[p], auc[q]) / m + cov(v01[p], v01[q], auc[p], auc[q]) / n
         for p in ("a", "b") for q in ("a", "b")}
    var = s["a", "a"] + s["b", "b"] - 2 * s["a", "b"]
    z = (auc["a"] - auc["b"]) / math.sqrt(var)
    return auc["a"], auc["b"], z, 2 * (1 - norm.cdf(abs(z)))


def correlated_scores(n: int, seed: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int64)
    shared = rng.normal(size=n)
    a = 1.0 * y + shared + 0.7 * rng.normal(size=n)
    b = 0.6 * y + shared + 0.9 * rng.normal(size=n)
    if decimals is not None:  # coarse scores: many ties within and across the labels
        a, b = np.round(a, decimals), np.round(b, decimals)
    return y, a, b


@pytest.mark.parametrize("n,seed,decimals", [(60, 0, None), (151, 1, None), (90, 2, 0), (200, 3, 1)])
def test_delong_equals_the_plain_loop_formulation(n, seed, decimals):
    y, a, b = correlated_scores(n, seed, decimals)
    got = delong_test(y, a, b)
    auc_a, auc_b, z, p = delong_by_loops(y.tolist(), a.tolist(), b.tolist())
    assert got["auroc_a"] == pytest.approx(auc_a, abs=1e-12) == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert got["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert got["delta"] == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert got["delong_z"] == pytest.approx(z, rel=1e-9)
    assert got["delong_p"] == pytest.approx(p, rel=1e-7, abs=1e-12)
    swapped = delong_test(y, b, a)  # the test is antisymmetric in A and B
    assert swapped["delong_z"] == pytest.approx(-got["delong_z"], rel=1e-12)
    assert swapped["delong_p"] == pytest.approx(got["delong_p"], rel=1e-12)


def test_delong_degenerate_variance_and_too_few_rows():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = delong_test(y, s, s * 2)  # the same ranking: equal AUROCs, zero variance
    assert (same["delta"], same["delong_z"], same["delong_p"]) == (0.0, 0.0, 1.0)
    const = delong_test(y, s, np.zeros(6))  # perfect against constant: 1.0 vs 0.5, zero variance
    assert (const["delta"], const["delong_z"], const["delong_p"]) == (0.5, None, 0.0)
    with pytest.raises(LvlmlpError, match=r"needs 2\+ rows of each label \(1 with label 1, 3 with label 0\)"):
        delong_test(np.array([0, 0, 0, 1]), s[:4], s[:4])


def test_paired_bootstrap_resamples_rows_jointly_and_is_seeded():
    y, a, b = correlated_scores(120, 4)
    ci = paired_bootstrap_delta(y, a, b, n_boot=150, seed=7)
    assert ci == paired_bootstrap_delta(y, a, b, n_boot=150, seed=7)
    # The same resamples drawn here, each AUROC by scikit-learn: the same percentile interval.
    rng = np.random.default_rng(7)
    deltas = []
    for _ in range(150):
        idx = rng.integers(0, y.size, y.size)
        if 0 < y[idx].sum() < y.size:
            deltas.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    assert ci == pytest.approx(tuple(np.percentile(deltas, [2.5, 97.5])), abs=1e-12)
    assert ci[0] < roc_auc_score(y, a) - roc_auc_score(y, b) < ci[1]


def write_eval_dir(path: Path, ids: list[str], labels: list, scores: list[float], baselines: dict | None = None,
                   task: str = "binary") -> Path:
    path.mkdir(parents=True)
    recs = []
    for i, (row_id, lab, s) in enumerate(zip(ids, labels, scores)):
        rec = {"id": row_id, "label": lab, "score": s}
        if baselines:
            rec["baselines"] = {k: v[i] for k, v in baselines.items()}
        recs.append(rec)
    (path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (path / "metrics.json").write_text(json.dumps({"task": task}))
    return path


def test_compare_refuses_evaluations_of_other_rows_or_labels(tmp_path: Path, capsys):
    y, a, b = correlated_scores(40, 5)
    ids = [f"r{i}" for i in range(40)]
    ea = write_eval_dir(tmp_path / "a", ids, y.tolist(), a.tolist())
    eb = write_eval_dir(tmp_path / "b", ids[:39] + ["x"], y.tolist(), b.tolist())
    assert main(["probe", "compare", str(ea), str(eb)]) == 2
    err = capsys.readouterr().err
    assert err == (f"lvlmlp: error: {ea} and {eb} scored different labelled rows (40 vs 40; row 'r39' is in {ea} only): "
                   "a paired comparison needs the same rows\n")
    flipped = y.copy()
    flipped[[3, 8]] = 1 - flipped[[3, 8]]
    ec = write_eval_dir(tmp_path / "c", ids, flipped.tolist(), b.tolist())
    with pytest.raises(LvlmlpError, match=r"row 'r3' has label \d in .* but \d in .* \(2 row\(s\) differ\)"):
        compare_evals(ea, ec)
    em = write_eval_dir(tmp_path / "m", ids, y.tolist(), b.tolist(), task="multiclass")
    with pytest.raises(LvlmlpError, match="task 'multiclass'; probe compare compares binary evaluations"):
        compare_evals(ea, em)
    with pytest.raises(LvlmlpError, match="not an evaluation folder \\(missing scores.jsonl"):
        compare_evals(ea, tmp_path)
    with pytest.raises(LvlmlpError, match="row 'r0' has no baseline 'max-prob' \\(baselines: none"):
        compare_evals(ea, ea, baseline_b="max-prob")


def test_compare_pairs_rows_by_id_in_any_order_and_skips_unlabelled(tmp_path: Path):
    y, a, b = correlated_scores(50, 6)
    ids = [f"r{i}" for i in range(50)]
    labels = y.tolist() + [None]
    ea = write_eval_dir(tmp_path / "a", ids + ["u"], labels, a.tolist() + [0.5])
    order = np.random.default_rng(0).permutation(50)
    eb = write_eval_dir(tmp_path / "b", [ids[i] for i in order] + ["u"], [labels[i] for i in order] + [None],
                        [float(b[i]) for i in order] + [0.1])
    got = compare_evals(ea, eb, n_boot=50)
    ref = delong_test(y, a, b)
    assert (got["n"], got["n_unlabelled"]) == (50, 1)
    assert got["auroc_a"] == ref["auroc_a"] and got["auroc_b"] == ref["auroc_b"]
    assert got["delong_z"] == pytest.approx(ref["delong_z"], rel=1e-12)


def test_probe_compare_cli_round_trip(tmp_path: Path, capsys):
    rng = np.random.default_rng(0)
    n, v = 160, 24
    y = np.arange(n) % 2
    logits = rng.normal(size=(n, 2, v)).astype(np.float32)
    logits[:, 0, 0] += 1.5 * y
    logits[:, 1, 1] += 0.5 * y
    meta = [{"id": f"r{i}", "label": int(y[i]), "split": "train" if i < 100 else "val"} for i in range(n)]
    run = make_run(tmp_path / "run", logits, meta)
    for token in ("0", "1"):
        assert main(["probe", "train", "--run", str(run.path), "--split", "train", "--token", token,
                     "--out", str(tmp_path / f"p{token}")]) == 0
        assert main(["probe", "eval", "--probe", str(tmp_path / f"p{token}"), "--run", str(run.path),
                     "--split", "val", "--baseline", "max-prob", "--n-boot", "20",
                     "--out", str(tmp_path / f"e{token}")]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp" / "compare.json"
    assert main(["probe", "compare", str(tmp_path / "e0"), str(tmp_path / "e1"), "--n-boot", "200",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out.read_text())
    recs = {t: [json.loads(line) for line in (tmp_path / f"e{t}" / "scores.jsonl").read_text().splitlines()]
            for t in "01"}
    yy = [r["label"] for r in recs["0"]]
    auc_a, auc_b, z, p = delong_by_loops(yy, [r["score"] for r in recs["0"]], [r["score"] for r in recs["1"]])
    assert {"auroc_a", "auroc_b", "delta", "delta_ci", "delong_z", "delong_p", "n"} <= set(result)
    assert result["auroc_a"] == pytest.approx(auc_a, abs=1e-12)
    assert result["auroc_a"] == json.loads((tmp_path / "e0" / "metrics.json").read_text())["auroc"]
    assert result["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert result["delong_z"] == pytest.approx(z, rel=1e-9) and result["delong_p"] == pytest.approx(p, rel=1e-7)
    assert result["n"] == 60 and result["delta_ci"][0] <= result["delta"] <= result["delta_ci"][1]
    assert len(printed) == 1
    assert printed[0].startswith(f"AUROC A {auc_a:.3f} ({tmp_path / 'e0'}) vs B {auc_b:.3f} ({tmp_path / 'e1'}): "
                                 f"delta {auc_a - auc_b:+.3f} 95% CI [{result['delta_ci'][0]:+.3f}, ")
    assert printed[0].endswith(f"DeLong z={z:.2f} p={p:.3g} (n=60)")

    # A baseline column against the probe of the same evaluation.
    assert main(["probe", "compare", str(tmp_path / "e0"), str(tmp_path / "e0"), "--baseline-b", "max-prob",
                 "--n-boot", "20"]) == 0
    line = capsys.readouterr().out.strip()
    mp = [r["baselines"]["max-prob"] for r in recs["0"]]
    assert f"vs B {roc_auc_score(yy, mp):.3f} ({tmp_path / 'e0'} [max-prob])" in line
    assert main(["probe", "compare", str(tmp_path / "e0"), str(tmp_path / "e1"), "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
