"""Probes and feature views: parity with scikit-learn, streaming training, persistence without pickle, refusals."""

from __future__ import annotations

import functools
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import special
from scipy.special import log_softmax
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import RunWriter, open_run
from lvlmlp.probing.features import (
    FeatureSpec,
    FeatureView,
    RowSubset,
    as_index,
    feature_matrix,
    valid_rows,
)
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
    assert doc["feature_spec"]["token"] == 1 and doc["classes"] == [0, 1] and doc["params"]["threshold"] == 0.5


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
    """`reduced_rows` then `centres_times_pinv` (the Cholesky fast path, or the eigen-decomposition when a
    singular value is under tol or rows outnumber features) equals centres @ V_r diag(1/S_r^2) V_r^T from numpy's SVD of the
    within-class matrix, r = the singular values above tol, as scikit-learn's svd solver thresholds them."""
    import torch

    from lvlmlp.probing.lda import centres_times_pinv, reduced_rows

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
    if y.size <= d:  # as lda_svd: one fewer row per class, the same Gram matrix z^T z = xw^T xw
        z = reduced_rows(z, torch.from_numpy(y), torch.from_numpy(np.bincount(y)))
        assert z.shape == (y.size - k, d)
        assert np.allclose(z.numpy().T @ z.numpy(), xw.T @ xw, rtol=0, atol=1e-12)
    got = centres_times_pinv(z, torch.from_numpy(centres), 1e-4).numpy()
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


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_core.py (marked `mutation_guard`):
# Guards of the core promises (features, probes, persistence), each against an independent computation; the
# breakage each one catches is named in its docstring (checked by hand once, see docs/mutation-report.md).

def _run(path: Path, n: int = 7, k: int = 3, v: int = 11, h: int = 4, layers=(1, -1), seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, k, v)) * 4).astype(np.float32)
    n_tokens = rng.integers(1, k + 1, size=n)
    n_tokens[0] = k
    for i, t in enumerate(n_tokens):
        logits[i, t:] = 0.0  # padding past a row's last token, as the extractor writes it
    hidden = rng.normal(size=(n, h)).astype(np.float32)
    lay = rng.normal(size=(n, len(layers), h)).astype(np.float32)
    w = RunWriter(path, {"model": "m", "dtype": "float32", "vocab_size": v, "prompt_template": None,
                         "max_new_tokens": k, "hidden": True, "layers": list(layers)}, shard_size=4)
    w.append([{"id": f"r{i}", "label": i % 2} for i in range(n)],
             {"logits": logits, "n_tokens": n_tokens, "row_index": np.arange(n), "hidden": hidden, "layers": lay})
    return w.close(), logits, n_tokens, hidden, lay


