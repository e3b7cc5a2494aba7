"""The `mlp` probe: seeded, non-linear where logistic is not, as good as logistic on linear data, early stopping
that keeps the best epoch, saved and loaded without pickle, and trained from the command line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.probing.features import FeatureView, feature_matrix
from lvlmlp.probing.mlp import validation_split
from lvlmlp.probing.probes import PROBES, LogisticProbe, MLPProbe, load_probe
from tests.probing.test_probes import make_run

SMALL = {"hidden": (32, 16), "epochs": 150, "patience": 15}  # small enough for one CPU thread


def xor_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Label 1 where the first two features have the same sign: no line separates it (plus 3 noise columns)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 5)).astype(np.float32)
    return X, (X[:, 0] * X[:, 1] > 0).astype(np.int64)


def linear_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 10)).astype(np.float32)
    w = np.random.default_rng(99).normal(size=10)
    return X, (X @ w + rng.normal(size=n) * 1.5 > 0).astype(np.int64)


def test_mlp_is_registered_and_seeded_runs_are_equal():
    assert PROBES["mlp"] is MLPProbe and MLPProbe().hidden == (512, 256, 128)
    X, y = xor_data(300, 0)
    a = MLPProbe(hidden=(32, 16), epochs=30, seed=3).fit(X, y)
    b = MLPProbe(hidden=(32, 16), epochs=30, seed=3).fit(X, y)
    c = MLPProbe(hidden=(32, 16), epochs=30, seed=4).fit(X, y)
    assert np.array_equal(a.weights_, b.weights_) and a.fit_info_ == b.fit_info_
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    assert not np.array_equal(a.weights_, c.weights_)
    default = MLPProbe(epochs=2).fit(X, y)  # HALP's 512-256-128 network, one output logit
    assert default.weights_.size == 5 * 512 + 512 + 512 * 256 + 256 + 256 * 128 + 128 + 128 + 1


def test_mlp_separates_xor_that_logistic_cannot():
    X, y = xor_data(800, 1)
    Xt, yt = xor_data(400, 2)
    mlp = MLPProbe(**SMALL).fit(X, y)
    logistic = LogisticProbe().fit(X, y)
    assert roc_auc_score(yt, mlp.positive_score(Xt)) > 0.95
    assert roc_auc_score(yt, logistic.positive_score(Xt)) < 0.6
    assert (mlp.predict(Xt) == yt).mean() > 0.9


def test_mlp_matches_logistic_on_linear_data_within_noise():
    X, y = linear_data(1000, 3)
    Xt, yt = linear_data(1000, 4)
    mlp = roc_auc_score(yt, MLPProbe(**SMALL).fit(X, y).positive_score(Xt))
    logistic = roc_auc_score(yt, LogisticProbe().fit(X, y).positive_score(Xt))
    assert logistic > 0.85
    assert abs(mlp - logistic) < 0.02


def test_early_stopping_keeps_the_best_epoch_on_the_validation_split():
    # Labels unrelated to the features: the validation loss soon rises and training stops.
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    y = rng.integers(0, 2, 300)
    probe = MLPProbe(hidden=(64,), epochs=500, patience=5, lr=1e-2, val_fraction=0.2, seed=1).fit(X, y)
    info = probe.fit_info_
    assert info["epochs_run"] < 500 and info["epochs_run"] == info["best_epoch"] + 5
    fit_rows, val_rows = validation_split(y, 0.2, 1)
    assert (info["n_fit"], info["n_val"]) == (fit_rows.size, val_rows.size) == (240, 60)
    assert [int((y[val_rows] == c).sum()) for c in (0, 1)] == [round(0.2 * (y == c).sum()) for c in (0, 1)]
    # The kept weights are those of the best epoch: their validation loss, recomputed here, is the one recorded.
    p = expit(probe.decision_function(X[val_rows]))
    yv = y[val_rows]
    bce = -np.mean(yv * np.log(p) + (1 - yv) * np.log(1 - p))
    assert bce == pytest.approx(info["best_val_loss"], rel=1e-5)


def test_mlp_multiclass_and_refusals():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 4, 600)
    X = rng.normal(size=(600, 6)).astype(np.float32) + 3 * np.eye(4, 6, dtype=np.float32)[y]
    probe = MLPProbe(**SMALL).fit(X, y)
    assert probe.decision_function(X).shape == (600, 4) and probe.weights_.size == 6 * 32 + 32 + 32 * 16 + 16 + 16 * 4 + 4
    assert (probe.predict(X) == y).mean() > 0.9
    np.testing.assert_allclose(probe.predict_proba(X).sum(axis=1), 1.0, atol=1e-9)
    with pytest.raises(LvlmlpError, match="class index 1 has 1 row; early stopping needs 2\\+ rows of each class"):
        MLPProbe(**SMALL).fit(X[:5], np.array([0, 1, 0, 0, 0]))
    with pytest.raises(LvlmlpError, match=r"hidden \[32, 0\] must be one or more positive layer sizes"):
        MLPProbe(hidden=(32, 0)).fit(X, y)
    with pytest.raises(LvlmlpError, match="MLPProbe is not fitted yet"):
        MLPProbe().predict_proba(X)


def test_mlp_save_load_round_trip_is_exact_and_pickle_free(tmp_path: Path, monkeypatch):
    X, y = xor_data(300, 7)
    probe = MLPProbe(**SMALL).fit(X, y)
    probe.save(tmp_path / "p")

    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded = load_probe(tmp_path / "p")
    assert isinstance(loaded, MLPProbe) and tuple(loaded.hidden) == (32, 16)
    assert np.array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    assert loaded.fit_info_ == json.loads(json.dumps(probe.fit_info_))
    doc = json.loads((tmp_path / "p" / "probe.json").read_text())
    doc["params"]["hidden"] = [32, 8]  # the stored vector no longer fits the network described
    (tmp_path / "p" / "probe.json").write_text(json.dumps(doc))
    with pytest.raises(LvlmlpError, match=r"probe.safetensors: weights has shape \(737,\), but an MLP with hidden "
                       r"sizes \[32, 8\] on 5 features and 2 classes has 465 parameters"):
        load_probe(tmp_path / "p")
    doc["params"]["hidden"] = [32, "8"]
    (tmp_path / "p" / "probe.json").write_text(json.dumps(doc))
    with pytest.raises(LvlmlpError, match=r"probe.json: params.hidden \[32, '8'\] must be a list of positive layer"):
        load_probe(tmp_path / "p")


def test_probe_train_cli_mlp_then_eval(tmp_path: Path, capsys):
    X, y = xor_data(240, 8)
    logits = np.zeros((240, 1, 5), dtype=np.float32)
    logits[:, 0] = X
    meta = [{"id": f"r{i}", "label": int(y[i]), "split": "train" if i < 180 else "test"} for i in range(240)]
    run = make_run(tmp_path / "run", logits, meta)
    assert main(["probe", "train", "--run", str(run.path), "--split", "train", "--probe", "mlp", "--hidden", "32,16",
                 "--epochs", "150", "--patience", "15", "--val-fraction", "0.2", "--seed", "2",
                 "--out", str(tmp_path / "p")]) == 0
    probe = load_probe(tmp_path / "p")
    direct = MLPProbe(hidden=(32, 16), epochs=150, patience=15, val_fraction=0.2, seed=2)
    direct.fit(feature_matrix(run, rows=np.arange(180)), y[:180])
    assert np.array_equal(probe.weights_, direct.weights_)
    assert main(["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(run.path), "--split", "test",
                 "--n-boot", "10", "--out", str(tmp_path / "e")]) == 0
    scores = [json.loads(line)["score"] for line in (tmp_path / "e" / "scores.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(scores, direct.positive_score(FeatureView(run)[np.arange(180, 240)]), rtol=1e-12)
    capsys.readouterr()
    assert main(["probe", "train", "--run", str(run.path), "--probe", "logistic", "--hidden", "8",
                 "--out", str(tmp_path / "q")]) == 2
    assert "--hidden does not apply to --probe logistic" in capsys.readouterr().err
    # the flag's type refuses the value before any work: one line, status 2
    assert main(["probe", "train", "--run", str(run.path), "--probe", "mlp", "--hidden", "8,x", "--out",
                 str(tmp_path / "r")]) == 2
    assert "'8,x': expected sizes such as 512,256,128" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_mlp_trains_on_gpu_like_on_cpu():
    X, y = xor_data(800, 1)
    Xt, yt = xor_data(400, 2)
    gpu = MLPProbe(**SMALL, device="cuda").fit(X, y)
    cpu = MLPProbe(**SMALL).fit(X, y)
    # Other kernels: not the same floats, the same quality.
    assert abs(roc_auc_score(yt, gpu.positive_score(Xt)) - roc_auc_score(yt, cpu.positive_score(Xt))) < 0.02


@pytest.mark.mutation_guard
def test_mlp_weights_file_without_its_weights_is_refused_naming_it(tmp_path: Path):
    """Catches: an MLP probe folder whose probe.safetensors lacks the `weights` vector refused without naming the
    file (or in other words)."""
    from safetensors.numpy import load_file, save_file

    X, y = linear_data(60, 0)
    folder = MLPProbe(hidden=(4,), epochs=2).fit(X, y).save(tmp_path / "p")
    weights_path = folder / "probe.safetensors"
    arrays = load_file(str(weights_path))
    assert set(arrays) == {"weights", "mean", "scale"}
    save_file({k: v for k, v in arrays.items() if k != "weights"}, str(weights_path))
    with pytest.raises(LvlmlpError) as err:
        load_probe(folder)
    assert str(err.value) == f"{weights_path}: missing weights"
