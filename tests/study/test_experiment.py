"""`lvlmlp run`: a YAML experiment end to end on a tiny checkpoint, resume without model work, and the analyses
(token-position decay, layer sweep, CLIP baseline) recomputed independently with scikit-learn."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import lvlmlp.extraction.backend
from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import RunWriter, open_run
from lvlmlp.probing.probes import load_probe
from lvlmlp.study.analyses import Labelled, Protocol, token_decay
from lvlmlp.study.experiment import load_config, parse_set, prompts_of, split_names
from lvlmlp.tasks import get_task
from lvlmlp.testing import tiny_manifest

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ci_tiny.yaml"


def sk_auroc(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray) -> float:
    """The paper's probe, computed independently: LogisticRegression() on float32 features."""
    model = LogisticRegression().fit(train_X.astype(np.float32), train_y)
    return float(roc_auc_score(test_y, model.predict_proba(test_X.astype(np.float32))[:, 1]))


@pytest.fixture(scope="module")
def experiment(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lvlmlp.extraction.clip_features import tiny_clip

    root = tmp_path_factory.mktemp("experiment")
    manifest = tiny_manifest(root / "data")
    clip = tiny_clip(root / "clip")
    out = root / "out"
    argv = ["run", str(CONFIG), "--model", str(tiny_ckpt("llava")), "--out", str(out), "--no-progress",
            "--set", f"data_root={manifest}", "--set", f"clip.model={clip}", "--set", "clip.kinds=[image, concat]"]
    assert main(argv) == 0
    return {"out": out, "argv": argv, "doc": json.loads((out / "report" / "metrics.json").read_text())}


def _split(out: Path, name: str) -> tuple:
    train, test = open_run(out / "runs" / f"{name}-train"), open_run(out / "runs" / f"{name}-test")
    return train, test, train.labels.astype(int), test.labels.astype(int)


def test_ci_config_writes_report_with_every_analysis(experiment: dict):
    out, doc = experiment["out"], experiment["doc"]
    assert set(doc["evaluations"]) == {"oe", "oeh", "clip-image", "clip-concat"}
    for name in ("oe", "oeh"):
        train, test, y_tr, y_te = _split(out, name)
        assert len(train) == 24 and len(test) == 16 and test.n_logit_tokens == 3
        m = doc["evaluations"][name]
        assert m["auroc"] == pytest.approx(sk_auroc(train.logits(0), y_tr, test.logits(0), y_te), abs=1e-12)
        assert set(m["baselines"]) == {"own-answer", "max-prob", "entropy"}
        assert doc["prompt_comparison"][name]["value"] == m["auroc"]
        # Layer sweep: each layer's probe recomputed from the stored hidden states.
        sweep = {e["feature"]: e for e in doc["layer_sweep"][name]["entries"]}
        assert list(sweep) == ["logits (token 0)", "hidden (final norm)", "layer 0", "layer 1", "layer 2"]
        for layer in (0, 1, 2):
            expected = sk_auroc(train.layer(layer), y_tr, test.layer(layer), y_te)
            assert sweep[f"layer {layer}"]["value"] == pytest.approx(expected, abs=1e-12)
        assert sweep["hidden (final norm)"]["value"] == pytest.approx(
            sk_auroc(train.hidden(), y_tr, test.hidden(), y_te), abs=1e-12)
    for kind in ("image", "concat"):
        train = open_run(out / "runs" / f"clip-{kind}-train")
        test = open_run(out / "runs" / f"clip-{kind}-test")
        assert train.manifest["feature"] == f"clip-{kind}"
        expected = sk_auroc(train.hidden(), train.labels.astype(int), test.hidden(), test.labels.astype(int))
        assert doc["evaluations"][f"clip-{kind}"]["auroc"] == pytest.approx(expected, abs=1e-12)
    html = (out / "report" / "report.html").read_text()
    for title in ("Token-position decay: oe", "Layer sweep: oeh", "Prompt comparison", "CLIP feature baseline"):
        assert f"<h2>{title}</h2>" in html
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    # 4 evaluations x (ROC + scores) + 2 x (decay + sweep) + prompt comparison + CLIP
    assert len(images) == 14
    assert base64.b64decode(images[-1]) == (out / "report" / "clip_baseline.png").read_bytes()
    md = (out / "report" / "report.md").read_text()
    assert "| last |" in md and "![token_decay_oe](token_decay_oe.png)" in md
    # One number format in every report (fractions, 3 decimals, as the demo's table) and no Python reprs.
    assert "{'" not in md and "None" not in md and "Test rows per answer length: 1 token" in md
    intervals = re.findall(r"(\d+\.\d+) \[(\d+\.\d+), (\d+\.\d+)\]", md)
    assert intervals and all(len(x.split(".")[1]) == 3 and float(x) <= 1 for row in intervals for x in row)


def test_token_decay_of_the_run_recomputes_from_stored_logits(experiment: dict):
    out, doc = experiment["out"], experiment["doc"]
    train, test, y_tr, y_te = _split(out, "oe")
    res = doc["token_decay"]["oe"]
    assert res["k_max"] == 3 and [e["token"] for e in res["tokens"]] == [0, 1, 2]
    for k, entry in enumerate(res["tokens"]):
        tr, te = train.n_tokens > k, test.n_tokens > k
        expected = sk_auroc(train.logits(k)[tr], y_tr[tr], test.logits(k)[te], y_te[te])
        assert entry["value"] == pytest.approx(expected, abs=1e-12)
        assert (entry["n"], entry["n_short"], entry["n_train"]) == (int(te.sum()), int((~te).sum()), int(tr.sum()))


def test_second_run_does_no_model_work(experiment: dict, monkeypatch: pytest.MonkeyPatch):
    import lvlmlp.extraction.backend
    import lvlmlp.extraction.clip_features

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished experiment must not load a model")

    monkeypatch.setattr(lvlmlp.extraction.backend, "Backend", forbidden)
    monkeypatch.setattr(lvlmlp.extraction.clip_features, "ClipEncoder", forbidden)
    stamps = {p.name: p.stat().st_mtime_ns for p in (experiment["out"] / "steps").glob("*.json")}
    assert main(experiment["argv"]) == 0
    again = json.loads((experiment["out"] / "report" / "metrics.json").read_text())
    assert again == experiment["doc"]
    assert {p.name: p.stat().st_mtime_ns for p in (experiment["out"] / "steps").glob("*.json")} == stamps


def _synthetic_run(path: Path, n: int, n_tokens: np.ndarray, seed: int) -> None:
    """A run whose token-k logits carry the label with a signal that fades with k; padding rows are zero."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    logits = rng.normal(size=(n, 3, 12)).astype(np.float32)
    for k in range(3):
        logits[:, k, 0] += (1.5 - 0.5 * k) * y
    logits[np.arange(3)[None, :] >= n_tokens[:, None]] = 0.0
    meta = [{"id": f"r{i}", "label": int(y[i]), "response": "x"} for i in range(n)]
    writer = RunWriter(path, {"model": "synthetic", "dtype": "float32", "vocab_size": 12, "max_new_tokens": 3,
                              "prompt_template": None, "hidden": False, "layers": []})
    writer.append(meta, {"logits": logits, "n_tokens": n_tokens.astype(np.int32), "row_index": np.arange(n)})
    writer.close()


def test_token_decay_counts_rows_with_short_answers(tmp_path: Path):
    rng = np.random.default_rng(1)
    _synthetic_run(tmp_path / "train", 80, rng.integers(1, 4, 80), seed=2)
    _synthetic_run(tmp_path / "test", 60, rng.integers(1, 4, 60), seed=3)
    train, test = open_run(tmp_path / "train"), open_run(tmp_path / "test")
    y_tr, y_te = train.labels.astype(int), test.labels.astype(int)
    protocol = Protocol(test=Labelled.of(test), train=Labelled.of(train), n_boot=50)
    res = token_decay(protocol, {"kind": "logistic", "feature": "logits"})
    first = LogisticRegression().fit(train.logits(0), y_tr).predict_proba(test.logits(0))[:, 1]
    for k, entry in enumerate(res["tokens"]):
        tr, te = train.n_tokens > k, test.n_tokens > k
        assert entry["value"] == pytest.approx(sk_auroc(train.logits(k)[tr], y_tr[tr], test.logits(k)[te], y_te[te]),
                                               abs=1e-12)
        assert (entry["n"], entry["n_short"], entry["n_train_short"]) == (te.sum(), (~te).sum(), (~tr).sum())
        assert entry["first_token_same_rows"]["value"] == pytest.approx(roc_auc_score(y_te[te], first[te]), abs=1e-12)
        lo, hi = entry["ci"]
        assert lo <= entry["value"] <= hi
    assert res["tokens"][2]["n_short"] > 0  # the synthetic answers do end early

    def last(run):
        return np.stack([run.logits(int(t) - 1)[i] for i, t in enumerate(run.n_tokens)])

    assert res["last"]["value"] == pytest.approx(sk_auroc(last(train), y_tr, last(test), y_te), abs=1e-12)
    assert res["last"]["n"] == 60 and res["last"]["n_truncated"] == int(np.sum(test.n_tokens == 3))
    assert res["n_tokens_histogram"] == {str(t): int(np.sum(test.n_tokens == t)) for t in (1, 2, 3)}


def test_protocol_fits_each_named_feature_and_probe_once(tmp_path: Path):
    """The main evaluation, token decay and layer sweep all ask for the first-token probe; it is fitted once, while
    another token, another probe setting or an unnamed feature is fitted anew."""
    from lvlmlp.study.analyses import logits_feature, make_probe_factory

    rng = np.random.default_rng(4)
    _synthetic_run(tmp_path / "train", 40, rng.integers(1, 4, 40), seed=5)
    _synthetic_run(tmp_path / "test", 30, rng.integers(1, 4, 30), seed=6)
    protocol = Protocol(test=Labelled.of(open_run(tmp_path / "test")), train=Labelled.of(open_run(tmp_path / "train")))
    fits: list[str] = []

    def counted(cfg: dict):
        make = make_probe_factory(cfg)

        def factory():
            fits.append(make.key)
            return make()

        factory.key = make.key
        return factory

    first = protocol.score(logits_feature(0), counted({"kind": "logistic"}))
    assert protocol.score(logits_feature(0), counted({"kind": "logistic"})) is first and len(fits) == 1
    protocol.score(logits_feature(1), counted({"kind": "logistic"}))
    protocol.score(logits_feature(0), counted({"kind": "logistic", "C": 0.1}))
    unnamed = logits_feature(0)
    del unnamed.key
    again = protocol.score(unnamed, counted({"kind": "logistic"}))
    assert len(fits) == 4 and np.array_equal(again.score, first.score)


def test_config_overrides_and_errors(tmp_path: Path):
    assert parse_set(["extract.layers=[8, 16]", "probe.C=0.5", "name=x"]) == {
        "extract": {"layers": [8, 16]}, "probe": {"C": 0.5}, "name": "x"}
    cfg = load_config(CONFIG, ["extract.max_new_tokens=5", "data_root=d.jsonl"], model="m", out="o", limit=None)
    assert (cfg["extract"]["max_new_tokens"], cfg["extract"]["hidden"], cfg["model"], cfg["out"]) == (5, True, "m", "o")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata_root: d\nout: o\nmax_new_token: 3\n")
    with pytest.raises(LvlmlpError, match="unknown key 'max_new_token'"):
        load_config(bad)
    with pytest.raises(LvlmlpError, match="unknown key extract.'hiden'"):
        load_config(CONFIG, ["extract.hiden=true", "data_root=d"], model="m")
    with pytest.raises(LvlmlpError, match="'model' is required"):
        load_config(CONFIG, ["data_root=d"])


def test_cross_validation_protocol_matches_sklearn_out_of_fold(tmp_path: Path):
    """The default is the original's unshuffled StratifiedKFold (cross_validate(cv=K))."""
    from sklearn.model_selection import StratifiedKFold

    from lvlmlp.study.analyses import evaluate_feature, logits_feature, make_probe_factory

    _synthetic_run(tmp_path / "run", 50, np.full(50, 3), seed=4)
    run = open_run(tmp_path / "run")
    y, X = run.labels.astype(int), run.logits(1)
    oof = np.zeros(50)
    for train, test in StratifiedKFold(5).split(X, y):
        oof[test] = LogisticRegression().fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    result, _ = evaluate_feature(Protocol(test=Labelled.of(run), cv=5, n_boot=20), logits_feature(1),
                                 make_probe_factory({"kind": "logistic"}))
    assert result["value"] == pytest.approx(roc_auc_score(y, oof), abs=1e-12) and result["n"] == 50
    with pytest.raises(LvlmlpError, match="not a parameter"):
        make_probe_factory({"kind": "logistic", "alpha": 1})
    # The written evaluation reports the original's figure (mean of the per-fold metrics) beside the pooled one.
    from sklearn.model_selection import cross_validate

    from lvlmlp.study.analyses import main_evaluation

    metrics = main_evaluation(Protocol(test=Labelled.of(run), cv=5, n_boot=20), logits_feature(1), {},
                              {"kind": "logistic"}, [], tmp_path / "eval")
    cv = json.loads((tmp_path / "eval" / "metrics.json").read_text())["cv"]
    ref = cross_validate(LogisticRegression(), X, y, cv=5, scoring=("roc_auc", "accuracy", "f1"))
    assert cv["mean_of_folds"]["auroc"] == pytest.approx(np.mean(ref["test_roc_auc"]), abs=1e-9)
    assert cv["mean_of_folds"]["f1"] == pytest.approx(np.mean(ref["test_f1"]), abs=1e-9)
    assert metrics is not None and "pooled" in cv


def test_cross_validated_run_leads_with_the_mean_of_folds(experiment: dict, tmp_path: Path, capsys):
    """`splits: {cv: K}` (MathVista's protocol): the run's report, its CLIP table and its printed summary lead with the
    mean of the K folds (the original's figure, equal to cross_validate's), labelled, with the pooled out-of-fold
    AUROC beside it; the extraction of the train/test experiment is reused."""
    import shutil

    from sklearn.model_selection import cross_validate

    from lvlmlp.study.report import fmt_ci, fmt_value

    out = tmp_path / "out"
    shutil.copytree(experiment["out"], out)
    capsys.readouterr()
    assert main([*experiment["argv"], "--out", str(out), "--set", "prompt=[oe]",
                 "--set", "splits={cv: 4, split: test}"]) == 0
    doc = json.loads((out / "report" / "metrics.json").read_text())
    m = doc["evaluations"]["oe"]
    _, test, _, y = _split(out, "oe")
    ref = cross_validate(LogisticRegression(), test.logits(0).astype(np.float32), y, cv=4, scoring="roc_auc")
    mean = m["cv"]["mean_of_folds"]["auroc"]
    assert mean == pytest.approx(float(np.mean(ref["test_score"])), abs=1e-9)
    printed = capsys.readouterr().out
    assert f"oe: auroc {mean:.3f} (mean of 4 folds; pooled out-of-fold {m['auroc']:.3f}) (n=16)" in printed
    summary = f"{fmt_value(mean)} (mean of 4 folds); pooled out-of-fold {fmt_ci(m['auroc'], m['auroc_ci'])}"
    md = (out / "report" / "report.md").read_text()
    assert f"| jsonl, prompt oe | 16 | {summary} |" in md  # the run's evaluations are named with its task
    assert f"| first-token logits (LogisticProbe) | {summary} | 16 |" in md  # the CLIP section's headline
    assert "With 4-fold cross-validation the figures are pooled out-of-fold AUROCs" in md  # token decay, layers


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_run.py (marked `mutation_guard`):
# Guards of `lvlmlp run`: a changed setting redoes exactly the steps that depend on it, an interrupted run resumes
# without redoing committed work, and every shipped config loads and validates. Each test names the breakage it
# catches (checked by hand once).

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# The CI config trimmed to one prompt, no layers and no CLIP: the cheapest experiment with every step kind.
SETS = ["prompt=oe", "extract.layers=[]", "extract.max_new_tokens=2", "n_boot=20", "clip=null"]


def _manifest(root: Path) -> Path:
    rng = np.random.default_rng(4)
    (root / "img").mkdir(parents=True)
    lines = []
    for split, n in (("train", 14), ("test", 10)):
        for i in range(n):
            label = i % 2
            px = np.clip((140 if label else 110) + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "img" / f"{split}{i}.png")
            lines.append({"id": f"{split}-{i}", "image": f"img/{split}{i}.png", "question": "is it bright ?",
                          "label": label, "split": split})
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "m.jsonl"


@pytest.fixture(scope="module")
def base(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_guard")
    manifest = _manifest(root / "data")
    argv = ["run", str(CONFIGS / "ci_tiny.yaml"), "--model", str(tiny_ckpt("llava")), "--no-progress",
            "--set", f"data_root={manifest}", *[x for s in SETS for x in ("--set", s)]]
    out = root / "out"
    assert main([*argv, "--out", str(out)]) == 0
    return {"argv": argv, "out": out, "doc": json.loads((out / "report" / "metrics.json").read_text())}


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


@pytest.mark.mutation_guard
def test_changed_probe_setting_redoes_probe_and_report_not_extraction(base, monkeypatch):
    """Catches: resumed steps that ignore their settings (a cached probe kept after --set probe.C=0.5), or a probe
    change that re-extracts."""
    out = base["out"]
    runs_before = _mtimes(out, "runs/*/*.npy")
    assert len(runs_before) >= 4 and "evals/oe/metrics.json" in _mtimes(out, "evals/*/metrics.json")

    def forbidden(*a, **k):
        raise AssertionError("a probe setting must not load the model again")

    monkeypatch.setattr(lvlmlp.extraction.backend, "Backend", forbidden)
    assert main([*base["argv"], "--out", str(out), "--set", "probe.C=0.5"]) == 0
    assert _mtimes(out, "runs/*/*.npy") == runs_before  # no extraction redone
    train, test = open_run(out / "runs" / "oe-train"), open_run(out / "runs" / "oe-test")
    ref = LogisticRegression(C=0.5).fit(np.asarray(train.logits(0), np.float32), train.labels.astype(int))
    probe = load_probe(out / "probes" / "oe")
    assert probe.C == 0.5
    np.testing.assert_allclose(probe.predict_proba(test.logits(0)), ref.predict_proba(test.logits(0)), atol=1e-6)
    doc = json.loads((out / "report" / "metrics.json").read_text())
    assert doc["config"]["probe"]["C"] == 0.5
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(test.labels.astype(int), ref.predict_proba(test.logits(0))[:, 1])
    assert doc["evaluations"]["oe"]["auroc"] == pytest.approx(auroc, abs=1e-9)
    # And back: the original setting gives the original numbers again (recomputed, not a stale file).
    assert main([*base["argv"], "--out", str(out)]) == 0
    again = json.loads((out / "report" / "metrics.json").read_text())
    assert again["evaluations"]["oe"]["auroc"] == pytest.approx(base["doc"]["evaluations"]["oe"]["auroc"], abs=1e-9)


@pytest.mark.mutation_guard
def test_interrupted_run_resumes_without_redoing_committed_extraction(base, tmp_path, monkeypatch):
    """Catches: a resumed `lvlmlp run` re-extracting a finished split or the committed rows of the cut one."""
    out = tmp_path / "out"
    real = lvlmlp.extraction.backend.Backend.generate
    calls: list[int] = []

    def dies_in_test_split(self, batch, **kw):
        if len(calls) == 3:  # train (14 rows) = batches of 8 + 6; the third batch is the test split's first
            raise KeyboardInterrupt
        calls.append(batch["input_ids"].shape[0])
        return real(self, batch, **kw)

    monkeypatch.setattr(lvlmlp.extraction.backend.Backend, "generate", dies_in_test_split)
    assert main([*base["argv"], "--out", str(out), "--set", "batch_size=7"]) == 130
    assert calls == [7, 7, 7]  # train done (2 batches), one test batch was running
    assert (out / "runs" / "oe-train" / "logits.npy").is_file() and not (out / "report" / "metrics.json").exists()

    seen: list[int] = []

    def count(self, batch, **kw):
        seen.append(batch["input_ids"].shape[0])
        return real(self, batch, **kw)

    monkeypatch.setattr(lvlmlp.extraction.backend.Backend, "generate", count)
    train_stamp = _mtimes(out, "runs/oe-train/*.npy")
    assert main([*base["argv"], "--out", str(out), "--set", "batch_size=7"]) == 0
    assert _mtimes(out, "runs/oe-train/*.npy") == train_stamp
    assert sum(seen) == 10  # the test split's rows only (its first batch died before anything was committed)
    doc = json.loads((out / "report" / "metrics.json").read_text())
    want = copy.deepcopy(base["doc"]["evaluations"]["oe"])
    assert doc["evaluations"]["oe"]["auroc"] == pytest.approx(want["auroc"], abs=1e-6)
    assert doc["evaluations"]["oe"]["n"] == want["n"] == 10


@pytest.mark.mutation_guard
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path: Path):
    """Catches: a shipped config with an unknown key, a task or prompt style that does not exist, bad splits."""
    ci = path.stem.startswith("ci_")  # the CI configs (ci_tiny, ci_signals) take the model and data as flags
    cfg = load_config(path, ["data_root=somewhere"] if ci else [], model="tiny" if ci else None)
    task = get_task(cfg["task"])
    assert cfg["name"] == path.stem and cfg["model"]
    prompts = prompts_of(cfg)
    assert prompts and all(t is None or "{question}" in t for _, t in prompts)
    splits = split_names(cfg)
    assert 1 <= len(splits) <= 2
    if not ci:
        assert path.stem.split("_")[0] == cfg["task"] == task.name
