"""`signals:` in `lvlmlp run` (issue 30): the *Which signal?* table on the tiny data, end to end; a re-run does no
model work; every AUROC, interval and DeLong p recomputes from the saved per-row scores; costs are consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import norm
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import open_run
from lvlmlp.probing.metrics import bootstrap_ci
from lvlmlp.study.config import load_config
from lvlmlp.study.signals import REFERENCE
from lvlmlp.testing import tiny_manifest

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ci_signals.yaml"


@pytest.fixture(scope="module")
def experiment(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("signals_run")
    manifest = tiny_manifest(root / "data")
    out = root / "out"
    argv = ["run", str(CONFIG), "--model", str(tiny_ckpt("llava")), "--out", str(out), "--no-progress",
            "--set", f"data_root={manifest}"]
    assert main(argv) == 0
    return {"out": out, "argv": argv, "doc": json.loads((out / "report" / "metrics.json").read_text())}


def _delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong's test written out with placement values and plain loops (independent of lvlmlp.probing.compare)."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)

    def psi(x: float, z: float) -> float:
        return 1.0 if x > z else 0.5 if x == z else 0.0

    def comps(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v10 = np.array([np.mean([psi(s[i], s[j]) for j in neg]) for i in pos])
        v01 = np.array([np.mean([psi(s[i], s[j]) for i in pos]) for j in neg])
        return v10, v01

    (a10, a01), (b10, b01) = comps(a), comps(b)
    var = (np.var(a10 - b10, ddof=1) / pos.size) + (np.var(a01 - b01, ddof=1) / neg.size)
    z = (a10.mean() - b10.mean()) / np.sqrt(var)
    return float(z), float(2 * norm.sf(abs(z)))


def test_which_signal_table_recomputes_from_saved_scores(experiment: dict) -> None:
    out, doc = experiment["out"], experiment["doc"]
    res = doc["signals"]["oe"]
    names = [e["name"] for e in res["signals"]]
    assert names == [REFERENCE, "mlp on logits (token 0)", "mtre on multi-token (3 tokens)", "logistic on layer 1",
                     "logistic on hidden (final norm)", "logistic on vision (mean-pooled)", "max-prob", "seq-prob", "mean-entropy", "perplexity", "p-true"]
    records = [json.loads(line) for line in (out / "analyses" / "signals-oe.jsonl").read_text().splitlines()]
    test = open_run(out / "runs" / "oe-test")
    assert [r["id"] for r in records] == test.ids  # every test row is labelled in the tiny data
    y = np.array([r["label"] for r in records])
    ref = np.array([r["scores"][REFERENCE] for r in records])
    # the reference is the paper's probe: LogisticRegression() on the train run's first-token logits
    train = open_run(out / "runs" / "oe-train")
    sk = LogisticRegression().fit(np.asarray(train.logits(0)), train.labels.astype(int))
    np.testing.assert_allclose(ref, sk.predict_proba(np.asarray(test.logits(0)))[:, 1], atol=1e-6)
    tested = 0
    for entry in res["signals"]:
        s = np.array([np.nan if r["scores"][entry["name"]] is None else r["scores"][entry["name"]] for r in records])
        has = ~np.isnan(s)
        assert entry["n"] == int(has.sum()) and entry["n"] > 0
        assert entry["value"] == pytest.approx(roc_auc_score(y[has], s[has]), abs=1e-12)
        ci = bootstrap_ci(y[has], s[has], "auroc", n_boot=100, seed=0)
        assert entry["ci"] == pytest.approx(list(ci), abs=1e-12)
        if entry["name"] == REFERENCE:
            assert entry["delong_p"] is None
            continue
        both = has & ~np.isnan(ref)
        if np.allclose(s[both], ref[both]) or entry["delong_z"] is None:
            continue  # a signal equal to the reference has no variance to test
        z, p = _delong(y[both], s[both], ref[both])
        assert entry["delong_z"] == pytest.approx(z, rel=1e-9) and entry["delong_p"] == pytest.approx(p, rel=1e-9)
        assert entry["delta"] == pytest.approx(roc_auc_score(y[both], s[both]) - roc_auc_score(y[both], ref[both]))
        tested += 1
    assert tested == len(names) - 1  # every signal's DeLong p was checked


def test_costs(experiment: dict) -> None:
    res = experiment["doc"]["signals"]["oe"]
    test = open_run(experiment["out"] / "runs" / "oe-test")
    by = {e["name"]: e["cost"] for e in res["signals"]}
    vocab = test.logits(0).shape[1]
    hidden = test.hidden().shape[1]
    n_tok = np.clip(test.n_tokens, 1, 3)
    assert by[REFERENCE]["forward_passes"] == 1.0 and by[REFERENCE]["extra_forward_passes"] == 0.0
    assert by[REFERENCE]["bytes_per_row"] == vocab * 4  # float32 logits of one token
    assert by["mtre on multi-token (3 tokens)"]["forward_passes"] == pytest.approx(n_tok.mean())
    assert by["mtre on multi-token (3 tokens)"]["bytes_per_row"] == 3 * vocab * 4 + 4
    assert by["seq-prob"]["forward_passes"] == pytest.approx(n_tok.mean())
    assert by["logistic on layer 1"]["bytes_per_row"] == by["logistic on hidden (final norm)"]["bytes_per_row"] \
        == hidden * 4
    assert by["logistic on vision (mean-pooled)"]["bytes_per_row"] == test.vision().shape[1] * 4
    assert by["logistic on vision (mean-pooled)"]["forward_passes"] == 1.0
    timing = res["timing"]
    # each model work the signals need, timed by itself: the prefill, with states, with vision, 3 generated tokens
    assert timing["rows"] == 4 and set(timing["generate"]) == {"3"}
    assert all(timing[k] > 0 for k in ("prefill", "prefill_states", "prefill_vision"))
    work = {REFERENCE: "prefill", "mlp on logits (token 0)": "prefill", "max-prob": "prefill",
            "mtre on multi-token (3 tokens)": "generate 3 tokens", "seq-prob": "generate 3 tokens",
            "mean-entropy": "generate 3 tokens", "perplexity": "generate 3 tokens", "p-true": "generate 3 tokens",
            "logistic on layer 1": "prefill_states", "logistic on hidden (final norm)": "prefill_states",
            "logistic on vision (mean-pooled)": "prefill_vision"}
    for name, cost in by.items():
        assert cost["seconds_per_row"] > 0, name
        assert cost["model_work"] == work[name], name
        model = timing["generate"]["3"] if work[name] == "generate 3 tokens" else timing[work[name]]
        if name == "p-true":  # the answer, then the self-evaluation pass measured on every test row
            model += cost["pass_seconds_per_row"]
            assert cost["forward_passes"] == pytest.approx(np.maximum(test.n_tokens, 1).mean() + 1)
        assert cost["model_seconds_per_row"] == pytest.approx(model, rel=1e-12)
        assert cost["seconds_per_row"] == pytest.approx(model + cost["readout_seconds_per_row"], rel=1e-12)


def test_report_section(experiment: dict) -> None:
    out = experiment["out"]
    html = (out / "report" / "report.html").read_text()
    assert "Which signal?: oe" in html and "mtre on multi-token (3 tokens)" in html
    assert (out / "report" / "signals_oe.png").stat().st_size > 1000


def test_rerun_does_no_model_work(experiment: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import lvlmlp.extraction.backend

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished experiment must not load a model")

    monkeypatch.setattr(lvlmlp.extraction.backend, "Backend", forbidden)
    stamps = {p.name: p.stat().st_mtime_ns for p in (experiment["out"] / "steps").glob("*.json")}
    assert main(experiment["argv"]) == 0
    assert json.loads((experiment["out"] / "report" / "metrics.json").read_text()) == experiment["doc"]
    assert {p.name: p.stat().st_mtime_ns for p in (experiment["out"] / "steps").glob("*.json")} == stamps


def test_model_work_of_each_signal(experiment: dict) -> None:
    """What each signal's model seconds time: token k's logits need k + 1 generated tokens, the sequence estimators
    the stored tokens, the answer's readers the whole answer (max_new_tokens 3 here), a 1-token multi-token a prefill."""
    from lvlmlp.study.signals import Signal, model_work

    run = open_run(experiment["out"] / "runs" / "oe-test")
    assert run.manifest["max_new_tokens"] == 3 and run.n_logit_tokens == 3
    cases = [(Signal("a", "probe", "logits", token=0), "prefill"), (Signal("b", "probe", "logits", token=2), 3),
             (Signal("c", "probe", "softmax", token=1), 2), (Signal("d", "probe", "multi-token", tokens=1), "prefill"),
             (Signal("e", "probe", "multi-token", tokens=2), 2), (Signal("f", "probe", "layer", layer=1),
                                                                  "prefill_states"),
             (Signal("g", "probe", "vision"), "prefill_vision"), (Signal("h", "baseline", baseline="entropy"),
                                                                  "prefill"),
             (Signal("i", "baseline", baseline="perplexity"), 3), (Signal("j", "baseline", baseline="own-answer"), 3),
             (Signal("k", "p-true", baseline="p-true"), 3)]
    assert [model_work(sig, run) for sig, _ in cases] == [w for _, w in cases]


