"""`multi-token` features (MTRE's input): the first K tokens' raw logits side by side, rows of varying length
zero-padded and counted, read through the CLI like any feature view."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import RunWriter, open_run
from lvlmlp.probing.features import FeatureSpec, FeatureView, feature_matrix, short_rows, valid_rows
from lvlmlp.probing.probes import load_probe
from tests.probing.test_probes import make_run

N_TOKENS = [3, 1, 0, 2, 3, 3, 1, 2]


def varying_run(tmp_path: Path, n_tokens=N_TOKENS, k: int = 3, v: int = 5):
    """Rows that generated 0..k tokens; the stored logits past each row's end hold numbers, not zeros (a view must
    not read them: the tokens a row never generated are zeros)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(n_tokens), k, v)).astype(np.float32)
    meta = [{"id": f"r{i}", "label": i % 2} for i in range(len(n_tokens))]
    return make_run(tmp_path / "run", logits, meta, n_tokens=n_tokens), logits


def direct(logits: np.ndarray, n_tokens: list[int], k: int, rows: list[int]) -> np.ndarray:
    """The features written out: for each row, token t's logits when the row generated it, else zeros, in order."""
    v = logits.shape[2]
    out = []
    for i in rows:
        parts = [logits[i, t] if t < n_tokens[i] else np.zeros(v, dtype=np.float32) for t in range(k)]
        out.append(np.concatenate(parts))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_multi_token_features_equal_a_direct_computation_on_rows_of_varying_length(tmp_path: Path, k):
    run, logits = varying_run(tmp_path)
    keep = np.flatnonzero(valid_rows(run, "multi-token"))
    assert keep.tolist() == [0, 1, 3, 4, 5, 6, 7]  # only the row without any token is left out
    got = feature_matrix(run, "multi-token", tokens=k, rows=keep)
    assert got.shape == (7, k * 5) and got.dtype == np.float32
    assert np.array_equal(got, direct(logits, N_TOKENS, k, keep.tolist()))
    order = [7, 1, 4]  # any order of rows, as the caller asks
    assert np.array_equal(FeatureView(run, "multi-token", tokens=k)[order], direct(logits, N_TOKENS, k, order))
    assert short_rows(run, keep, k) == sum(0 < N_TOKENS[i] < k for i in keep)


def test_multi_token_spec_and_refusals(tmp_path: Path):
    run, _ = varying_run(tmp_path)
    view = FeatureView(run, "multi-token", tokens=2)
    assert view.spec == FeatureSpec(kind="multi-token", token=0, dim=10, model="tiny/model", tokens=2)
    assert view.spec.describe() == "multi-token of tokens 0..1, dim 10, model 'tiny/model'"
    assert FeatureSpec.from_dict(view.spec.to_dict()) == view.spec
    assert "tokens" not in FeatureView(run).spec.to_dict()  # other kinds' specs are written as before
    assert FeatureSpec(kind="multi-token", tokens=3, dim=15).mismatches(view.spec) == ["dim 10 (probe expects 15)",
                                                                                       "tokens 2 (probe expects 3)"]
    with pytest.raises(LvlmlpError, match="row 'r2': generated no token, so it has no multi-token features"):
        view[[0, 2]]
    with pytest.raises(LvlmlpError, match=r"--tokens 4: .* keeps the logits of 3 generated token\(s\)"):
        FeatureView(run, "multi-token", tokens=4)
    with pytest.raises(LvlmlpError, match="--feature multi-token needs --tokens K"):
        FeatureView(run, "multi-token")
    with pytest.raises(LvlmlpError, match="--tokens applies to --feature multi-token only"):
        FeatureView(run, "logits", tokens=2)