# ------------------------------------------------------------------------------------------------ features
@pytest.mark.mutation_guard
def test_softmax_and_log_softmax_equal_scipy_special_for_every_token(tmp_path: Path):
    """Catches: softmax/log-softmax computed at another temperature, over the wrong axis, or on other rows."""
    run, logits, n_tokens, _, _ = _run(tmp_path / "r")
    for t in range(3):
        rows = np.flatnonzero(n_tokens > t)
        np.testing.assert_allclose(feature_matrix(run, "softmax", token=t, rows=rows),
                                   special.softmax(logits[rows, t].astype(np.float64), axis=1), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(feature_matrix(run, "log_softmax", token=t, rows=rows),
                                   special.log_softmax(logits[rows, t].astype(np.float64), axis=1), atol=1e-5)
        np.testing.assert_array_equal(feature_matrix(run, "logits", token=t, rows=rows), logits[rows, t])
        np.testing.assert_array_equal(valid_rows(run, "softmax", t), n_tokens > t)


@pytest.mark.mutation_guard
def test_hidden_and_layer_features_and_row_orders(tmp_path: Path):
    """Catches: a layer view reading another layer, rows returned in sorted instead of the caller's order."""
    run, logits, _, hidden, lay = _run(tmp_path / "r")
    np.testing.assert_array_equal(feature_matrix(run, "layer", layer=-1), lay[:, 1])
    np.testing.assert_array_equal(feature_matrix(run, "layer", layer=1, rows=[5, 0, 3]), lay[[5, 0, 3], 0])
    np.testing.assert_array_equal(feature_matrix(run, "hidden", rows=np.array([6, 2, 2])), hidden[[6, 2, 2]])
    mask = np.zeros(7, dtype=bool)
    mask[[1, 4]] = True
    np.testing.assert_array_equal(feature_matrix(run, "hidden", rows=mask), hidden[[1, 4]])
    np.testing.assert_array_equal(feature_matrix(run, "hidden", rows=slice(2, 5)), hidden[2:5])
    np.testing.assert_array_equal(valid_rows(run, "hidden"), np.ones(7, dtype=bool))
    view = FeatureView(run, "layer", layer=1)
    assert view.shape == (7, 4) and len(view) == 7 and view.ndim == 2 and view.dtype == np.float32
    assert view.spec == FeatureSpec(kind="layer", token=0, layer=1, dim=4, model="m")
    assert FeatureView(run, "hidden").spec.layer is None
    sub = RowSubset(view, np.array([6, 1, 3]))
    assert sub.shape == (3, 4) and len(sub) == 3
    np.testing.assert_array_equal(sub[[2, 0]], lay[[3, 6], 0])
    with pytest.raises(LvlmlpError, match="--feature layer needs --layer L"):
        FeatureView(run, "layer")
    with pytest.raises(ValueError, match=r"boolean row mask of shape \(3,\) for 7 rows"):
        as_index(np.array([True, False, True]), 7)
    np.testing.assert_array_equal(as_index(None, 3), [0, 1, 2])
    np.testing.assert_array_equal(as_index(4, 9), [4])


@pytest.mark.mutation_guard
def test_feature_matrix_chunks_equal_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Catches: an off-by-one in the chunk loop of feature_matrix (rows lost or duplicated between chunks)."""
    import lvlmlp.probing.features as features

    run, logits, _, hidden, _ = _run(tmp_path / "r", n=11)
    monkeypatch.setattr(features, "_CHUNK", 3)
    np.testing.assert_array_equal(feature_matrix(run, "hidden"), hidden)
    np.testing.assert_array_equal(feature_matrix(run, rows=[10, 0, 5, 3, 9]), logits[[10, 0, 5, 3, 9], 0])


@pytest.mark.mutation_guard
def test_padding_row_error_names_row_and_token(tmp_path: Path):
    """Catches: the n_tokens check using `<` instead of `<=` (a padding row of zeros read as features)."""
    run, _, n_tokens, _, _ = _run(tmp_path / "r")
    row = int(np.flatnonzero(n_tokens == 1)[0])
    with pytest.raises(LvlmlpError, match=rf"row 'r{row}': has no generated token 1 \(it stopped after 1\)"):
        feature_matrix(run, token=1, rows=[0, row])


@pytest.mark.mutation_guard
def test_probe_refuses_features_of_another_token_or_layer():
    """Catches: check_compatible / FeatureSpec.mismatches ignoring the token or the layer."""
    X = np.random.default_rng(0).normal(size=(40, 5)).astype(np.float32)
    y = np.arange(40) % 2
    probe = LogisticProbe().fit(X, y, spec=FeatureSpec(kind="layer", token=0, layer=8, dim=5, model="a"))
    probe.check_compatible(FeatureSpec(kind="layer", token=0, layer=8, dim=5, model="a"))
    probe.check_compatible(FeatureSpec(kind="layer", token=0, layer=8, dim=None, model=None))  # unknown: no clash
    with pytest.raises(LvlmlpError, match=r"layer 16 \(probe expects 8\)"):
        probe.check_compatible(FeatureSpec(kind="layer", token=0, layer=16, dim=5, model="a"))
    with pytest.raises(LvlmlpError, match=r"token 1 \(probe expects 0\)"):
        probe.check_compatible(FeatureSpec(kind="layer", token=1, layer=8, dim=5, model="a"))
    tok = LogisticProbe().fit(X, y, spec=FeatureSpec(kind="logits", token=2, dim=5))
    with pytest.raises(LvlmlpError, match=r"probe trained on logits of token 2, dim 5.*token 0 \(probe expects 2\)"):
        tok.check_compatible(FeatureSpec(kind="logits", token=0, dim=5))
    assert FeatureSpec.from_dict({"kind": "hidden", "unknown_key": 1}) == FeatureSpec(kind="hidden")
    assert FeatureSpec(kind="layer", layer=3, dim=2, model="x").describe() == "layer of layer 3, dim 2, model 'x'"


# ------------------------------------------------------------------------------------------------ probes
@pytest.mark.mutation_guard
def test_logistic_decision_function_values_equal_sklearn_and_the_linear_map():
    """Catches: decision_function returning the wrong sign, dropping the intercept or the standardisation."""
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(120, 6)) * [1, 5, 0.2, 3, 1, 8] + 2).astype(np.float32)
    y = (X[:, 0] + 0.1 * X[:, 1] + rng.normal(size=120) > 2).astype(int)
    plain = LogisticProbe().fit(X, y)
    ref = LogisticRegression().fit(X, y)
    np.testing.assert_allclose(plain.decision_function(X), ref.decision_function(X), rtol=1e-5, atol=1e-5)
    std = LogisticProbe(standardize=True, C=0.3).fit(X, y)
    Z = (X - X.mean(0)) / X.std(0)
    ref_std = LogisticRegression(C=0.3).fit(Z, y)
    np.testing.assert_allclose(std.mean_, X.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std.scale_, X.astype(np.float64).std(0), rtol=1e-5)
    np.testing.assert_allclose(std.decision_function(X), ref_std.decision_function(Z), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(std.predict_proba(X)[:, 1], special.expit(std.decision_function(X)), rtol=1e-12)
    assert std.fit_info_["n_rows"] == 120 and std.fit_info_["converged"] is True
    assert LogisticProbe(max_iter=1).fit(X, y).fit_info_["converged"] is False  # the paper's default may stop early


@pytest.mark.mutation_guard
def test_multinomial_probe_equals_sklearn_multinomial_at_matched_regularisation():
    """Catches: MultinomialProbe without (or with a wrong) weight decay, a penalised bias, a wrong loss.

    scikit-learn minimises C * sum(CE) + ||W||^2 / 2, i.e. mean(CE) + ||W||^2 / (2 C n): weight_decay = 1 / (C n).
    Full-batch Adam to convergence reaches the same optimum: coefficients within 2e-3, log-loss within 1e-4
    (intercepts of a softmax are only defined up to a common shift, so they are compared centred)."""
    rng = np.random.default_rng(0)
    n, d, k, C = 150, 6, 3, 0.05
    y = rng.integers(0, k, n)
    X = (rng.normal(size=(n, d)) + 1.5 * np.eye(k, d)[y]).astype(np.float32)
    ref = LogisticRegression(C=C, max_iter=5000, tol=1e-10).fit(X, y)
    probe = MultinomialProbe(epochs=250, batch_size=n, lr=0.1, weight_decay=1 / (C * n), standardize=False).fit(X, y)
    np.testing.assert_allclose(probe.coef_, ref.coef_, atol=2e-3)
    centred = probe.intercept_ - probe.intercept_.mean()
    np.testing.assert_allclose(centred, ref.intercept_ - ref.intercept_.mean(), atol=2e-3)
    assert abs(log_loss(y, probe.predict_proba(X)) - log_loss(y, ref.predict_proba(X))) < 1e-4
    # The recorded final loss is the penalised objective of the last epoch.
    penalty = 0.5 / (C * n) * float((probe.coef_.astype(np.float64) ** 2).sum())
    assert probe.fit_info_["final_loss"] == pytest.approx(log_loss(y, probe.predict_proba(X)) + penalty, abs=1e-4)


@pytest.mark.mutation_guard
def test_multinomial_standardises_with_streamed_column_statistics():
    """Catches: standardisation statistics merged wrongly across chunks (Chan et al. update)."""
    import lvlmlp.probing.probes as probes

    rng = np.random.default_rng(1)
    X = (rng.normal(size=(50, 4)) * [1, 10, 0.1, 3] + [5, -2, 0, 1]).astype(np.float32)
    X[:, 2] = 7.0  # a constant column gets scale 1, not a division by zero
    mean, scale = probes._column_stats(X, 50, 4)
    old = probes._SCORE_CHUNK
    try:
        probes._SCORE_CHUNK = 7
        mean7, scale7 = probes._column_stats(X, 50, 4)
    finally:
        probes._SCORE_CHUNK = old
    ref_std = X.astype(np.float64).std(0)
    for m, s in ((mean, scale), (mean7, scale7)):
        np.testing.assert_allclose(m, X.astype(np.float64).mean(0), rtol=1e-5)
        np.testing.assert_allclose(s, np.where(ref_std > 0, ref_std, 1.0), rtol=1e-5)
    y = np.arange(50) % 2
    probe = MultinomialProbe(epochs=2).fit(X, y)
    np.testing.assert_allclose(probe.mean_, mean) and np.testing.assert_allclose(probe.scale_, scale)
    Z = (X - mean) / scale
    np.testing.assert_allclose(probe.decision_function(X), Z @ probe.coef_.T.astype(np.float64) + probe.intercept_,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.mutation_guard
def test_multiclass_predict_and_binary_only_positive_score():
    """Catches: multiclass predict not mapping argmax back to the labels; positive_score on many classes."""
    rng = np.random.default_rng(2)
    y = np.repeat([3, 5, 9], 30)
    X = (rng.normal(size=(90, 5)) + 4 * np.eye(3, 5)[np.searchsorted([3, 5, 9], y)]).astype(np.float32)
    probe = MultinomialProbe(epochs=40, batch_size=32).fit(X, y)
    p = probe.predict_proba(X)
    np.testing.assert_array_equal(probe.predict(X), np.array([3, 5, 9])[p.argmax(1)])
    assert probe.score(X, y) == np.mean(probe.predict(X) == y) > 0.9
    with pytest.raises(LvlmlpError, match="MultinomialProbe has 3 classes: no single positive score"):
        probe.positive_score(X)
    with pytest.raises(LvlmlpError, match="is not fitted yet"):
        MultinomialProbe().predict_proba(X)
    with pytest.raises(LvlmlpError, match="features must be a 2-D matrix"):
        probe.predict_proba(X[0])
    with pytest.raises(LvlmlpError, match="labels have shape"):
        MultinomialProbe().fit(X, y[:-1])
    with pytest.raises(LvlmlpError, match="labels must be integers"):
        MultinomialProbe().fit(X, y + 0.5)
    with pytest.raises(LvlmlpError, match="labels contain NaN"):
        MultinomialProbe().fit(X, np.where(y == 3, np.nan, y))
    with pytest.raises(ValueError, match="Invalid parameter 'Cee'"):
        LogisticProbe().set_params(Cee=1)
    assert LogisticProbe().set_params(C=2.0).C == 2.0
    assert repr(LogisticProbe(C=2.0)) == "LogisticProbe(C=2.0)"  # scikit-learn shows the non-default ones


# ------------------------------------------------------------------------------------------------ persistence
def _saved(tmp_path: Path) -> Path:
    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    return LogisticProbe().fit(X, np.arange(30) % 2).save(tmp_path / "p")


@pytest.mark.mutation_guard
def test_load_probe_refuses_unknown_class_and_corrupt_files(tmp_path: Path):
    """Catches: load_probe instantiating whatever class the JSON names, or a traceback on corrupt files."""
    folder = _saved(tmp_path)
    doc = json.loads((folder / "probe.json").read_text())
    (folder / "probe.json").write_text(json.dumps({**doc, "class": "os.system"}))
    with pytest.raises(LvlmlpError, match=r"probe.json: unknown probe class 'os.system'"):
        load_probe(folder)
    (folder / "probe.json").write_text(json.dumps({**doc, "format": "other"}))
    with pytest.raises(LvlmlpError, match=r"not an lvlmlp probe \(format 'other'\)"):
        load_probe(folder)
    (folder / "probe.json").write_text('{"format": ')
    with pytest.raises(LvlmlpError, match=r"probe.json: invalid JSON \(Expecting value at line 1\)"):
        load_probe(folder)
    (folder / "probe.json").write_text(json.dumps(doc))
    (folder / "probe.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(LvlmlpError, match=r"probe.safetensors"):
        load_probe(folder)
    (folder / "probe.safetensors").unlink()
    with pytest.raises(LvlmlpError, match=r"not a probe folder \(missing probe.safetensors\)"):
        load_probe(folder)


@pytest.mark.mutation_guard
def test_loading_never_unpickles_even_through_unpickler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Catches: any pickle use on load (numpy.load(allow_pickle), torch.load), blocked at pickle.Unpickler itself."""
    folder = _saved(tmp_path)

    class Forbidden:
        def __init__(self, *a, **k):
            raise AssertionError("pickle.Unpickler used while loading a probe")

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading a probe")

    import _pickle

    for mod in (pickle, _pickle):
        monkeypatch.setattr(mod, "Unpickler", Forbidden)
        monkeypatch.setattr(mod, "load", forbidden)
        monkeypatch.setattr(mod, "loads", forbidden)
    probe = load_probe(folder)
    X = np.ones((2, 4), dtype=np.float32)
    assert probe.predict_proba(X).shape == (2, 2)
    with pytest.raises(AssertionError, match="pickle"):  # the block itself works
        pickle.loads(pickle.dumps(1))


@pytest.mark.mutation_guard
def test_feature_dtypes_messages_and_unknown_values(tmp_path: Path):
    """Catches (mutation survivors): float64 leaking out of a view, valid_rows ignoring logits kinds, error texts,
    a dim-less spec that stops comparing before the model, padding checks on hidden-state views."""
    run, logits, n_tokens, hidden, lay = _run(tmp_path / "r")
    for kind in ("logits", "log_softmax", "softmax", "hidden"):
        assert FeatureView(run, kind)[[0, 1]].dtype == np.float32, kind
    assert RowSubset(np.arange(12, dtype=np.int64).reshape(4, 3), [3, 1])[[0]].dtype == np.float32
    assert RowSubset(np.zeros((4, 3)), [3, 1]).idx.dtype == np.int64
    for kind in ("logits", "log_softmax", "softmax"):
        np.testing.assert_array_equal(valid_rows(run, kind, 1), n_tokens > 1)
    assert valid_rows(run, "layer", 2).dtype == bool and valid_rows(run, "layer", 2).all()
    np.testing.assert_array_equal(valid_rows(run), n_tokens > 0)  # defaults: logits of token 0
    np.testing.assert_array_equal(valid_rows(run, token=1), n_tokens > 1)  # the default kind is a logits kind
    np.testing.assert_array_equal(FeatureView(run)[[2, 0]], logits[[2, 0], 0])
    np.testing.assert_array_equal(FeatureView(run, "hidden")[1:3], hidden[1:3])
    assert feature_matrix(run).dtype == np.float32 and feature_matrix(run, "hidden").dtype == np.float32
    first_short = int(np.flatnonzero(n_tokens == 1)[0])
    for kind in ("log_softmax", "softmax"):  # padding rows are refused for every logits kind
        with pytest.raises(LvlmlpError, match=f"row 'r{first_short}': has no generated token 1"):
            feature_matrix(run, kind, token=1)
    # Hidden states exist once per row whatever `token` says: no padding check for them.
    short = int(np.flatnonzero(n_tokens == 1)[0])
    np.testing.assert_array_equal(FeatureView(run, "hidden", token=2)[[short]], hidden[[short]])
    with pytest.raises(LvlmlpError) as err:
        feature_matrix(run, "probs")
    assert str(err.value) == "--feature 'probs': unknown feature kind (choose from logits, log_softmax, softmax, " \
                             "hidden, layer, multi-token, vision)"
    with pytest.raises(LvlmlpError) as err:
        feature_matrix(run, "layer")
    assert str(err.value) == "--feature layer needs --layer L"
    spec = FeatureSpec(kind="logits", token=0, dim=None, model="a")
    assert spec.mismatches(FeatureSpec(kind="logits", token=0, dim=9, model="b")) == ["model 'b' (probe expects 'a')"]


@pytest.mark.mutation_guard
def test_probe_mutation_survivors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Catches (mutation survivors of probes.py): hyper-parameters not passed to scikit-learn, wrong defaults,
    chunked float32 conversion, predict at exactly the threshold, probe.json fields and tolerant loading."""
    import lvlmlp
    import lvlmlp.probing.probes as probes
    from lvlmlp.probing.probes import LDAProbe

    rng = np.random.default_rng(9)
    X = rng.normal(size=(60, 5))
    y = (X[:, 0] + rng.normal(size=60) > 0.8).astype(int)  # imbalanced
    defaults = LogisticRegression().get_params()
    assert {k: LogisticProbe().get_params()[k] for k in ("C", "class_weight", "max_iter", "tol", "solver")} == \
        {k: defaults[k] for k in ("C", "class_weight", "max_iter", "tol", "solver")}
    for params in ({"class_weight": "balanced"}, {"tol": 0.5}, {"solver": "liblinear"}):
        ours = LogisticProbe(**params).fit(X, y)
        ref = LogisticRegression(**params).fit(X.astype(np.float32), y)
        np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-5, atol=1e-6, err_msg=str(params))
        assert ours.fit_info_["n_iter"] == int(np.max(ref.n_iter_))
    # float64 input, a memory map and several conversion chunks give the float32 in-memory result.
    monkeypatch.setattr(probes, "_SCORE_CHUNK", 7)
    np.save(tmp_path / "x.npy", X)
    ref = LogisticProbe().fit(X.astype(np.float32), y)
    for data in (X, np.load(tmp_path / "x.npy", mmap_mode="r")):
        np.testing.assert_array_equal(LogisticProbe().fit(data, y).coef_, ref.coef_)
    assert probes.PROBES["logistic"] is LogisticProbe and probes.PROBES["lda"] is LDAProbe
    assert LDAProbe().fit(X, y).fit_info_["n_rows"] == 60
    with pytest.raises(LvlmlpError, match=r"^LogisticProbe is binary but labels hold 3 classes: use --probe"):
        LogisticProbe().fit(X, np.arange(60) % 3)
    with pytest.raises(ValueError, match=r"Invalid parameter 'gamma' for estimator LogisticProbe\(\)"):
        LogisticProbe().set_params(gamma=1)
    spec = FeatureSpec(kind="logits", token=0, dim=5, model="a")
    probe = LogisticProbe().fit(X, y, spec=spec)
    with pytest.raises(LvlmlpError) as err:
        probe.check_compatible(FeatureSpec(kind="softmax", token=1, dim=5, model="a"))
    assert str(err.value).endswith("kind 'softmax' (probe expects 'logits'); token 1 (probe expects 0)")
    p1 = probe.predict_proba(X)[:, 1]
    probe.threshold = float(p1[0])  # a score exactly at the threshold is label 1 (flagged means strictly below)
    assert probe.predict(X)[0] == 1
    # probe.json fields, nested output folders, saving twice, and files written by older/other writers.
    folder = probe.save(tmp_path / "a" / "b" / "p")
    probe.save(folder)
    doc = json.loads((folder / "probe.json").read_text())
    assert doc["format_version"] == 1 and doc["lvlmlp_version"] == lvlmlp.__version__
    loaded = load_probe(folder)
    np.testing.assert_array_equal(loaded.predict(X), probe.predict(X))
    assert loaded.classes_.tolist() == [0, 1]
    lean = {k: v for k, v in doc.items() if k != "fit_info"}  # params are required (issue 12), the rest optional
    (folder / "probe.json").write_text(json.dumps({**lean, "feature_spec": None}))
    loaded = load_probe(folder)
    assert loaded.get_params() == probe.get_params() and loaded.fit_info_ == {} and loaded.spec_ is None
    (folder / "probe.json").write_text(json.dumps({**doc, "params": {"gamma": 1}}))
    with pytest.raises(LvlmlpError, match=r"probe.json: params.gamma is not a parameter of LogisticProbe"):
        load_probe(folder)


@pytest.mark.mutation_guard
def test_multinomial_devices_defaults_and_bad_rows():
    """Catches (mutation survivors of MultinomialProbe): changed defaults, `--device auto/cuda` handling, float64
    input not converted, a NaN row reported without its index."""
    import torch

    assert {k: v for k, v in MultinomialProbe().get_params().items()} == {
        "epochs": 20, "batch_size": 512, "lr": 1e-2, "weight_decay": 1e-4, "standardize": True, "device": "cpu",
        "seed": 0, "threshold": 0.5}
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert MultinomialProbe(device="auto")._device() == auto
    assert MultinomialProbe(device="cpu")._device() == torch.device("cpu")
    rng = np.random.default_rng(4)
    X = rng.normal(size=(40, 3))
    y = np.arange(40) % 2
    if not torch.cuda.is_available():
        with pytest.raises(LvlmlpError) as err:
            MultinomialProbe(device="cuda:0").fit(X, y)
        assert str(err.value) == "--device cuda:0: CUDA is not available on this machine"
    np.testing.assert_array_equal(MultinomialProbe(epochs=3).fit(X, y).coef_,
                                  MultinomialProbe(epochs=3).fit(X.astype(np.float32), y).coef_)
    X[13, 1] = np.inf
    with pytest.raises(LvlmlpError) as err:
        MultinomialProbe(epochs=1, batch_size=8).fit(X, y)
    assert str(err.value) == "feature row 13 has NaN or infinite values"


@pytest.mark.mutation_guard
def test_probe_inputs_exact_messages_and_standardisation():
    """Catches (mutation survivors): float labels 0.0/1.0 not converted, messages changed (checked whole, not by
    substring), MultinomialProbe standardising with the wrong sign or operation, fit_info keys."""
    rng = np.random.default_rng(6)
    X = (rng.normal(size=(48, 4)) * [1, 4, 0.5, 2] + [3, -1, 0, 5]).astype(np.float32)
    y = np.arange(48) % 2
    as_int = LogisticProbe().fit(X, y)
    as_float = LogisticProbe().fit(X, y.astype(float))
    np.testing.assert_array_equal(as_float.coef_, as_int.coef_)
    for labels, message in ((np.where(y == 1, np.nan, 0.0), "labels contain NaN: select labelled rows before fitting"),
                            (y + 0.5, "labels must be integers"),
                            (np.zeros(0), "no labelled rows to fit the probe on")):
        data = X[: len(labels)]
        with pytest.raises(LvlmlpError) as err:
            LogisticProbe().fit(data, labels)
        assert str(err.value) == message
    with pytest.raises(LvlmlpError) as err:
        LogisticProbe().fit(X, y, spec=FeatureSpec(dim=5))
    assert str(err.value) == "feature spec says dim 5 but features have 4 columns"
    assert LogisticProbe().fit(X, y).spec_ == FeatureSpec(dim=4)
    with pytest.raises(LvlmlpError) as err:
        MultinomialProbe().predict_proba(X)
    assert str(err.value) == "MultinomialProbe is not fitted yet"
    bad = X.copy()
    bad[5, 2] = np.inf
    with pytest.raises(LvlmlpError) as err:
        as_int.decision_function(bad)
    assert str(err.value) == "feature row 5 has NaN or infinite values"
    # Standardised training = plain training on (X - mean) / scale.
    std = MultinomialProbe(epochs=5, batch_size=16).fit(X, y)
    Z = (X - std.mean_) / std.scale_
    plain = MultinomialProbe(epochs=5, batch_size=16, standardize=False).fit(Z, y)
    np.testing.assert_allclose(std.coef_, plain.coef_, atol=1e-5)
    np.testing.assert_allclose(std.decision_function(X), plain.decision_function(Z), atol=1e-4)
    assert std.coef_.dtype == np.float32 and std.intercept_.dtype == np.float32
    assert set(std.fit_info_) == {"n_rows", "epochs", "final_loss"} and std.fit_info_["n_rows"] == 48
    assert std.fit_info_["epochs"] == 5


@pytest.mark.mutation_guard
def test_decision_function_scores_every_chunk(monkeypatch: pytest.MonkeyPatch):
    """Catches: scoring only the first _SCORE_CHUNK rows, or each chunk read to the end (same values, but memory no
    longer bounded by the chunk), in decision_function. The chunk is shrunk to 3 rows: 10 rows take four reads."""
    import lvlmlp.probing.probes as probes

    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(40, 6)).astype(np.float32), np.arange(40) % 3
    probe = MultinomialProbe(epochs=2, batch_size=16, standardize=True).fit(X, y)
    monkeypatch.setattr(probes, "_SCORE_CHUNK", 3)

    class Reads(np.ndarray):
        """An array that records the row slices read from it (memory stays bounded by the chunk)."""
        slices: list[tuple[int, int]] = []

        def __getitem__(self, key):
            if isinstance(key, slice):
                Reads.slices.append(key.indices(len(self))[:2])
            return np.asarray(self).__getitem__(key)

    want = ((X[:10] - probe.mean_) / probe.scale_) @ probe.coef_.T.astype(np.float64) + probe.intercept_
    np.testing.assert_allclose(probe.decision_function(X[:10].view(Reads)), want, rtol=1e-5, atol=1e-6)  # f32/f64
    assert Reads.slices == [(0, 3), (3, 6), (6, 9), (9, 10)]


@pytest.mark.mutation_guard
def test_multinomial_final_loss_is_the_last_epochs_mean_over_all_batches():
    """Catches: final_loss taken from the last batch only, from the epoch before the last, or recorded for a fit of
    zero epochs. With lr=0 the weights stay zero, so every batch's loss is log(3) (uniform softmax, no penalty):
    the epoch's row-weighted mean is log(3) whatever the batch sizes (40 rows in batches of 16, 16, 8)."""
    rng = np.random.default_rng(6)
    X, y = rng.normal(size=(40, 5)).astype(np.float32), np.arange(40) % 3
    still = MultinomialProbe(epochs=2, batch_size=16, lr=0.0).fit(X, y)
    assert still.fit_info_["final_loss"] == pytest.approx(np.log(3), rel=1e-6)
    one, two = (MultinomialProbe(epochs=e, batch_size=16, lr=0.05).fit(X, y).fit_info_["final_loss"] for e in (1, 2))
    assert two < one  # the second epoch's loss, not the first's again (same seed: epoch 1 is the same in both)
    assert MultinomialProbe(epochs=0).fit(X, y).fit_info_["final_loss"] is None


@pytest.mark.mutation_guard
def test_every_damaged_probe_file_gets_its_own_message(tmp_path: Path):
    """Catches: a load check dropped, inverted or off by one (a 1-feature probe refused, bool classes accepted), or a
    message that names the wrong key, array, shape or expected value (a feature_spec that is not an object was a
    traceback: AttributeError). Each case damages one thing of a saved
    standardised multinomial probe (weights and statistics) and expects the exact message."""
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(30, 4)).astype(np.float32), np.arange(30) % 3
    folder = MultinomialProbe(epochs=1, standardize=True).fit(X, y).save(tmp_path / "p")
    json_path, weights_path = folder / "probe.json", folder / "probe.safetensors"
    doc, arrays = json.loads(json_path.read_text()), load_file(str(weights_path))

    def expect(message: str, new_doc: object = None, new_arrays: dict | None = None, raw: bytes | None = None):
        json_path.write_bytes(raw if raw is not None else json.dumps(doc if new_doc is None else new_doc).encode())
        save_file(arrays if new_arrays is None else new_arrays, str(weights_path))
        with pytest.raises(LvlmlpError) as err:
            load_probe(folder)
        assert str(err.value) == message.format(j=json_path, w=weights_path)

    params = ", ".join(sorted(MultinomialProbe().get_params()))
    expect("{j}: not UTF-8 text", raw=b'{"format": "\xff"}')
    expect("{j}: not an lvlmlp probe (format None)", new_doc=[1, 2])
    expect("{j}: unknown probe class None", new_doc={k: v for k, v in doc.items() if k != "class"})
    expect(f"{{j}}: params.alpha is not a parameter of MultinomialProbe (parameters: {params})",
           new_doc={**doc, "params": {**doc["params"], "alpha": 1}})
    expect("{j}: 'classes' must be a list of integer labels, got [True, False, True]",
           new_doc={**doc, "classes": [True, False, True]})
    expect("{j}: 'classes' must be a list of integer labels, got 3", new_doc={**doc, "classes": 3})
    expect("{j}: 'n_features_in' must be a positive integer, got 0", new_doc={**doc, "n_features_in": 0})
    expect("{j}: 'classes' must be 2 or more distinct labels in increasing order, got [2, 1, 0]",
           new_doc={**doc, "classes": [2, 1, 0]})
    expect("{w}: missing coef weights", new_arrays={k: v for k, v in arrays.items() if k != "coef"})
    expect("{w}: missing intercept weights", new_arrays={k: v for k, v in arrays.items() if k != "intercept"})
    expect("{w}: intercept has shape (2,), expected (3,)", new_arrays={**arrays, "intercept": arrays["intercept"][:2]})
    expect("{w}: mean has shape (3,), expected (4,)", new_arrays={**arrays, "mean": arrays["mean"][:3]})
    expect("{w}: scale has shape (5,), expected (4,)", new_arrays={**arrays, "scale": np.ones(5, np.float32)})
    bad_scale = arrays["scale"].copy()
    bad_scale[0] = np.nan
    expect("{w}: the probe's scale weights hold NaN or infinite values (a damaged probe; train it again)",
           new_arrays={**arrays, "scale": bad_scale})
    expect("{j}: 'feature_spec' must be an object or null, got 'logits'", new_doc={**doc, "feature_spec": "logits"})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "probe.json").write_text(json.dumps(doc))
    (tmp_path / "bad" / "probe.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    try:
        load_file(str(tmp_path / "bad" / "probe.safetensors"))
    except Exception as err:  # safetensors' own message, whatever its class
        first_line = str(err).splitlines()[0]
    with pytest.raises(LvlmlpError) as err:
        load_probe(tmp_path / "bad")
    assert str(err.value) == f"{tmp_path / 'bad' / 'probe.safetensors'}: unreadable ({first_line}); train the probe again"
    # Checked array by array: statistics after a missing one still are (scale without mean, holding NaN).
    expect("{w}: the probe's scale weights hold NaN or infinite values (a damaged probe; train it again)",
           new_arrays={k: v for k, v in {**arrays, "scale": bad_scale}.items() if k != "mean"})
    # A probe on one feature is valid (n_features_in == 1).
    one = LogisticProbe().fit(X[:, :1], np.arange(30) % 2).save(tmp_path / "one")
    assert load_probe(one).n_features_in_ == 1


@pytest.mark.mutation_guard
def test_lda_device_names_fit_info_and_more_rows_than_features():
    """Catches: --device auto/cpu/cuda resolved wrongly (or CUDA accepted where there is none), the solver not
    recorded, and the path for more rows than features (eigen-decomposition of the d x d matrix) or the binary
    difference of class rows differing from scikit-learn's LinearDiscriminantAnalysis()."""
    import torch
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from lvlmlp.probing.probes import LDAProbe, _torch_device

    assert _torch_device("cpu") == torch.device("cpu")
    assert _torch_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(LvlmlpError) as err:
                _torch_device(name)
            assert str(err.value) == f"--device {name}: CUDA is not available on this machine"
    rng = np.random.default_rng(2)
    for k in (2, 3):
        y = np.arange(90) % k
        X = (rng.normal(size=(90, 6)) + y[:, None] * 0.8).astype(np.float32)
        ours, ref = LDAProbe(device="auto").fit(X, y), LinearDiscriminantAnalysis().fit(X, y)
        assert ours.fit_info_ == {"n_rows": 90, "solver": "svd"}
        assert ours.coef_.dtype == np.float64 and ours.intercept_.dtype == np.float64
        np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-5)  # float64 here, float32 there
        np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-4, atol=1e-5)
        assert (ours.predict(X) == ref.predict(X)).all()
    assert LDAProbe(shrinkage="auto").fit(X, y).fit_info_ == {"n_rows": 90, "solver": "lsqr"}


