"""Metrics against scikit-learn and hand counts; baselines; `probe eval` output recomputes from its scores."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import RunWriter
from lvlmlp.probing.baselines import AnswerRule, answer_token_ids, baseline_scores, parse_answer_rule
from lvlmlp.probing.metrics import (
    attack_success_rate,
    binary_metrics,
    bootstrap_ci,
    cross_val_scores,
    pope_metrics,
    pope_metrics_by_category,
    top1_accuracy,
)
from lvlmlp.probing.probes import LogisticProbe


def make_run(path: Path, logits: np.ndarray, meta: list[dict], model: str = "tiny/model"):
    n, v = logits.shape
    settings = {"model": model, "family": "test", "dtype": "float32", "vocab_size": v, "prompt_template": None,
                "max_new_tokens": 1, "hidden": False, "layers": []}
    writer = RunWriter(path, settings)
    writer.append(meta, {"logits": logits[:, None, :].astype(np.float32), "n_tokens": np.ones(n, dtype=np.int64),
                         "row_index": np.arange(n)})
    return writer.close()


def scores(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, 1 / (1 + np.exp(-(y - 0.5) * 2 - rng.normal(size=n)))


def test_binary_metrics_equal_sklearn():
    y, s = scores()
    m = binary_metrics(y, s, threshold=0.6)
    assert m["auroc"] == roc_auc_score(y, s)
    assert m["auprc"] == average_precision_score(y, s)
    assert m["accuracy"] == accuracy_score(y, s >= 0.6)
    assert m["f1"] == f1_score(y, s >= 0.6)
    assert m["n"] == 400 and m["n_positive"] == int(y.sum())
    assert binary_metrics(np.ones(5, int), np.linspace(0, 1, 5))["auroc"] is None
    with pytest.raises(LvlmlpError, match="labels 0/1"):
        binary_metrics([0, 2], [0.1, 0.2])


def test_pope_metrics_equal_hand_confusion_matrix():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1])
    p = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 0])
    # TP=3 (rows 0,2,7), FN=2 (1,9), FP=2 (3,6), TN=3 (4,5,8)
    m = pope_metrics(y, p)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 2, 2, 3)
    assert m["accuracy"] == 6 / 10 and m["precision"] == 3 / 5 and m["recall"] == 3 / 5
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.6 / 1.2) and m["yes_ratio"] == 5 / 10
    by = pope_metrics_by_category(y, p, ["adv"] * 5 + ["rand"] * 5)
    assert by["adv"]["accuracy"] == 3 / 5 and by["rand"]["yes_ratio"] == 2 / 5 and by["all"] == m


def test_attack_success_rate_per_scenario_and_average():
    y = np.array([0, 0, 0, 1, 0, 0, 1])
    s = np.array([0.9, 0.1, 0.5, 0.9, 0.2, 0.3, 0.1])
    scen = ["A", "A", "A", "A", "B", "B", "C"]
    asr = attack_success_rate(y, s, scen)
    assert asr["per_scenario"] == {"A": 2 / 3, "B": 0.0}  # C has no unsafe row
    assert asr["average"] == pytest.approx(1 / 3) and asr["n_unsafe"] == {"A": 3, "B": 2}


def test_top1_accuracy():
    assert top1_accuracy([3, 1, 2, 2], [3, 1, 0, 2]) == 0.75


def test_bootstrap_intervals_contain_estimate_shrink_with_n_and_are_seeded():
    widths = []
    for n in (100, 1600):
        y, s = scores(n, seed=3)
        lo, hi = bootstrap_ci(y, s, "auroc", n_boot=300)
        assert lo <= roc_auc_score(y, s) <= hi
        alo, ahi = bootstrap_ci(y, s, "accuracy", n_boot=300)
        assert alo <= accuracy_score(y, s >= 0.5) <= ahi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    assert bootstrap_ci(y, s, n_boot=50, seed=7) == bootstrap_ci(y, s, n_boot=50, seed=7)


def test_bootstrap_auroc_interval_equals_resampling_through_roc_auc_score():
    """The fast per-resample AUROC (ranks computed once) against scikit-learn on every resample, ties included,
    and resamples with one class dropped in both."""
    rng = np.random.default_rng(5)
    for n in (6, 40, 500):
        y = rng.integers(0, 2, n)
        s = np.round(rng.random(n), 1)  # many ties
        draws = np.random.default_rng(11)
        reference = []
        for _ in range(200):
            idx = draws.integers(0, n, n)
            if np.unique(y[idx]).size == 2:
                reference.append(roc_auc_score(y[idx], s[idx]))
        lo, hi = bootstrap_ci(y, s, "auroc", n_boot=200, seed=11)
        ref_lo, ref_hi = np.percentile(reference, [2.5, 97.5])
        assert lo == pytest.approx(ref_lo, abs=1e-12) and hi == pytest.approx(ref_hi, abs=1e-12)


def test_cross_val_scores_are_out_of_fold_stratified_10_fold():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32)
    y = (X[:, 0] + rng.normal(size=120) > 0).astype(int)
    oof = cross_val_scores(LogisticProbe, X, y, n_splits=10, seed=1, shuffle=True)
    expected = np.zeros(120)
    for train, test in StratifiedKFold(10, shuffle=True, random_state=1).split(X, y):
        expected[test] = LogisticRegression().fit(X[train], y[train]).predict_proba(X[test])[:, 1]
    assert np.abs(oof - expected).max() < 1e-6
    with pytest.raises(LvlmlpError, match="at least 10 rows each"):
        cross_val_scores(LogisticProbe, X[:15], y[:15])


# ------------------------------------------------------------------ baselines
def test_answer_rules():
    assert AnswerRule().score("Unanswerable.") == 0 and AnswerRule().score("A red car.") == 1
    assert AnswerRule().score("I'm sorry, I cannot help with that.") == 0
    yes = parse_answer_rule("yes")
    assert yes.score(" Yes, there is a dog.") == 1 and yes.score("No.") == 0 and yes.score("Yesterday") == 0
    kw = parse_answer_rule("keyword=unknown,unclear")
    assert kw.score("It is UNCLEAR") == 0 and kw.score("sorry") == 1
    with pytest.raises(LvlmlpError, match="own-answer:maybe"):
        parse_answer_rule("maybe")


class SpaceTokenizer:
    """Byte-level-BPE-like: 'Yes' and ' Yes' are different tokens; ' No' is a bare space token then 'No'."""

    vocab = {"Yes": 3, " Yes": 4, "No": 5, " ": 6, "Un": 7, "answerable": 8}

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False  # a continuation: no BOS
        if text == " No":
            return [6, 5]
        if text.strip() == "Unanswerable":
            return [7, 8]
        return [self.vocab[text]]

    def decode(self, ids):
        inv = {v: k for k, v in self.vocab.items()}
        return "".join(inv[i] for i in ids)


def test_answer_token_ids_try_both_spellings_and_skip_bare_spaces():
    tok = SpaceTokenizer()
    assert answer_token_ids(tok, "Yes") == [3, 4]
    assert answer_token_ids(tok, "No") == [5]
    assert answer_token_ids(tok, "Unanswerable") == [7]


def test_distribution_and_answer_baselines(tmp_path: Path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 10)).astype(np.float32) * 3
    meta = [{"id": f"r{i}", "response": r} for i, r in enumerate(["Yes", "No", "unanswerable", "Yes!", "no"])]
    run = make_run(tmp_path / "run", logits, meta)
    p = softmax(logits.astype(np.float64), axis=1)
    np.testing.assert_allclose(baseline_scores(run, "max-prob"), p.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(baseline_scores(run, "entropy"), (p * np.log(p)).sum(axis=1), rtol=1e-4)
    tok = SpaceTokenizer()
    np.testing.assert_allclose(baseline_scores(run, "token-prob:Yes", tokenizer=tok), p[:, 3] + p[:, 4], rtol=1e-5)
    np.testing.assert_allclose(baseline_scores(run, "token-prob:!No", tokenizer=tok), 1 - p[:, 5], rtol=1e-5)
    assert baseline_scores(run, "own-answer:yes").tolist() == [1, 0, 0, 1, 0]
    assert baseline_scores(run, "own-answer", rows=[2, 3]).tolist() == [0, 1]
    with pytest.raises(LvlmlpError, match="unknown baseline"):
        baseline_scores(run, "no-such-baseline")


def test_own_answer_task_reads_answers_by_the_tasks_rule_binary_and_multiclass(tmp_path: Path):
    """`own-answer:task`: each response read by the task's `answer_fn`; in a multiclass evaluation it is the class
    the answer names, measured by top-1 accuracy against the labels."""
    from lvlmlp.demo import world
    from lvlmlp.probing.baselines import check_baseline_name
    from lvlmlp.probing.evaluate import write_eval

    responses = ["yes", "No, there is none.", "Yes.", "a red circle", "green star", "maybe"]
    meta = [{"id": f"r{i}", "response": r, "label": i % 2} for i, r in enumerate(responses)]
    run = make_run(tmp_path / "run", np.zeros((6, 4), np.float32), meta)
    check_baseline_name("own-answer:task")
    got = baseline_scores(run, "own-answer:task", task="world-hallucination")
    assert got.tolist() == [world.task_label_of_response("hallucination", r, m) for r, m in zip(responses, meta)]
    assert got.tolist() == [1, 0, 1, 0, 0, 0]
    with pytest.raises(LvlmlpError, match="own-answer:task: needs the run's task"):
        baseline_scores(run, "own-answer:task")
    with pytest.raises(LvlmlpError, match="task world-uncertainty has no answer rule"):
        baseline_scores(run, "own-answer:task", task="world-uncertainty")
    # multiclass: the named class is the baseline's prediction
    y = np.array([0, 1, world.CLASS_NAMES.index("red circle"), world.CLASS_NAMES.index("red circle"),
                  world.CLASS_NAMES.index("green star"), 2], dtype=float)
    classes = np.arange(len(world.CLASS_NAMES))
    score = np.eye(len(classes))[[0, 0, 0, 0, 0, 0]]
    idx = np.arange(6)
    metrics = write_eval(tmp_path / "eval", run, idx, y, score, classes, 0.5, ["own-answer:task"], {}, 10, 0,
                         task="world-classification")
    named = [world.task_label_of_response("classification", r, m) for r, m in zip(responses, meta)]
    recs = [json.loads(line) for line in (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()]
    assert [r["baselines"]["own-answer:task"] for r in recs] == named
    assert metrics["baselines"]["own-answer:task"] == {"accuracy": float(np.mean(np.array(named) == y)), "n": 6}
    assert metrics["accuracy"] == float(np.mean(y == 0))
    with pytest.raises(LvlmlpError, match="baselines are defined for binary probes only"):
        write_eval(tmp_path / "eval2", run, idx, y, score, classes, 0.5, ["max-prob"], {}, 10, 0)


def test_token_prob_uses_the_models_own_tokenizer(tmp_path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "Yes": 1, "No": 2, "maybe": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    logits = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    run = make_run(tmp_path / "run", logits, [{"id": str(i)} for i in range(4)], model=str(tmp_path / "tok"))
    np.testing.assert_allclose(baseline_scores(run, "token-prob:No"), softmax(logits, axis=1)[:, 2], rtol=1e-5)


# ------------------------------------------------------------------ probe eval CLI
def test_probe_eval_writes_metrics_that_recompute_from_scores(tmp_path: Path, capsys):
    rng = np.random.default_rng(0)
    n, v = 160, 24
    y = np.arange(n) % 2
    logits = rng.normal(size=(n, v)).astype(np.float32)
    logits[:, 0] += 1.5 * y
    meta = [{"id": f"r{i}", "label": int(y[i]), "split": "train" if i < 100 else "val",
             "scenario": f"S{i % 3}", "response": "Sorry, no." if i % 4 == 0 else "Sure."} for i in range(n)]
    run = make_run(tmp_path / "run", logits, meta)
    assert main(["probe", "train", "--run", str(run.path), "--split", "train", "--out", str(tmp_path / "p")]) == 0
    assert main(["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(run.path), "--split", "val",
                 "--out", str(tmp_path / "e"), "--baseline", "max-prob", "--baseline", "own-answer",
                 "--n-boot", "200", "--group-by", "scenario=attack-success-rate"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    recs = [json.loads(line) for line in (tmp_path / "e" / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(100, 160)]
    yy = np.array([r["label"] for r in recs])
    ss = np.array([r["score"] for r in recs])
    assert metrics["auroc"] == roc_auc_score(yy, ss) and metrics["auprc"] == average_precision_score(yy, ss)
    assert metrics["accuracy"] == accuracy_score(yy, ss >= 0.5) and metrics["f1"] == f1_score(yy, ss >= 0.5)
    assert metrics["n"] == 60 and metrics["auroc_ci"][0] <= metrics["auroc"] <= metrics["auroc_ci"][1]
    mp = np.array([r["baselines"]["max-prob"] for r in recs])
    assert metrics["baselines"]["max-prob"]["auroc"] == roc_auc_score(yy, mp)
    own = np.array([r["baselines"]["own-answer"] for r in recs])
    assert metrics["baselines"]["own-answer"]["accuracy"] == accuracy_score(yy, own)
    assert metrics["per_scenario"] == attack_success_rate(yy, ss, [r["scenario"] for r in recs])
    assert set(metrics["baselines"]["max-prob"]) == {"auroc", "auprc", "auroc_ci", "n"}
    # What it prints: the probe and each baseline, AUROC [95% CI], read from metrics.json's numbers.
    printed = capsys.readouterr().out.strip().splitlines()[-4:]

    def cell(m: dict) -> str:
        return f"{m['auroc']:.3f} [{m['auroc_ci'][0]:.3f}, {m['auroc_ci'][1]:.3f}]"

    assert [line.split()[0] for line in printed] == ["AUROC", "probe", "max-prob", "own-answer"]
    assert printed[0].endswith("(n=60 rows)") and printed[1].endswith(cell(metrics))
    assert printed[2].endswith(cell(metrics["baselines"]["max-prob"]))
    assert printed[3].endswith(cell(metrics["baselines"]["own-answer"]))

    other = make_run(tmp_path / "other", logits[:, :20], meta)
    assert main(["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(other.path),
                 "--out", str(tmp_path / "e2")]) == 2
    assert "dim 20 (probe expects 24)" in capsys.readouterr().err


# ------------------------------------------------------------------ tasks own their per-group rules
def test_group_metrics_follow_the_groups_asked_for_not_the_field_names():
    from lvlmlp.probing.metrics import group_metrics

    y = np.array([0, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.2, 0.8, 0.6, 0.1, 0.7])
    meta = [{"scenario": f"S{i % 2}", "category": f"C{i % 3}"} for i in range(6)]
    assert group_metrics(meta, y, s, {}) == {}  # fields present, nothing asked: no per-group metrics
    out = group_metrics(meta, y, s, {"scenario": "attack-success-rate", "category": "pope"})
    assert out["per_scenario"] == attack_success_rate(y, s, [m["scenario"] for m in meta])
    assert out["per_category"] == pope_metrics_by_category(y, s >= 0.5, [m["category"] for m in meta])
    # a row lacking the field is an error naming it (it was silently no per-group metrics, issue 27 item 5)
    with pytest.raises(LvlmlpError, match=re.escape("per-group metric attack-success-rate needs the field 'scenario' "
                                                    "on every row, but 1 of 6 rows have none (e.g. row '#5')")):
        group_metrics(meta[:5] + [{}], y, s, {"scenario": "attack-success-rate"})


def test_tasks_declare_their_label_function_and_groups():
    from lvlmlp.tasks import get_task
    from lvlmlp.tasks.mathvista import response_label

    assert get_task("mathvista").label_fn is response_label and get_task("mathvista").needs_generation
    assert get_task("mmsafety").groups == (("scenario", "attack-success-rate"),)
    assert get_task("pope").groups == (("category", "pope"),)
    assert get_task("vizwiz").label_fn is None and get_task("vizwiz").groups == ()


def test_probe_eval_takes_the_groups_of_a_task_and_refuses_unknown_metrics(tmp_path: Path, capsys):
    rng = np.random.default_rng(2)
    n = 80
    y = np.arange(n) % 2
    logits = rng.normal(size=(n, 8)).astype(np.float32)
    logits[:, 0] += 2.0 * y
    cats = ("adversarial", "popular", "random")
    meta = [{"id": f"r{i}", "label": int(y[i]), "category": cats[i % 3]} for i in range(n)]
    run = make_run(tmp_path / "run", logits, meta)
    assert main(["probe", "train", "--run", str(run.path), "--out", str(tmp_path / "p")]) == 0
    base = ["probe", "eval", "--probe", str(tmp_path / "p"), "--run", str(run.path), "--n-boot", "20"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert "per_category" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert main([*base, "--out", str(tmp_path / "e"), "--task", "pope"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    recs = [json.loads(line) for line in (tmp_path / "e" / "scores.jsonl").read_text().splitlines()]
    assert metrics["groups"] == {"category": "pope"} and [r["category"] for r in recs] == [m["category"] for m in meta]
    yy, ss = np.array([r["label"] for r in recs]), np.array([r["score"] for r in recs])
    assert metrics["per_category"] == pope_metrics_by_category(yy, ss >= 0.5, [r["category"] for r in recs])
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--group-by", "category=median"]) == 2
    assert "unknown group metric 'median' for 'category' (known: attack-success-rate, pope)" in capsys.readouterr().err