def test_probe_train_and_eval_multi_token_count_short_rows(tmp_path: Path, capsys, caplog):
    rng = np.random.default_rng(1)
    n, k, v = 120, 3, 6
    y = np.arange(n) % 2
    n_tokens = rng.integers(0, k + 1, n)
    logits = rng.normal(size=(n, k, v)).astype(np.float32)
    logits[:, 2, 0] += 2.0 * y  # the signal sits in the third token only
    meta = [{"id": f"r{i}", "label": int(y[i]), "split": "train" if i < 80 else "test"} for i in range(n)]
    run = make_run(tmp_path / "run", logits, meta, n_tokens=n_tokens)
    with caplog.at_level(logging.WARNING):
        assert main(["probe", "train", "--run", str(run.path), "--split", "train", "--feature", "multi-token",
                     "--tokens", "3", "--out", str(tmp_path / "p")]) == 0
    train_rows = np.flatnonzero(n_tokens[:80] > 0)
    n_short = int(np.sum((n_tokens[:80] > 0) & (n_tokens[:80] < 3)))
    probe = load_probe(tmp_path / "p")
    assert probe.spec_.kind == "multi-token" and probe.spec_.tokens == 3 and probe.n_features_in_ == 18
    assert probe.fit_info_["n_rows"] == train_rows.size and probe.fit_info_["n_short"] == n_short
    assert f"{n_short} of {train_rows.size} row(s) of {run.path} generated fewer than 3 tokens" in caplog.text
    from sklearn.linear_model import LogisticRegression

    ref = LogisticRegression().fit(direct(logits, n_tokens.tolist(), 3, train_rows.tolist()), y[train_rows])
    np.testing.assert_allclose(probe.coef_, ref.coef_, rtol=1e-6, atol=1e-8)

    assert main(["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(run.path), "--split", "test",
                 "--n-boot", "10", "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    test_tokens = n_tokens[80:]
    assert metrics["n_skipped"] == int(np.sum(test_tokens == 0))  # no token at all: skipped, counted
    assert metrics["n_short"] == int(np.sum((test_tokens > 0) & (test_tokens < 3)))  # kept, zero-padded, counted
    assert metrics["n_scored"] == int(np.sum(test_tokens > 0))
    capsys.readouterr()
    assert main(["probe", "train", "--run", str(run.path), "--feature", "multi-token", "--out", str(tmp_path / "q")]) == 2
    assert "--feature multi-token needs --tokens K (1 or more), got None" in capsys.readouterr().err
    assert main(["probe", "train", "--run", str(run.path), "--feature", "multi-token", "--tokens", "2", "--token", "1",
                 "--out", str(tmp_path / "q")]) == 2
    assert "--token 1 does not apply to --feature multi-token" in capsys.readouterr().err
    assert open_run(run.path).n_tokens.tolist() == n_tokens.tolist()


@pytest.mark.mutation_guard
def test_multi_token_rows_are_float32_nan_rows_are_named_and_rows_without_tokens_are_not_short(tmp_path: Path):
    """Catches: a multi-token view handing back float64 rows (every view's rows are float32), its NaN check taken
    over the whole block (naming the first row read, not the bad one) or without the row, rows that generated no
    token counted as short (or no rows at all failing), a multi-token spec read without its count described as other than its first token."""
    run, logits = varying_run(tmp_path)
    for k in (1, 2, 3):
        assert FeatureView(run, "multi-token", tokens=k)[[0, 3]].dtype == np.float32
        assert short_rows(run, np.arange(len(N_TOKENS)), k) == sum(0 < n < k for n in N_TOKENS)
        assert short_rows(run, [], k) == 0  # no rows selected (a Python list: read as indices, not floats)
    assert FeatureSpec(kind="multi-token", dim=5, model="m").describe() == "multi-token of tokens 0..0, dim 5, model 'm'"
    bad = logits.copy()
    bad[3, 1, 2] = np.nan  # row r3 generated 2 tokens: token 1 is its own
    bad[1, 2, 0] = np.inf  # row r1 generated 1 token: its token 2 is never read
    meta = [{"id": f"r{i}", "label": i % 2} for i in range(len(N_TOKENS))]
    nan_run = make_run(tmp_path / "nan", bad, meta, n_tokens=N_TOKENS)
    view = FeatureView(nan_run, "multi-token", tokens=3)
    with pytest.raises(LvlmlpError, match=re.escape(f"{nan_run.path}: row 'r3' has NaN or infinite multi-token "
                                                    "features") + "$"):
        view[[0, 1, 3, 4]]
    assert np.array_equal(view[[1, 0]], direct(bad, N_TOKENS, 3, [1, 0]))


@pytest.mark.mutation_guard
def test_vision_view_reads_the_runs_vision_features(tmp_path: Path):
    """Catches: `--feature vision` reading another array (or none) than the run's vision.npy."""
    rng = np.random.default_rng(4)
    n, v, d = 5, 6, 7
    settings = {"model": "tiny/model", "family": "test", "dtype": "float32", "vocab_size": v, "prompt_template": None,
                "max_new_tokens": 0, "hidden": False, "layers": [], "vision": True}
    writer = RunWriter(tmp_path / "run", settings, shard_size=64)
    vision = rng.normal(size=(n, d)).astype(np.float32)
    writer.append([{"id": f"r{i}", "label": i % 2} for i in range(n)],
                  {"logits": rng.normal(size=(n, 1, v)).astype(np.float32), "row_index": np.arange(n),
                   "n_tokens": np.ones(n), "vision": vision})
    run = writer.close()
    assert np.array_equal(feature_matrix(run, "vision"), vision)
    view = FeatureView(run, "vision")
    assert np.array_equal(view[[4, 0]], vision[[4, 0]])
    assert view.spec == FeatureSpec(kind="vision", token=0, dim=d, model="tiny/model")