@pytest.mark.mutation_guard
def test_lda_row_blocks_give_the_same_coefficients(monkeypatch: pytest.MonkeyPatch):
    """Catches: a block of the in-place steps of the LDA solver (centring, each class's reduced rows) reaching back
    to the first row or on to the last, only observable past one block (ROWS rows, shrunk here to 7)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    import lvlmlp.probing.lda as lda
    import lvlmlp.probing.probes as probes

    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(10), 4)
    X = (rng.normal(size=(40, 60)) + rng.normal(size=(10, 60))[y]).astype(np.float32)  # fewer rows than features
    monkeypatch.setattr(lda, "ROWS", 7)
    ours, ref = probes.LDAProbe().fit(X, y), LinearDiscriminantAnalysis().fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-3, atol=1e-4)  # float64 here, float32 there
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-3, atol=1e-4)


@pytest.mark.mutation_guard
def test_lda_rank_thresholds_and_constant_features_match_sklearn():
    """Catches, in the LDA solver's numerical guards (each reached only by data built for it, then compared with
    scikit-learn's LinearDiscriminantAnalysis at the same tol):
    - the within-class std taken with another correction (n - 1): the scaled singular values shrink by
      sqrt((n - 1) / n), so one just above tol falls under it (tol is set 1% under that singular value);
    - a constant feature's zero std not replaced (0 / 0), and every singular value kept where rows outnumber
      features (a near-duplicate feature's tiny one, at tol 1% above it: its 1 / S^2 is then huge);
    - the between-class eigenvalues clamped at 1 instead of 0 (a second discriminant direction weaker than 1), and
      the relative rank threshold tol * S2[0] replaced by tol / S2[0] or tol * S2[1] (tol set between S2[1] / S2[0]
      and 1: scikit-learn keeps one direction there)."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    from lvlmlp.probing.probes import LDAProbe

    rng = np.random.default_rng(5)
    n = 40
    y = np.arange(n) % 2
    X = rng.normal(size=(n, 4)) + y[:, None]
    X[:, 0] = 0.5  # constant: zero within-class std
    X[:, 3] = X[:, 2] + 1e-3 * rng.normal(size=n)  # near-duplicate of feature 2: one small singular value
    means = np.stack([X[y == c].mean(0) for c in (0, 1)])
    std = (X - means[y]).std(0)
    std[std == 0] = 1.0
    s = np.linalg.svd((X - means[y]) / std / np.sqrt(n), compute_uv=False)  # scikit-learn's scaled within-class
    assert s[-1] < 1e-12 and 1e-4 < s[-2] < 1e-2 < s[-3]  # the constant feature; the near-duplicate pair
    for tol in (0.99 * s[-2], 1.01 * s[-2]):
        ours, ref = LDAProbe(tol=tol).fit(X, y), LinearDiscriminantAnalysis(tol=tol).fit(X, y)
        np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-3, atol=1e-6)  # 1/S^2 ~ 1e6 amplifies rounding
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-3)
    assert np.abs(LinearDiscriminantAnalysis(tol=0.99 * s[-2]).fit(X, y).coef_).max() > 100  # kept: huge weights

    m = 100  # three classes sharing one centred noise pattern: exact class means, a weak second direction
    noise = rng.normal(size=(m, 2))
    y = np.repeat(np.arange(3), m)
    X = np.array([[0.0, 0.0], [3.0, 0.08], [6.0, 0.0]])[y] + np.tile(noise - noise.mean(0), (3, 1))
    ratio = np.sqrt(np.divide(*LinearDiscriminantAnalysis().fit(X, y).explained_variance_ratio_[::-1]))
    assert ratio < 0.05
    for tol, rank in ((1e-4, 2), (2 * ratio, 1)):
        ours, ref = LDAProbe(tol=tol).fit(X, y), LinearDiscriminantAnalysis(tol=tol).fit(X, y)
        assert ref.scalings_.shape[1] == rank
        np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-6)
        np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-6, atol=1e-9)


