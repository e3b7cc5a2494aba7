"""Metrics against scikit-learn and hand counts; baselines; `probe eval` output recomputes from its scores."""

from __future__ import annotations

import json
import re
import warnings
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
    auprc,
    binary_metrics,
    binary_report,
    bootstrap_ci,
    cross_val_folds,
    cross_val_scores,
    fold_metrics,
    pope_metrics,
    pope_metrics_by_category,
    top1_accuracy,
)
from lvlmlp.probing.probes import LDAProbe, LogisticProbe


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


@pytest.mark.mutation_guard
def test_group_metrics_name_the_first_row_lacking_the_field_by_its_id():
    """Catches: the row lacking a group field named by its position although it has an id, or the message's advice
    changed; with no rows, no per-group metric (and no error) for any group asked."""
    from lvlmlp.probing.metrics import group_metrics

    y, s = np.array([0, 1, 1]), np.array([0.2, 0.9, 0.4])
    meta = [{"id": "a", "scenario": "S0"}, {"id": "b"}, {"id": "c"}]
    with pytest.raises(LvlmlpError, match=re.escape(
            "per-group metric attack-success-rate needs the field 'scenario' on every row, but 2 of 3 rows have none "
            "(e.g. row 'b'); extract the rows with that field or leave the grouping out") + "$"):
        group_metrics(meta, y, s, {"scenario": "attack-success-rate"})
    assert group_metrics([], y[:0], s[:0], {"scenario": "attack-success-rate", "category": "pope"}) == {}


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


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_metrics.py (marked `mutation_guard`):
# Guards of the metrics (probing/metrics.py) written against its surviving mutants (docs/mutation-report.md): each
# metric against an independent computation at its documented defaults, at the edges (a score equal to the threshold,
# one row, no positives, a class missing from a fold) and its error messages.

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


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
def test_pope_and_top1_messages_and_one_row():
    """Catches: one row refused, the messages lost or changed."""
    with pytest.raises(LvlmlpError, match="^no rows for POPE metrics$"):
        pope_metrics([], [])
    assert top1_accuracy([3], [3]) == 1.0 and top1_accuracy(np.array([2, 1]), np.array([2, 0])) == 0.5
    with pytest.raises(LvlmlpError, match="^no labelled rows to evaluate$"):
        top1_accuracy([], [])


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
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


@pytest.mark.mutation_guard
def test_binary_arrays_give_int_labels_and_float_scores_from_booleans_and_decimal_strings():
    """Catches: labels left boolean or float, scores left as text (a CSV's decimal strings must score as numbers)."""
    from lvlmlp.probing.metrics import binary_arrays

    y, s = binary_arrays(np.array([True, False, True]), ["0.75", "0.25", "0.5"])
    assert y.dtype == np.int64 and y.tolist() == [1, 0, 1]
    assert s.dtype == np.float64 and s.tolist() == [0.75, 0.25, 0.5]
    assert binary_metrics([1, 0, 1], ["0.75", "0.25", "0.5"]) == binary_metrics([1, 0, 1], [0.75, 0.25, 0.5])