@pytest.mark.parametrize("signals, message", [
    ({"probes": [{"feature": "pixels"}]}, "config: signals.probes[0]: feature 'pixels': choose from logits, "
                                          "log_softmax, softmax, hidden, layer, multi-token"),
    ({"probes": [{"feature": "layer"}]}, "config: signals.probes[0]: feature layer needs layer: L"),
    ({"probes": [{"feature": "logits", "tokens": 3}]},
     "config: signals.probes[0]: tokens applies to feature multi-token only"),
    ({"probes": [{"feature": "logits", "probe": "forest"}]},
     "config: signals.probes[0]: probe.kind 'forest': unknown (choose from "),
    ({"probes": [{"feature": "logits", "probe": "mlp", "depth": 3}]},
     "config: signals.probes[0]: probe.depth: not a parameter of the mlp probe"),
    ({"baselines": ["max-prob", "max-prob"]}, "config: signals: 'max-prob' is listed twice"),
    ({"baselines": ["coin"]}, "config: signals.baselines[0]: "),
    ({"timing_rows": 0}, "config: signals.timing_rows: must be an integer >= 1, got 0"),
    ({"baselines": ["p-true"]}, "config: signals: p-true asks the model about its own answer: set "
                                "extract.max_new_tokens >= 1"),
    ({"probes": [{"feature": "logits", "probe": "mtre"}]},
     "config: signals.probes[0]: probe mtre reads feature multi-token (with tokens: K)"),
])
def test_config_errors(tmp_path: Path, signals: dict, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data_root": "d.jsonl", "out": "o", "signals": signals}))
    with pytest.raises(LvlmlpError) as err:
        load_config(path)
    assert str(err.value).startswith(message)