@pytest.mark.mutation_guard
def test_standardisation_statistics_accumulate_in_float64():
    """Catches: the column means and stds of `standardize=True` accumulated in float32 (numpy sums the rows of a
    float32 block in float32: at a mean of 1000 over 2,048 rows its error reaches several units in the last place);
    accumulated in float64 they are the exact statistics rounded once to float32 (within one unit)."""
    rng = np.random.default_rng(0)
    X = (1000 + rng.normal(size=(3000, 8)) * 0.5).astype(np.float32)  # two chunks of _SCORE_CHUNK rows
    y = np.arange(3000) % 2
    probe = LogisticProbe(standardize=True, max_iter=5).fit(X, y)
    exact = X.astype(np.float64)
    assert np.abs(probe.mean_ - exact.mean(0)).max() <= np.spacing(np.float32(1000))
    np.testing.assert_allclose(probe.scale_, exact.std(0), rtol=1e-6, atol=0)


# Labels a binary probe cannot mean, probe folders as one unit (issue 27 items 3, 4).

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


# ------------------------------------------------------------------ MTRE's aggregation: the `mtre` probe
def mtre_data(tmp_path: Path, n: int = 160, k: int = 3, v: int = 6, seed: int = 2):
    """Each generated token carries weak evidence of the row's label; rows generated 1..k tokens."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    n_tokens = rng.integers(1, k + 1, n)
    logits = rng.normal(size=(n, k, v)).astype(np.float32)
    logits[:, :, 0] += 0.8 * y[:, None]
    meta = [{"id": f"r{i}", "label": int(y[i]), "split": "train" if i < 110 else "test"} for i in range(n)]
    return make_run(tmp_path / "run", logits, meta, n_tokens=n_tokens), logits, y, n_tokens


def test_mtre_probe_sums_the_per_token_log_odds_of_generated_tokens(tmp_path: Path):
    from sklearn.linear_model import LogisticRegression

    from lvlmlp.probing.probes import MTREProbe

    run, logits, y, n_tokens = mtre_data(tmp_path)
    X = feature_matrix(run, "multi-token", tokens=3)
    probe = MTREProbe().fit(X[:110], y[:110], spec=FeatureView(run, "multi-token", tokens=3).spec)
    # MTRE written out: one example per generated token of each train row, labelled with the row's label ...
    tok_x = [logits[i, t] for i in range(110) for t in range(n_tokens[i])]
    tok_y = [y[i] for i in range(110) for t in range(n_tokens[i])]
    head = LogisticRegression().fit(np.array(tok_x), np.array(tok_y))
    assert probe.fit_info_["n_token_rows"] == len(tok_x) == int(n_tokens[:110].sum())
    np.testing.assert_allclose(probe.coef_, head.coef_, rtol=1e-5, atol=1e-7)
    # ... and a row's score: the sum over its generated tokens of log p - log(1 - p).
    expected = []
    for i in range(110, 160):
        p = head.predict_proba(logits[i, : n_tokens[i]])[:, 1]
        expected.append(np.sum(np.log(p) - np.log1p(-p)))
    np.testing.assert_allclose(probe.decision_function(X[110:]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probe.positive_score(X[110:]), 1 / (1 + np.exp(-np.array(expected))), rtol=1e-4)
    with pytest.raises(LvlmlpError, match="mtre probe: needs multi-token features of K tokens"):
        MTREProbe().fit(X[:110, :7], y[:110])


def test_mtre_probe_mlp_head_round_trip_and_cli(tmp_path: Path, capsys):
    from lvlmlp.probing.probes import MLPProbe, MTREProbe

    run, logits, y, n_tokens = mtre_data(tmp_path)
    X = feature_matrix(run, "multi-token", tokens=3)
    probe = MTREProbe(tokens=3, head="mlp", hidden=(16, 8), epochs=30).fit(X[:110], y[:110])
    tok_x = np.array([logits[i, t] for i in range(110) for t in range(n_tokens[i])])
    tok_y = np.array([y[i] for i in range(110) for t in range(n_tokens[i])])
    head = MLPProbe(hidden=(16, 8), epochs=30, standardize=False).fit(tok_x, tok_y)
    assert np.array_equal(probe.weights_, head.weights_)
    expected = [head.decision_function(logits[i, : n_tokens[i]]).sum() for i in range(110, 160)]
    np.testing.assert_allclose(probe.decision_function(X[110:]), expected, rtol=1e-6, atol=1e-9)
    probe.save(tmp_path / "p")
    loaded = load_probe(tmp_path / "p")
    assert isinstance(loaded, MTREProbe) and np.array_equal(loaded.predict_proba(X), probe.predict_proba(X))

    assert main(["probe", "train", "--run", str(run.path), "--split", "train", "--feature", "multi-token",
                 "--tokens", "3", "--probe", "mtre", "--out", str(tmp_path / "q")]) == 0
    assert main(["probe", "eval", "--probe", str(tmp_path / "q"), "--run", str(run.path), "--split", "test",
                 "--n-boot", "10", "--out", str(tmp_path / "e")]) == 0
    trained = load_probe(tmp_path / "q")
    assert trained.head == "logistic" and trained.fit_info_["tokens"] == 3
    scores = [json.loads(line)["score"] for line in (tmp_path / "e" / "scores.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(scores, trained.positive_score(X[110:]), rtol=1e-12)
    doc = json.loads((tmp_path / "q" / "probe.json").read_text())
    doc["n_features_in"] = 17  # not a multiple of the head's 6 features
    (tmp_path / "q" / "probe.json").write_text(json.dumps(doc))
    with pytest.raises(LvlmlpError, match="a head on 6 features cannot score 17 multi-token features"):
        load_probe(tmp_path / "q")


@pytest.mark.mutation_guard
def test_mtre_refusals_head_settings_label_names_and_fit_info(tmp_path: Path):
    """Catches: MTRE's refusals (an unknown head, more than two classes, a token count below 1, generated tokens of
    one label) without their words, or K = 1 refused; the logistic head fitted without the probe's C or max_iter, the
    mlp head without its seed; label names dropped; fit_info under other keys."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from lvlmlp.probing.features import feature_matrix
    from lvlmlp.probing.probes import MLPProbe, MTREProbe

    run, logits, y, n_tokens = mtre_data(tmp_path)
    X = feature_matrix(run, "multi-token", tokens=3)  # 3 tokens of 6 logits
    with pytest.raises(LvlmlpError, match=r"^mtre probe: head 'svm' is not logistic or mlp$"):
        MTREProbe(tokens=3, head="svm").fit(X, y)
    with pytest.raises(LvlmlpError, match=r"^MTREProbe is binary but labels hold 3 classes$"):
        MTREProbe(tokens=3).fit(X, np.arange(len(y)) % 3)
    with pytest.raises(LvlmlpError, match=re.escape("mtre probe: needs multi-token features of K tokens (--feature "
                                                    "multi-token --tokens K); got 18 columns and tokens -3") + "$"):
        MTREProbe(tokens=-3).fit(X, y)
    assert MTREProbe(tokens=1).fit(X, y).fit_info_["tokens"] == 1  # one token of 18 columns is a valid K
    silent = X.copy()
    silent[y == 1] = 0  # the label-1 rows generated no token: every token row is of label 0
    with pytest.raises(LvlmlpError, match=r"^mtre probe: the generated tokens of the train rows hold one label "
                                          r"only$"):
        MTREProbe(tokens=3).fit(silent, y)
    tok_x = np.array([logits[i, t] for i in range(110) for t in range(n_tokens[i])])
    tok_y = np.array([y[i] for i in range(110) for t in range(n_tokens[i])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = MTREProbe(tokens=3, C=0.05, max_iter=2).fit(X[:110], y[:110], label_names=["no", "yes"])
        head = LogisticProbe(C=0.05, max_iter=2).fit(tok_x, tok_y)
    np.testing.assert_array_equal(probe.coef_, head.coef_)
    assert probe.label_names_ == ["no", "yes"]
    assert set(probe.fit_info_) == {"n_rows", "tokens", "n_token_rows", "head"}
    assert (probe.fit_info_["n_rows"], probe.fit_info_["n_token_rows"]) == (110, len(tok_x))
    assert probe.fit_info_["head"] == head.fit_info_
    mlp = MTREProbe(tokens=3, head="mlp", hidden=(8,), epochs=5, seed=7).fit(X[:110], y[:110])
    assert np.array_equal(mlp.weights_, MLPProbe(hidden=(8,), epochs=5, standardize=False, seed=7)
                          .fit(tok_x, tok_y).weights_)


@pytest.mark.mutation_guard
def test_mlp_probe_defaults_checks_chunks_and_row_messages(monkeypatch: pytest.MonkeyPatch):
    """Catches: MLPProbe's documented defaults changed; its range checks off by one (epochs, batch_size, patience
    of 1 and val_fraction 0 are valid, 0 and 1.0 are not) or said in other words; a one-unit layer refused; the
    spec, label names or standardisation not kept; scores computed for the first chunk only; the width and NaN
    messages without the row; MTRE's not-fitted message."""
    from lvlmlp.probing import probes
    from lvlmlp.probing.probes import MLPProbe, MTREProbe

    params = MLPProbe().get_params()
    assert {k: params[k] for k in ("hidden", "epochs", "batch_size", "lr", "weight_decay", "patience", "val_fraction",
                                   "standardize", "device", "seed", "threshold")} == {
        "hidden": (512, 256, 128), "epochs": 200, "batch_size": 256, "lr": 1e-3, "weight_decay": 1e-4,
        "patience": 10, "val_fraction": 0.1, "standardize": True, "device": "cpu", "seed": 0, "threshold": 0.5}
    X, y = binary_data(n=40, d=6)
    for bad in ({"epochs": 0}, {"batch_size": 0}, {"patience": 0}, {"val_fraction": 1.0}, {"val_fraction": -0.1}):
        values = {"epochs": 5, "batch_size": 8, "patience": 3, "val_fraction": 0.1, **bad}
        with pytest.raises(LvlmlpError, match=re.escape(
                "mlp probe: epochs, batch_size and patience must be >= 1 and val_fraction in [0, 1) (got "
                f"{values['epochs']}, {values['batch_size']}, {values['patience']}, {values['val_fraction']})") + "$"):
            MLPProbe(hidden=(4,), **values).fit(X, y)
    spec = FeatureSpec(kind="hidden", dim=6, model="m")
    probe = MLPProbe(hidden=(1,), epochs=1, batch_size=1, patience=1, val_fraction=0).fit(X, y, spec=spec,
                                                                                       label_names=["a", "b"])
    assert probe.spec_ == spec and probe.label_names_ == ["a", "b"] and probe.mean_ is not None
    scores = probe.decision_function(X)
    monkeypatch.setattr(probes, "_SCORE_CHUNK", 7)  # 40 rows in 6 chunks
    np.testing.assert_allclose(probe.decision_function(X), scores, rtol=1e-6, atol=1e-7)
    with pytest.raises(LvlmlpError, match=r"^features have 5 columns but the probe expects 6$"):
        probe.decision_function(X[:, :5])
    bad_rows = X.copy()
    bad_rows[9, 2] = np.nan
    with pytest.raises(LvlmlpError, match=r"^feature row 9 has NaN or infinite values$"):
        probe.decision_function(bad_rows)
    with pytest.raises(LvlmlpError, match=r"^MTREProbe is not fitted yet$"):
        MTREProbe(tokens=1).decision_function(X)


@pytest.mark.mutation_guard
def test_a_top_level_threshold_alone_is_no_disagreement(tmp_path: Path):
    """Catches: a probe.json whose threshold stands at the top level only (params without one) refused as if the
    two disagreed."""
    X, y = binary_data(n=40, d=6)
    LogisticProbe().fit(X, y).save(tmp_path / "p")
    path = tmp_path / "p" / "probe.json"
    doc = json.loads(path.read_text())
    del doc["params"]["threshold"]
    doc["threshold"] = 0.5
    path.write_text(json.dumps(doc))
    assert load_probe(tmp_path / "p").threshold == 0.5


@pytest.mark.mutation_guard
def test_mtre_defaults_and_width_message(tmp_path: Path):
    """Catches: MTREProbe's documented defaults changed, and its width refusal said without the numbers."""
    from lvlmlp.probing.features import feature_matrix
    from lvlmlp.probing.probes import MTREProbe

    params = MTREProbe().get_params()
    assert {k: params[k] for k in ("tokens", "head", "C", "max_iter", "hidden", "epochs", "device", "seed",
                                   "threshold")} == {"tokens": None, "head": "logistic", "C": 1.0, "max_iter": 100,
                                                     "hidden": (128, 128, 128), "epochs": 200, "device": "cpu",
                                                     "seed": 0, "threshold": 0.5}
    run, _, y, _ = mtre_data(tmp_path)
    probe = MTREProbe(tokens=3).fit(feature_matrix(run, "multi-token", tokens=3), y)
    with pytest.raises(LvlmlpError, match=r"^features have 12 columns but the probe expects 18$"):
        probe.decision_function(np.ones((2, 12), dtype=np.float32))


def _damaged_probe_message(folder: Path, doc: dict, arrays: dict, message: str, new_doc: dict | None = None,
                           new_arrays: dict | None = None) -> None:
    """Save `folder`'s probe.json / probe.safetensors as `doc` / `arrays` with one of them replaced: load_probe then
    refuses it with exactly `message` ({j}: the JSON file, {w}: the weights)."""
    from safetensors.numpy import save_file

    json_path, weights_path = folder / "probe.json", folder / "probe.safetensors"
    json_path.write_text(json.dumps(doc if new_doc is None else new_doc))
    save_file(arrays if new_arrays is None else new_arrays, str(weights_path))
    with pytest.raises(LvlmlpError) as err:
        load_probe(folder)
    assert str(err.value) == message.format(j=json_path, w=weights_path)


@pytest.mark.mutation_guard
def test_every_damaged_mtre_probe_file_gets_its_own_message(tmp_path: Path):
    """Catches: MTRE's load checks (the head's name, its weights, the logistic head's shapes, the mlp head's hidden
    sizes, the head's width against the stored features) dropped, inverted or said in other words, and a bare
    number as `hidden` reaching the shape code as a TypeError instead of the one-line refusal."""
    from safetensors.numpy import load_file, save_file

    from lvlmlp.probing.features import feature_matrix
    from lvlmlp.probing.probes import MTREProbe

    run, _, y, _ = mtre_data(tmp_path)
    X = feature_matrix(run, "multi-token", tokens=3)
    for head, kw in (("logistic", {}), ("mlp", {"hidden": (4,), "epochs": 2})):
        folder = MTREProbe(tokens=3, head=head, **kw).fit(X, y).save(tmp_path / head)
        json_path, weights_path = folder / "probe.json", folder / "probe.safetensors"
        doc, arrays = json.loads(json_path.read_text()), load_file(str(weights_path))

        expect = functools.partial(_damaged_probe_message, folder, doc, arrays)
        expect("{j}: params.head 'svm' is not logistic or mlp", {**doc, "params": {**doc["params"], "head": "svm"}})
        key = "coef" if head == "logistic" else "weights"
        expect(f"{{w}}: missing the {head} head's weights", new_arrays={k: v for k, v in arrays.items() if k != key})
        expect("{w}: a head on 6 features cannot score 17 multi-token features", {**doc, "n_features_in": 17})
        if head == "logistic":
            expect("{w}: the logistic head's coef has shape (6,), expected (1, V)", new_arrays={
                **arrays, "coef": arrays["coef"][0]})
            expect("{w}: the logistic head's coef (2, 6) / intercept must be one row", new_arrays={
                **arrays, "coef": np.vstack([arrays["coef"]] * 2)})
            expect("{w}: the logistic head's coef (1, 6) / intercept must be one row", new_arrays={
                **arrays, "intercept": np.zeros(2, np.float32)})
            expect("{w}: the logistic head's coef (1, 6) / intercept must be one row", new_arrays={
                "coef": arrays["coef"]})
        else:
            for hidden in ([0], 4, []):
                expect(f"{{j}}: params.hidden {hidden!r} must be a list of positive layer sizes",
                       {**doc, "params": {**doc["params"], "hidden": hidden}})
            expect("{w}: a head on 30 features cannot score 18 multi-token features",
                   {**doc, "params": {**doc["params"], "hidden": [1]}})
            expect("{w}: a head on 5 features cannot score 18 multi-token features", new_arrays={
                "weights": arrays["weights"][:-1]})
        json_path.write_text(json.dumps(doc))
        save_file(arrays, str(weights_path))
        assert isinstance(load_probe(folder), MTREProbe)


@pytest.mark.mutation_guard
def test_probes_fit_every_chunk_of_a_memory_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Catches: `_to_memory` copying only the first chunks of a memory map or a float64 matrix into RAM (the rows
    after them left unset) before scikit-learn fits it."""
    import lvlmlp.probing.probes as probes

    X, y = binary_data(n=60, d=5)
    path = tmp_path / "x.npy"
    np.save(path, X)
    expected = LogisticProbe().fit(X, y)
    monkeypatch.setattr(probes, "_SCORE_CHUNK", 7)  # 60 rows in 9 chunks
    for source in (np.load(path, mmap_mode="r"), X.astype(np.float64)):
        got = LogisticProbe().fit(source, y)
        np.testing.assert_allclose(got.coef_, expected.coef_, rtol=1e-12)
        np.testing.assert_allclose(got.intercept_, expected.intercept_, rtol=1e-12)


@pytest.mark.mutation_guard
def test_make_probe_lists_every_accepted_parameter_in_the_callers_words():
    """Catches: make_probe's refusal of a parameter listing the probe's accepted ones in other words (not each
    named once, joined by ", ")."""
    from lvlmlp.probing.probes import make_probe

    with pytest.raises(LvlmlpError) as err:
        make_probe("lda", {"max_iter": 3}, cli=True)
    assert str(err.value) == ("--max-iter does not apply to --probe lda (its hyper-parameters: --device, --shrinkage, "
                              "--threshold, --tol)")
    with pytest.raises(LvlmlpError) as err:
        make_probe("lda", {"max_iter": 3})
    assert str(err.value) == "probe.max_iter: not a parameter of the lda probe (parameters: device, shrinkage, " \
                             "threshold, tol)"


@pytest.mark.mutation_guard
def test_mtre_heads_on_one_logit_per_token_round_trip(tmp_path: Path):
    """Catches: an MTRE probe whose head reads one feature per token (V = 1) refused on load as too narrow."""
    from lvlmlp.probing.probes import MTREProbe

    rng = np.random.default_rng(5)
    y = np.arange(80) % 2
    X = (rng.normal(size=(80, 3)) + 0.8 * y[:, None]).astype(np.float32)  # 3 tokens of one logit each
    for head, kw in (("logistic", {}), ("mlp", {"hidden": (4,), "epochs": 3})):
        probe = MTREProbe(tokens=3, head=head, **kw).fit(X, y)
        loaded = load_probe(probe.save(tmp_path / head))
        assert isinstance(loaded, MTREProbe) and loaded.head == head
        np.testing.assert_array_equal(loaded.predict_proba(X), probe.predict_proba(X))


@pytest.mark.mutation_guard
def test_an_mtre_mlp_head_vector_of_the_wrong_length_is_refused_naming_the_file(tmp_path: Path):
    """Catches: MTRE's mlp head vector not checked against its hidden sizes on load (one parameter too many still
    gives the head 6 features by the width formula), or the refusal not naming probe.safetensors."""
    from safetensors.numpy import load_file

    from lvlmlp.probing.probes import MTREProbe

    run, _, y, _ = mtre_data(tmp_path)
    X = feature_matrix(run, "multi-token", tokens=3)  # 3 tokens of 6 logits
    folder = MTREProbe(tokens=3, head="mlp", hidden=(4,), epochs=2).fit(X, y).save(tmp_path / "p")
    json_path, weights_path = folder / "probe.json", folder / "probe.safetensors"
    doc, arrays = json.loads(json_path.read_text()), load_file(str(weights_path))
    n_params = (6 * 4 + 4) + (4 * 1 + 1)  # 6 -> 4 -> 1 logit, weights and biases
    assert arrays["weights"].shape == (n_params,)
    _damaged_probe_message(folder, doc, arrays, f"{{w}}: weights has shape ({n_params + 1},), but an MLP with hidden "
                           f"sizes [4] on 6 features and 2 classes has {n_params} parameters",
                           new_arrays={"weights": np.append(arrays["weights"], np.float32(0.5))})
