"""Probes and feature views: parity with scikit-learn, streaming training, persistence without pickle, refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy.special import log_softmax
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import RunWriter, open_run
from lvlmlp.probing.features import FeatureSpec, FeatureView, feature_matrix
from lvlmlp.probing.probes import LDAProbe, LogisticProbe, MultinomialProbe, load_probe


def make_run(path: Path, logits: np.ndarray, meta: list[dict], n_tokens=None, model: str = "tiny/model",
             hidden: np.ndarray | None = None, dtype: str = "float32"):
    """A run folder holding `logits` (N, K, V) and `meta` rows, written through the real RunWriter."""
    n, k, v = logits.shape
    settings = {"model": model, "family": "test", "dtype": dtype, "vocab_size": v, "prompt_template": None,
                "max_new_tokens": k, "hidden": hidden is not None, "layers": []}
    writer = RunWriter(path, settings, shard_size=64)
    arrays = {"logits": logits.astype(dtype), "row_index": np.arange(n),
              "n_tokens": np.full(n, k) if n_tokens is None else np.asarray(n_tokens)}
    if hidden is not None:
        arrays["hidden"] = hidden.astype(dtype)
    writer.append(meta, arrays)
    return writer.close()


def binary_data(n: int = 240, d: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * 3).astype(np.float32)
    y = (X @ rng.normal(size=d) + rng.normal(size=n) * 4 > 0).astype(np.int64)
    return X, y


def multiclass_data(n: int = 900, d: int = 30, k: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)).astype(np.float32) + 4 * np.eye(k, d, dtype=np.float32)[y]
    return X, y


# ------------------------------------------------------------------ LogisticProbe
def test_logistic_defaults_reproduce_sklearn_logistic_regression():
    X, y = binary_data()
    probe = LogisticProbe().fit(X, y)
    ref = LogisticRegression().fit(X, y)
    assert np.abs(probe.predict_proba(X) - ref.predict_proba(X)).max() < 1e-6
    assert np.array_equal(probe.predict(X), ref.predict(X))
    assert probe.score(X, y) == pytest.approx(ref.score(X, y))
    assert probe.decision_function(X).shape == (len(X),)


def test_logistic_threshold_flags_rows_below_it():
    X, y = binary_data()
    probe = LogisticProbe(threshold=0.8).fit(X, y)
    p1 = probe.positive_score(X)
    assert np.array_equal(probe.predict(X), (p1 >= 0.8).astype(int))
    assert 0 < np.sum(p1 >= 0.8) < np.sum(p1 >= 0.5)


def test_logistic_refuses_one_class_and_multiclass():
    X, y = binary_data()
    with pytest.raises(LvlmlpError, match="1 class"):
        LogisticProbe().fit(X, np.zeros(len(X), dtype=int))
    with pytest.raises(LvlmlpError, match="multinomial or lda"):
        LogisticProbe().fit(X, np.arange(len(X)) % 3)


def test_fit_rejects_nan_features():
    X, y = binary_data()
    X[7, 3] = np.nan
    with pytest.raises(LvlmlpError, match="row 7"):
        LogisticProbe().fit(X, y)


# ------------------------------------------------------------------ LDA / multinomial
def test_lda_shrinkage_option_matches_sklearn_shrinkage_lda():
    X, y = multiclass_data(n=60, d=120, k=3)
    probe = LDAProbe(shrinkage="auto").fit(X, y)
    ref = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto").fit(X, y)
    assert np.abs(probe.predict_proba(X) - ref.predict_proba(X)).max() < 1e-6
    assert np.array_equal(probe.predict(X), ref.predict(X))


@pytest.mark.parametrize("k", [20, 2])
def test_lda_default_is_the_papers_svd_lda(k):
    """The paper's ImageNet classifier: LinearDiscriminantAnalysis() on float32 features, with more features than
    rows per class (20 classes x 16 rows x 2,000 features); LDAProbe() must predict the same classes."""
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(k, 2000)) * 0.3
    y = np.repeat(np.arange(k), 16)
    X = (centres[y] + rng.normal(size=(y.size, 2000))).astype(np.float32)
    X_test = (centres[np.tile(np.arange(k), 10)] + rng.normal(size=(10 * k, 2000))).astype(np.float32)
    probe = LDAProbe().fit(X, y)
    ref = LinearDiscriminantAnalysis().fit(X, y)
    assert np.array_equal(probe.predict(X_test), ref.predict(X_test))
    assert np.array_equal(probe.predict(X), ref.predict(X))
    # Float32 arithmetic in both, in different orders: probabilities agree to a stated tolerance.
    assert np.abs(probe.predict_proba(X_test) - ref.predict_proba(X_test)).max() < 1e-3
    assert 0.2 < ref.score(X_test, np.tile(np.arange(k), 10)) < 1.0  # neither trivial nor perfect


def test_multinomial_trains_from_memmap_in_batches(tmp_path: Path):
    X, y = multiclass_data(n=3000, d=24, k=8)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=X.shape)
    mm[:] = X
    mm.flush()
    data = np.load(tmp_path / "x.npy", mmap_mode="r")

    class Spy:
        """Memory map wrapper recording how many rows each read touches."""

        shape = data.shape
        largest = 0

        def __getitem__(self, rows):
            out = data[rows]
            Spy.largest = max(Spy.largest, len(out))
            return out

    probe = MultinomialProbe(epochs=8, batch_size=256).fit(Spy(), y)
    assert probe.score(data, y) > 0.97
    assert Spy.largest <= 2048 < len(y)  # batches and statistics chunks, never the whole matrix
    again = MultinomialProbe(epochs=8, batch_size=256).fit(data, y)
    assert np.array_equal(probe.coef_, again.coef_)  # seeded


# ------------------------------------------------------------------ persistence
@pytest.mark.parametrize("make", [
    lambda: LogisticProbe(standardize=True, C=0.5),
    lambda: MultinomialProbe(epochs=3),
    lambda: LDAProbe(),
])
def test_save_load_round_trip_is_exact_and_pickle_free(tmp_path: Path, monkeypatch, make):
    X, y = multiclass_data(n=300, d=20, k=2)
    spec = FeatureSpec(kind="log_softmax", token=1, dim=20, model="m")
    probe = make().fit(X, y, spec=spec, label_names=["no", "yes"])
    probe.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [".lvlmlp-output.json", "probe.json", "probe.safetensors"]

    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded = load_probe(tmp_path / "p")
    assert type(loaded) is type(probe)
    assert np.array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    assert loaded.get_params() == probe.get_params()
    assert loaded.spec_ == spec and loaded.label_names_ == ["no", "yes"]
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert doc["feature_spec"]["token"] == 1 and doc["classes"] == [0, 1] and doc["threshold"] == 0.5


def test_load_probe_errors_name_the_folder(tmp_path: Path):
    with pytest.raises(LvlmlpError, match="missing probe.json"):
        load_probe(tmp_path)


def test_probe_refuses_other_model_kind_or_dimension():
    X, y = binary_data(d=10)
    probe = LogisticProbe().fit(X, y, spec=FeatureSpec(kind="logits", token=0, dim=10, model="a"))
    probe.check_compatible(FeatureSpec(kind="logits", token=0, dim=10, model="a"))
    with pytest.raises(LvlmlpError, match="model 'b'"):
        probe.check_compatible(FeatureSpec(kind="logits", token=0, dim=10, model="b"))
    with pytest.raises(LvlmlpError, match="kind 'softmax'"):
        probe.check_compatible(FeatureSpec(kind="softmax", token=0, dim=10, model="a"))
    with pytest.raises(LvlmlpError, match="dim 11"):
        probe.check_compatible(FeatureSpec(kind="logits", token=0, dim=11, model="a"))
    with pytest.raises(LvlmlpError, match="11 columns but the probe expects 10"):
        probe.predict_proba(np.zeros((2, 11), dtype=np.float32))


# ------------------------------------------------------------------ feature views
def test_feature_views_match_independent_computation(tmp_path: Path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 2, 9)).astype(np.float32) * 5
    hidden = rng.normal(size=(6, 4)).astype(np.float32)
    run = make_run(tmp_path / "r", logits, [{"id": f"r{i}"} for i in range(6)], n_tokens=[2, 2, 1, 2, 2, 2],
                   hidden=hidden)
    assert np.array_equal(feature_matrix(run), logits[:, 0])
    np.testing.assert_allclose(feature_matrix(run, "log_softmax"), log_softmax(logits[:, 0], axis=1), atol=1e-6)
    np.testing.assert_allclose(feature_matrix(run, "softmax").sum(axis=1), 1.0, atol=1e-6)
    assert np.array_equal(feature_matrix(run, "hidden", rows=[4, 1]), hidden[[4, 1]])
    assert np.array_equal(feature_matrix(run, token=1, rows=[0, 3]), logits[[0, 3], 1])
    with pytest.raises(LvlmlpError, match="row 'r2': has no generated token 1"):
        feature_matrix(run, token=1)
    view = FeatureView(run, "log_softmax", token=1)
    assert view.spec == FeatureSpec(kind="log_softmax", token=1, layer=None, dim=9, model="tiny/model")
    with pytest.raises(LvlmlpError, match="unknown feature kind"):
        feature_matrix(run, "probs")


def test_feature_matrix_rejects_nan_and_inf_naming_the_row(tmp_path: Path):
    logits = np.zeros((3, 1, 5), dtype=np.float32)
    logits[2, 0, 1] = np.inf
    run = make_run(tmp_path / "r", logits, [{"id": x} for x in ("a", "b", "c")])
    with pytest.raises(LvlmlpError, match="row 'c' has NaN or infinite logits"):
        feature_matrix(run)


# ------------------------------------------------------------------ probe train CLI
def _labelled_run(tmp_path: Path, labels: list, splits: list):
    rng = np.random.default_rng(0)
    n = len(labels)
    logits = rng.normal(size=(n, 1, 16)).astype(np.float32)
    meta = [{"id": f"q{i}", "label": lab, "split": s} for i, (lab, s) in enumerate(zip(labels, splits))]
    return make_run(tmp_path / "run", logits, meta)


def test_probe_train_cli_fits_on_the_split_and_reports_bad_input(tmp_path: Path, capsys):
    labels = [0, 1] * 20 + [1] * 10 + [None] * 4
    splits = ["train"] * 40 + ["val"] * 10 + ["train"] * 4
    run = _labelled_run(tmp_path, labels, splits)
    out = tmp_path / "probe"
    assert main(["probe", "train", "--run", str(run.path), "--split", "train", "--out", str(out)]) == 0
    probe = load_probe(out)
    X = feature_matrix(run, rows=np.arange(40))
    ref = LogisticRegression().fit(X, np.array(labels[:40]))
    assert np.abs(probe.predict_proba(X) - ref.predict_proba(X)).max() < 1e-6
    assert probe.spec_.model == "tiny/model" and probe.fit_info_["n_rows"] == 40

    capsys.readouterr()
    assert main(["probe", "train", "--run", str(run.path), "--split", "test", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--split test: no such split" in err and "(splits present: train, val)" in err
    assert main(["probe", "train", "--run", str(run.path), "--split", "val", "--out", str(out)]) == 2
    assert "every labelled row has label 1" in capsys.readouterr().err


def test_probe_train_cli_without_labels_is_an_error(tmp_path: Path, capsys):
    run = _labelled_run(tmp_path, [None] * 5, [None] * 5)
    assert main(["probe", "train", "--run", str(run.path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no labelled rows" in err
    assert open_run(run.path).labels.shape == (5,)


def test_probes_are_scikit_learn_estimators_clone_and_cross_val_predict():
    # On scikit-learn's base: clone copies hyper-parameters only, and cross_val_predict drives a probe like any
    # classifier, giving the same out-of-fold probabilities as fitting each fold by hand.
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from lvlmlp.probing.probes import PROBES, LogisticProbe

    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 5)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=60) > 0).astype(int)
    probe = LogisticProbe(C=0.5, threshold=0.3).fit(X, y)
    copy = clone(probe)
    assert copy.get_params() == probe.get_params() and not hasattr(copy, "coef_")
    cv = StratifiedKFold(n_splits=3)
    oof = cross_val_predict(LogisticProbe(C=0.5), X, y, cv=cv, method="predict_proba")
    by_hand = np.zeros_like(oof)
    for tr, te in cv.split(X, y):
        by_hand[te] = LogisticProbe(C=0.5).fit(X[tr], y[tr]).predict_proba(X[te])
    np.testing.assert_allclose(oof, by_hand, rtol=0, atol=1e-12)
    for cls in PROBES.values():
        assert clone(cls()).get_params() == cls().get_params()


@pytest.mark.parametrize("case", ["full-rank", "duplicate-rows", "near-duplicate-rows", "more-rows-than-features"])
def test_lda_within_class_pseudo_inverse_against_numpy_svd(case):
    """`_reduced_rows` then `_centres_times_pinv` (the Cholesky fast path, or the eigen-decomposition when a
    singular value is under tol or rows outnumber features) equals centres @ V_r diag(1/S_r^2) V_r^T from numpy's SVD of the
    within-class matrix, r = the singular values above tol, as scikit-learn's svd solver thresholds them."""
    import torch

    from lvlmlp.probing.probes import _centres_times_pinv, _reduced_rows

    rng = np.random.default_rng(3)
    k, per, d = (6, 40, 30) if case == "more-rows-than-features" else (6, 5, 60)
    y = np.repeat(np.arange(k), per)
    X = rng.normal(size=(y.size, d))
    if case == "duplicate-rows":
        X[1] = X[0]  # a rank lost within class 0: one singular value at 0, under tol
    if case == "near-duplicate-rows":  # one singular value above 0 but under tol: dropped, as scikit-learn drops it
        X[1] = X[0] + 1e-6 * rng.normal(size=d)
    means = np.stack([X[y == c].mean(0) for c in range(k)])
    xw = (X - means[y]) / np.sqrt(y.size)
    centres = rng.normal(size=(k, d))
    _, s, vt = np.linalg.svd(xw, full_matrices=False)
    r = int((s > 1e-4).sum())
    assert r == y.size - k - (case != "full-rank") or case == "more-rows-than-features"
    if case == "near-duplicate-rows":
        assert 0 < s[r] < 1e-4
    expected = centres @ vt[:r].T @ np.diag(1 / s[:r] ** 2) @ vt[:r]
    z = torch.from_numpy(xw.copy())
    if y.size <= d:  # as _lda_svd: one fewer row per class, the same Gram matrix z^T z = xw^T xw
        z = _reduced_rows(z, torch.from_numpy(y), torch.from_numpy(np.bincount(y)))
        assert z.shape == (y.size - k, d)
        assert np.allclose(z.numpy().T @ z.numpy(), xw.T @ xw, rtol=0, atol=1e-12)
    got = _centres_times_pinv(z, torch.from_numpy(centres), 1e-4).numpy()
    assert np.allclose(got, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


def test_one_probe_factory_checks_kind_parameters_and_ranges_in_the_callers_words():
    from lvlmlp.errors import LvlmlpError
    from lvlmlp.probing.probes import LDAProbe, LogisticProbe, make_probe

    probe = make_probe("logistic", {"C": 0.5, "max_iter": 50})
    assert type(probe) is LogisticProbe and (probe.C, probe.max_iter) == (0.5, 50)
    assert type(make_probe("lda", {})) is LDAProbe
    cases = [
        (("svm", {}, True), "--probe 'svm': unknown probe (choose from logistic, multinomial, lda, mlp, mtre)"),
        (("svm", {}, False), "probe.kind 'svm': unknown (choose from logistic, multinomial, lda, mlp, mtre)"),
        (("lda", {"max_iter": 3}, True), "--max-iter does not apply to --probe lda (its hyper-parameters: "),
        (("lda", {"max_iter": 3}, False), "probe.max_iter: not a parameter of the lda probe (parameters: "),
        (("logistic", {"C": -1.0}, True), "--C: must be a finite number > 0, got -1.0"),
        (("logistic", {"C": float("nan")}, False), "probe.C: must be a finite number > 0, got nan"),
    ]
    for (kind, params, cli), message in cases:
        with pytest.raises(LvlmlpError) as err:
            make_probe(kind, params, cli=cli)
        assert str(err.value).startswith(message), (str(err.value), message)
