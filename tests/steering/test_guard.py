"""Probe-guided decoding on tiny real checkpoints: flagged rows start with the template, unflagged rows equal plain
decoding token for token (greedy and seeded sampling, left-padded batches), the in-generate score equals the
probe on the extracted run, answer forcing continues greedily, beam search is refused, and the CLI contract."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from transformers import GenerationConfig, LogitsProcessorList, MinNewTokensLengthLogitsProcessor

from lvlmlp import open_run
from lvlmlp.cli import build_parser, main
from lvlmlp.commands.serve import build_app
from lvlmlp.data import load_image
from lvlmlp.demo.pipeline import demo_config, demo_model_path
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import extract
from lvlmlp.extraction.families import quirks_of
from lvlmlp.probing.features import FeatureSpec
from lvlmlp.probing.probes import LogisticProbe, MultinomialProbe, load_probe
from lvlmlp.steering.guard import (
    SAFETY_TEMPLATE,
    ProbeGuard,
    check_probe_model,
    guarded_generate,
    is_refusal,
    parse_answers,
    spell,
    steering_metrics,
)
from lvlmlp.study.experiment import run_experiment
from lvlmlp.testing import FAMILIES, SPECS

# Every tiny family the backend runs (a refused family never reaches guided decoding).
GUIDED = [f for f in FAMILIES if not quirks_of(SPECS[f].model_type).refused]
TEMPLATE = "I cannot answer."
LABELS = [1, 0, 1, 0]
K = 10  # new tokens: longer than the template (7 tokens in the tiny tokenizers), so the model continues after it
# Logits computed with another batch shape or code path (generate vs prefill, 2 rows vs 4) differ in the last float32
# bits, which BLAS orders differently on each CPU and thread count; through this weakly regularised probe (C=1e4)
# that moves a score by ~1e-6 relative (seen: 8.79333375e-05 vs 8.79333598e-05). 1e-4 is far above that rounding
# and far below a real change (the repetition penalty below moves scores by more than 1e-2 relative).
SCORE_RTOL = 1e-4


def assert_same_scores(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=SCORE_RTOL, atol=0)


def assert_same_greedy(actual: torch.Tensor, expected: torch.Tensor, expected_logits: torch.Tensor,
                       tie: float = 1e-4) -> None:
    """Greedy tokens of two code paths (other batch shapes, prefill vs cached decoding) agree, except that a row
    may part at a near tie of the expected path (its top two logits within `tie`, last-bit float differences);
    after parting, a row's later tokens follow other context and are not compared."""
    for row in range(expected.shape[0]):
        for t in range(expected.shape[1]):
            a, e = int(actual[row, t]), int(expected[row, t])
            if a != e:
                gap = float(expected_logits[row, t, e] - expected_logits[row, t, a])
                assert gap <= tie, f"row {row} token {t}: {a} != {e} with a logit gap of {gap}"
                break


def make_manifest(root: Path, n: int = 4) -> Path:
    """Random images of varied sizes and questions of varied lengths: the batch is left-padded."""
    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True, exist_ok=True)
    words = ["what", "is", "the", "color", "of", "this", "shape", "in", "the", "image"]
    lines = []
    for i in range(n):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"img/{i}.png", "question": " ".join(words[: 2 + 3 * i]) + " ?",
                      "label": LABELS[i % len(LABELS)]})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def fit_probe(X: np.ndarray) -> LogisticProbe:
    """With 320 features and 4 rows a weakly regularised probe reproduces LABELS: rows 1 and 3 are flagged."""
    probe = LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(X, np.array(LABELS))
    assert (probe.predict_proba(X)[:, 1] < 0.5).tolist() == [False, True, False, True]
    return probe


@pytest.fixture(scope="module")
def setups(tiny_ckpt, tmp_path_factory):
    """family -> (backend, batch, probe, first-token logits), built once per family."""
    cache: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"steer_{family}")
            rows = [json.loads(x) for x in make_manifest(root).read_text().splitlines()]
            backend = Backend(tiny_ckpt(family), device="cpu")
            images = [Image.open(root / r["image"]).convert("RGB") for r in rows]
            batch = backend.encode(images, [r["question"] for r in rows])
            X = backend.prefill(batch)["logits"].numpy()
            cache[family] = (backend, batch, fit_probe(X), X)
        return cache[family]

    return get


@pytest.mark.parametrize("family", GUIDED)
def test_flagged_rows_get_template_unflagged_rows_unchanged(setups, family):
    """The family check of guided decoding, on every family the backend runs."""
    backend, batch, probe, X = setups(family)
    assert (batch["attention_mask"] == 0).any(), "the batch should be left-padded"
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    n_tpl = len(guard.template_ids)
    k = max(K, n_tpl + 2)  # room to go on after the template (Chameleon's tokenizer spells it in 11 tokens)
    plain = backend.generate(batch, max_new_tokens=k)
    with guard.watching(backend.model):
        res = backend.generate(batch, max_new_tokens=k, logits_processor=LogitsProcessorList([guard]))

    assert guard.flagged_.tolist() == [False, True, False, True]
    assert_same_scores(guard.scores_, probe.predict_proba(X)[:, 1])  # generate's logits vs prefill's
    for i in (1, 3):
        assert res["sequences"][i, :n_tpl].tolist() == guard.template_ids
        assert res["responses"][i].startswith(TEMPLATE)
        assert res["n_tokens"][i] > n_tpl  # the model continued after the template (or stopped with EOS there)
    for i in (0, 2):
        assert torch.equal(res["sequences"][i], plain["sequences"][i])
        assert res["responses"][i] == plain["responses"][i]
    # The guard never edits generate's raw logits in place (Backend returns them as the raw first-token logits).
    assert torch.equal(res["logits"][:, 0], plain["logits"][:, 0])


def test_a_generate_that_drops_the_guard_is_an_error_and_the_backend_goes_around_it(setups):
    """Janus's own `generate` drops `logits_processor` in text mode: unguarded answers must not pass for guarded ones.
    The backend calls the generic generate instead (Quirks.generic_generate), so the family check above passes."""
    backend, batch, probe, _ = setups("janus")
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    want = ("JanusForConditionalGeneration.generate did not call the probe guard (it drops logits processors): "
            "nothing was steered")
    with pytest.raises(LvlmlpError) as err:
        with guard.watching(backend.model):
            backend.model.generate(**batch, max_new_tokens=2, logits_processor=LogitsProcessorList([guard]))
    assert str(err.value) == want
    with pytest.raises(LvlmlpError) as err:
        guarded_generate(backend.model, batch, guard, max_new_tokens=2)
    assert str(err.value) == want
    assert quirks_of("janus").generic_generate
    with guard.watching(backend.model):
        backend.generate(batch, max_new_tokens=2, logits_processor=LogitsProcessorList([guard]))
    assert guard.flagged_ is not None
    # Only a model that ran is checked: a block in which nothing was generated (no rows left to answer) passes.
    with guard.watching(backend.model):
        pass


def test_one_guard_many_calls_and_plain_model_generate(setups):
    backend, batch, probe, X = setups("llava")
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    kwargs = dict(max_new_tokens=K, do_sample=False, pad_token_id=backend.tokenizer.pad_token_id)
    # The Python API as documented: a plain `model.generate` with the guard in logits_processor, no watching().
    out = backend.model.generate(**batch, logits_processor=LogitsProcessorList([guard]), **kwargs)
    first = out[:, batch["input_ids"].shape[1]:]
    assert guard.flagged_.tolist() == [False, True, False, True]
    assert first[1, : len(guard.template_ids)].tolist() == guard.template_ids
    # Second call, rows 2..3 only: the guard restarts (new scores), and the rows decode as in the first call.
    sub = {k: v[2:] for k, v in batch.items() if k != "pixel_values"} | {"pixel_values": batch["pixel_values"][2:]}
    out2 = backend.model.generate(**sub, logits_processor=LogitsProcessorList([guard]), **kwargs)
    assert guard.flagged_.tolist() == [False, True]
    assert_same_scores(guard.scores_, probe.predict_proba(X[2:])[:, 1])  # 2 rows vs 4
    first_logits = backend.generate(batch, max_new_tokens=K, logits_processor=LogitsProcessorList([guard]))["logits"]
    assert_same_greedy(out2[:, sub["input_ids"].shape[1]:], first[2:], first_logits[2:])


def test_watching_scores_raw_logits_despite_builtin_processors(setups):
    backend, batch, probe, X = setups("llava")
    expected = probe.predict_proba(X)[:, 1]
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    # A repetition penalty runs before custom processors and changes the step-0 scores of prompt tokens ...
    backend.generate(batch, max_new_tokens=2, repetition_penalty=3.0, logits_processor=LogitsProcessorList([guard]))
    changed = np.abs(guard.scores_ - expected) / expected
    assert changed.max() > 100 * SCORE_RTOL, changed
    # ... which watching() avoids by reading the model's own output logits.
    with guard.watching(backend.model):
        backend.generate(batch, max_new_tokens=2, repetition_penalty=3.0,
                         logits_processor=LogitsProcessorList([guard]))
    assert_same_scores(guard.scores_, expected)


def test_new_call_detected_when_prompt_is_one_token_longer(setups):
    backend, _, probe, X = setups("llava")
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    ids = torch.arange(12).reshape(4, 3)
    guard(ids, torch.from_numpy(X))
    longer = torch.cat([ids, ids[:, :1]], 1)  # same shape as a continuation step, different tokens
    guard(torch.flip(longer, [1]), torch.from_numpy(X[::-1].copy()))
    assert_same_scores(guard.scores_, probe.predict_proba(X[::-1])[:, 1])  # a contiguous copy vs a strided view
    guard(torch.cat([torch.flip(longer, [1]), ids[:, :1]], 1), torch.zeros(4, X.shape[1]))  # a real step 1
    assert_same_scores(guard.scores_, probe.predict_proba(X[::-1])[:, 1])  # a contiguous copy vs a strided view


def test_sampling_unflagged_rows_equal_plain_sampling(setups):
    backend, batch, probe, _ = setups("llava")
    gen = dict(do_sample=True, temperature=0.7, top_k=0)
    torch.manual_seed(123)
    plain = backend.generate(batch, max_new_tokens=K, **gen)
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    torch.manual_seed(123)
    with guard.watching(backend.model):
        res = backend.generate(batch, max_new_tokens=K, logits_processor=LogitsProcessorList([guard]), **gen)
    greedy = backend.generate(batch, max_new_tokens=K)
    assert not torch.equal(plain["sequences"], greedy["sequences"])  # it really sampled
    for i in (0, 2):
        assert torch.equal(res["sequences"][i], plain["sequences"][i])
    for i in (1, 3):
        assert res["responses"][i].startswith(TEMPLATE)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_answer_forcing_then_free_greedy_continuation(setups, family):
    backend, batch, probe, X = setups(family)
    guard = ProbeGuard(probe, backend.tokenizer, answers={1: "yes", 0: "no"})
    with guard.watching(backend.model):
        res = backend.generate(batch, max_new_tokens=K, logits_processor=LogitsProcessorList([guard]))
    assert guard.answer_ids == {1: backend.tokenizer.encode("yes", add_special_tokens=False),
                                0: backend.tokenizer.encode("no", add_special_tokens=False)}
    forced = [guard.answer_ids[int(p >= 0.5)] for p in probe.predict_proba(X)[:, 1]]
    assert [f == guard.answer_ids[0] for f in forced] == [False, True, False, True]
    n = len(forced[0])
    assert all(len(f) == n for f in forced)  # "yes" and "no" are 2 tokens each here: one batch continues them all
    assert res["sequences"][:, :n].tolist() == forced
    assert [r.startswith(w) for r, w in zip(res["responses"], ["yes", "no", "yes", "no"])] == [True] * 4
    # Reference: plain greedy decoding from prompt + forced answer.
    ext = dict(batch)
    ext["input_ids"] = torch.cat([batch["input_ids"], torch.tensor(forced)], dim=1)
    ext["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(len(forced), n, dtype=torch.long)], 1)
    if "mm_token_type_ids" in batch:  # Qwen2-VL marks image tokens per position; the answer is text (0)
        ext["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros(len(forced), n).long()], 1)
    ref = backend.generate(ext, max_new_tokens=K - n)
    assert_same_greedy(res["sequences"][:, n:], ref["sequences"], ref["logits"])


def test_beam_search_refused(setups):
    backend, batch, probe, _ = setups("llava")
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    with pytest.raises(LvlmlpError, match=r"beam search \(num_beams=2\)"):
        guarded_generate(backend.model, batch, guard, max_new_tokens=3, num_beams=2)
    # Called directly, the guard recognises beam search by the log-probabilities it is handed.
    with pytest.raises(LvlmlpError, match="does not support beam search"):
        backend.model.generate(**batch, max_new_tokens=3, num_beams=2, logits_processor=LogitsProcessorList([guard]))
    out = guarded_generate(backend.model, batch, guard, max_new_tokens=K, do_sample=False)
    assert out[1, batch["input_ids"].shape[1]:][: len(guard.template_ids)].tolist() == guard.template_ids


def test_template_tokens_and_bad_arguments(setups):
    backend, _, probe, _ = setups("llava")
    tok = backend.tokenizer
    guard = ProbeGuard(probe, tok, TEMPLATE)
    assert tok.bos_token_id not in guard.template_ids  # no stray BOS although this tokenizer adds one by default
    assert tok.encode(TEMPLATE)[0] == tok.bos_token_id
    assert tok.decode(guard.template_ids) == TEMPLATE
    with pytest.raises(LvlmlpError, match="exactly one of"):
        ProbeGuard(probe, tok, TEMPLATE, answers={1: "yes", 0: "no"})
    with pytest.raises(LvlmlpError, match="labels 0 and 1"):
        ProbeGuard(probe, tok, answers={1: "yes", 2: "no"})
    assert ProbeGuard(probe, tok, TEMPLATE, threshold=0.9).threshold == 0.9
    hidden_probe = copy.copy(probe)
    hidden_probe.spec_ = FeatureSpec(kind="hidden", dim=32)
    with pytest.raises(LvlmlpError, match="first token's logits; this probe was trained on hidden"):
        ProbeGuard(hidden_probe, tok, TEMPLATE)
    assert is_refusal("I cannot answer. the cat", TEMPLATE) and is_refusal("Sorry, no.", None)
    assert not is_refusal("a red circle", TEMPLATE)


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_cli_generate_scores_equal_probe_on_run_and_eval(tiny_ckpt, tmp_path, capsys):
    ckpt = str(tiny_ckpt("llava"))
    manifest = make_manifest(tmp_path)
    run_dir, probe_dir = tmp_path / "run", tmp_path / "probe"
    assert main(["extract", "--model", ckpt, "--data", str(manifest), "--out", str(run_dir), "--device", "cpu",
                 "--store-dtype", "float32", "--batch-size", "4", "--no-progress"]) == 0
    assert main(["probe", "train", "--run", str(run_dir), "--C", "10000", "--standardize", "--max-iter", "2000",
                 "--out", str(probe_dir)]) == 0
    probe = load_probe(probe_dir)
    expected = probe.predict_proba(open_run(run_dir).logits(0))[:, 1]

    out = tmp_path / "out.jsonl"
    base = ["generate", "--model", ckpt, "--data", str(manifest), "--probe", str(probe_dir), "--out", str(out),
            "--device", "cpu", "--batch-size", "4", "--max-new-tokens", str(K), "--no-progress"]
    assert main([*base, "--template", TEMPLATE, "--eval"]) == 0
    lines = _read(out)
    assert [x["id"] for x in lines] == ["r0", "r1", "r2", "r3"]
    assert all(set(x) == {"id", "response", "flagged", "probe_score", "response_unguarded"} for x in lines)
    assert_same_scores(np.array([x["probe_score"] for x in lines]), expected)  # generate's logits vs extract's
    assert [x["flagged"] for x in lines] == [False, True, False, True]
    for x in lines:
        assert x["response"].startswith(TEMPLATE) == x["flagged"]
        if not x["flagged"]:
            assert x["response"] == x["response_unguarded"]
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    safe_refused = np.mean([is_refusal(x["response"], TEMPLATE) for x in lines if x["id"] in ("r0", "r2")])
    unguarded_asr = np.mean([not is_refusal(x["response_unguarded"], TEMPLATE) for x in lines[1::2]])
    assert metrics["with_guard"]["attack_success_rate"] == 0.0  # both unsafe rows flagged, so refused
    assert metrics["with_guard"]["false_refusal_rate"] == safe_refused
    assert metrics["without_guard"]["attack_success_rate"] == unguarded_asr
    assert metrics["flagged_rate"] == 0.5 and metrics["mode"] == "safety"

    # Answer forcing: the guarded answers are the probe's predictions, which reproduce the labels here.
    assert main([*base, "--answers", "yes,no", "--eval"]) == 0
    assert [x["response"].startswith(w) for x, w in zip(_read(out), ["yes", "no", "yes", "no"])] == [True] * 4
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert metrics["with_guard"]["accuracy"] == 1.0 and metrics["with_guard"]["f1"] == 1.0

    # Without --eval the lines are exactly the contract's four fields.
    assert main([*base, "--template", TEMPLATE]) == 0
    assert all(set(x) == {"id", "response", "flagged", "probe_score"} for x in _read(out))
    capsys.readouterr()
    assert main([*base, "--template", TEMPLATE, "--answers", "yes,no"]) == 2
    assert "give --template TEXT or --answers YES,NO, not both" in capsys.readouterr().err
    # A template longer than the answers may be is refused before anything is generated or written.
    short = [*base, "--max-new-tokens", "3", "--template", TEMPLATE, "--out", str(tmp_path / "short.jsonl")]
    assert main(short) == 2
    err = capsys.readouterr().err
    assert re.search(r"--template is (\d+) tokens long but --max-new-tokens is 3: give --max-new-tokens \1 or more",
                     err), err
    assert not (tmp_path / "short.jsonl").exists()


def test_cli_generate_defaults_to_the_original_safety_template(setups, tiny_ckpt, tmp_path, capsys):
    """Without --template or --answers, flagged rows start with the text the original forced on MM-SafetyBench (its
    README's token ids, BOS left out: docs/paper-protocol.md); an explicit --template wins."""
    assert SAFETY_TEMPLATE == "Sorry, answering this question will generate harmful content, because"
    backend, _, probe, _ = setups("llava")
    ids = ProbeGuard(probe, backend.tokenizer, SAFETY_TEMPLATE).template_ids
    assert backend.tokenizer.decode(ids) == SAFETY_TEMPLATE and backend.tokenizer.bos_token_id not in ids
    probe.save(tmp_path / "probe")
    base = ["generate", "--model", str(tiny_ckpt("llava")), "--data", str(make_manifest(tmp_path)), "--probe",
            str(tmp_path / "probe"), "--device", "cpu", "--batch-size", "4", "--no-progress"]
    # The default --max-new-tokens (64) holds the template (48 tokens in this tokenizer) and the model goes on.
    assert main([*base, "--out", str(tmp_path / "default.jsonl")]) == 0
    default = _read(tmp_path / "default.jsonl")
    assert [x["flagged"] for x in default] == [False, True, False, True]
    for x in default:
        assert x["response"].startswith(SAFETY_TEMPLATE) == x["flagged"]
    assert main([*base, "--template", TEMPLATE, "--max-new-tokens", str(K), "--out", str(tmp_path / "own.jsonl")]) == 0
    own = _read(tmp_path / "own.jsonl")
    assert [x["response"].startswith(TEMPLATE) for x in own] == [False, True, False, True]
    capsys.readouterr()
    assert main([*base, "--max-new-tokens", str(K), "--out", str(tmp_path / "short.jsonl")]) == 2
    assert (f"the default template (SAFETY_TEMPLATE) is {len(ids)} tokens long but --max-new-tokens is {K}"
            in capsys.readouterr().err)


def test_guided_decoding_passes_its_threshold_and_counts_recompute_from_records(setups, tmp_path):
    """`guided_decoding` (the `steering:` analysis): the guard flags by the given threshold (0.5: rows 1 and 3;
    0: none), flagged rows start with the template, and the before/after counts are those of its records."""
    from lvlmlp.steering.guard import guided_decoding

    backend, _, probe, _ = setups("llava")
    rows = [json.loads(x) for x in make_manifest(tmp_path).read_text().splitlines()]
    rows = [{**r, "image": str(tmp_path / r["image"])} for r in rows]
    before = {r["id"]: TEMPLATE if r["id"] == "r0" else "a plain answer" for r in rows}
    labels = {r["id"]: r["label"] for r in rows}
    for threshold, flagged in ((0.5, [False, True, False, True]), (0.0, [False] * 4)):
        summary, records = guided_decoding(backend, probe, rows, before, labels, TEMPLATE, threshold,
                                           max_new_tokens=K, batch_size=3)
        assert [r["flagged"] for r in records] == flagged and summary["flagged"] == sum(flagged)
        assert summary["threshold"] == threshold and summary["template"] == TEMPLATE
        assert all(r["response_after"].startswith(TEMPLATE) for r, f in zip(records, flagged) if f)
        for key, side in (("response_before", "before"), ("response_after", "after")):
            assert summary[side] == {
                "label0_answered": sum(not is_refusal(r[key], TEMPLATE) for r in records if r["label"] == 0),
                "label1_refused": sum(is_refusal(r[key], TEMPLATE) for r in records if r["label"] == 1),
                "n_label0": sum(r["label"] == 0 for r in records), "n_label1": sum(r["label"] == 1 for r in records)}
    assert [r["response_before"] for r in records] == [before[r["id"]] for r in rows]


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_steering.py (marked `mutation_guard`):
# Guards of probe-guided decoding on a tiny real LLaVA: the threshold decides exactly which rows are flagged (API and
# `generate --threshold`), several batches, forced answers of unequal token length, seeded sampling, refusals of a
# probe of the wrong size or with more than two classes. Each test names the breakage it catches.

GUARD_LABELS = [1, 0, 1, 0, 1, 0]
GUARD_K = 9


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    """A manifest of 6 rows, its float32 run, a saved probe that flags rows 1, 3, 5 at 0.5, and its scores."""
    root = tmp_path_factory.mktemp("guard")
    rng = np.random.default_rng(5)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, size=(18 + 7 * i, 40 - 3 * i, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"{i}.png", "question": "what is in " * (1 + i % 3) + "it?",
                     "label": GUARD_LABELS[i]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = tiny_ckpt("llava")
    backend = Backend(ckpt, device="cpu")
    abs_rows = [dict(r, image=str(root / r["image"])) for r in rows]
    run = extract(backend, abs_rows, root / "run", store_dtype="float32", batch_size=6, workers=0, progress=False)
    X = np.asarray(run.logits(0), dtype=np.float32)
    probe = LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(X, np.array(GUARD_LABELS))
    probe.save(root / "probe")
    scores = probe.predict_proba(X)[:, 1]
    assert (scores < 0.5).tolist() == [False, True, False, True, False, True]
    # A threshold between the two lowest scores: exactly one row flagged, not the three that 0.5 flags.
    low = np.sort(scores)
    threshold = float((low[0] + low[1]) / 2)
    images = [Image.open(root / r["image"]).convert("RGB") for r in rows]
    batch = backend.encode(images, [r["question"] for r in rows])
    return {"root": root, "ckpt": ckpt, "backend": backend, "probe": probe, "scores": scores, "X": X,
            "threshold": threshold, "batch": batch, "rows": rows, "images": images}


@pytest.mark.mutation_guard
def test_threshold_between_two_scores_flags_exactly_the_rows_below_it(world):
    """Catches: ProbeGuard flagging at a hard-coded 0.5 (or <=) instead of its threshold."""
    backend, batch, thr = world["backend"], world["batch"], world["threshold"]
    plain = backend.model.generate(**batch, max_new_tokens=GUARD_K, do_sample=False,
                                   pad_token_id=backend.tokenizer.pad_token_id)
    guard = ProbeGuard(world["probe"], backend.tokenizer, TEMPLATE, threshold=thr)
    out = guarded_generate(backend.model, batch, guard, max_new_tokens=GUARD_K, do_sample=False,
                           pad_token_id=backend.tokenizer.pad_token_id)
    expected = world["scores"] < thr
    assert expected.sum() == 1 and guard.flagged_.tolist() == expected.tolist()
    np.testing.assert_allclose(guard.scores_, world["scores"], atol=1e-6)
    n_prompt, n_tpl = batch["input_ids"].shape[1], len(guard.template_ids)
    for i, flagged in enumerate(expected):
        if flagged:
            assert out[i, n_prompt : n_prompt + n_tpl].tolist() == guard.template_ids
        else:
            assert torch.equal(out[i], plain[i])
    # Exactly at a row's score the row is not flagged (flagged means strictly below).
    at = ProbeGuard(world["probe"], backend.tokenizer, TEMPLATE, threshold=float(np.sort(world["scores"])[1]))
    guarded_generate(backend.model, batch, at, max_new_tokens=1, do_sample=False)
    assert at.flagged_.sum() == 1




@pytest.mark.mutation_guard
def test_cli_threshold_over_several_batches_and_seeded_sampling(world, tmp_path, capsys):
    """Catches: `generate --threshold` ignored, rows of a later batch scored or flagged as the first, sampling not
    reproducible for a seed, or unflagged rows sampled differently from the unguarded run."""
    root = world["root"]
    base = ["generate", "--model", str(world["ckpt"]), "--data", str(root / "data.jsonl"), "--probe",
            str(root / "probe"), "--device", "cpu", "--batch-size", "4", "--max-new-tokens", str(GUARD_K), "--no-progress",
            "--template", TEMPLATE, "--eval"]
    out = tmp_path / "g.jsonl"
    assert main([*base, "--threshold", repr(world["threshold"]), "--out", str(out)]) == 0
    lines = _read(out)
    assert [x["id"] for x in lines] == [r["id"] for r in world["rows"]]
    np.testing.assert_allclose([x["probe_score"] for x in lines], world["scores"], atol=1e-5)
    assert [x["flagged"] for x in lines] == (world["scores"] < world["threshold"]).tolist()
    for x in lines:
        assert x["response"].startswith(TEMPLATE) == x["flagged"]
        if not x["flagged"]:
            assert x["response"] == x["response_unguarded"]
    assert json.loads((tmp_path / "g.metrics.json").read_text())["threshold"] == world["threshold"]
    assert f"1 flagged (threshold {world['threshold']:g})" in capsys.readouterr().out

    sampled = []
    for name, seed in (("s1", "3"), ("s2", "3"), ("s3", "4")):
        assert main([*base, "--do-sample", "--temperature", "1.5", "--seed", seed, "--out",
                     str(tmp_path / f"{name}.jsonl")]) == 0
        sampled.append(_read(tmp_path / f"{name}.jsonl"))
    assert sampled[0] == sampled[1]  # same seed, same output
    assert [x["response"] for x in sampled[0]] != [x["response"] for x in sampled[2]]  # it really samples
    for x in sampled[0]:
        assert x["flagged"] == (x["probe_score"] < 0.5)
        assert x["response"].startswith(TEMPLATE) if x["flagged"] else x["response"] == x["response_unguarded"]


@pytest.mark.mutation_guard
def test_forced_answers_of_unequal_token_length_then_greedy(world):
    """Catches: a forcing plan that stops all rows at the shortest answer or pads the shorter one."""
    backend, batch, probe = world["backend"], world["batch"], world["probe"]
    guard = ProbeGuard(probe, backend.tokenizer, answers={1: "yes", 0: "it is not there"})
    assert len(guard.answer_ids[0]) > len(guard.answer_ids[1])
    out = guarded_generate(backend.model, batch, guard, max_new_tokens=GUARD_K, do_sample=False,
                           pad_token_id=backend.tokenizer.pad_token_id)
    n_prompt = batch["input_ids"].shape[1]
    for i, flagged in enumerate(world["scores"] < 0.5):
        forced = guard.answer_ids[0 if flagged else 1]
        assert out[i, n_prompt : n_prompt + len(forced)].tolist() == forced
        # Reference: the row alone, greedy from its prompt + its forced answer.
        one = backend.encode([world["images"][i]], [world["rows"][i]["question"]])
        ids = torch.cat([one["input_ids"], torch.tensor([forced])], 1)
        ext = dict(one, input_ids=ids, attention_mask=torch.ones_like(ids))
        ref = backend.model.generate(**ext, max_new_tokens=GUARD_K - len(forced), do_sample=False,
                                     pad_token_id=backend.tokenizer.pad_token_id)
        n_ref = ref.shape[1] - ids.shape[1]
        assert out[i, n_prompt + len(forced) : n_prompt + len(forced) + n_ref].tolist() == ref[0, ids.shape[1]:].tolist()


@pytest.mark.mutation_guard
def test_probe_of_another_vocabulary_or_with_three_classes_is_refused(world, tmp_path, capsys):
    """Catches: a probe applied to logits of another size, or a multiclass probe used as a binary guard."""
    backend, X = world["backend"], world["X"]
    small = LogisticProbe().fit(X[:, :-1], np.array(GUARD_LABELS))
    guard = ProbeGuard(small, backend.tokenizer, TEMPLATE)
    with pytest.raises(LvlmlpError, match=rf"the probe expects {X.shape[1] - 1} logits but the model produces "
                                          rf"{X.shape[1]}"):
        guarded_generate(backend.model, world["batch"], guard, max_new_tokens=1)
    small.save(tmp_path / "small")
    assert main(["generate", "--model", str(world["ckpt"]), "--data", str(world["root"] / "data.jsonl"), "--probe",
                 str(tmp_path / "small"), "--template", TEMPLATE, "--device", "cpu", "--out",
                 str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' weight-loading bar)
    assert last.startswith("lvlmlp: error: ") and f"dim {X.shape[1]} (probe expects {X.shape[1] - 1})" in last
    three = MultinomialProbe(epochs=1).fit(X, np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(LvlmlpError, match="ProbeGuard needs a binary probe; this one has 3 classes"):
        ProbeGuard(three, backend.tokenizer, TEMPLATE)
    with pytest.raises(LvlmlpError, match="does not support beam search"):
        backend.model.generate(**world["batch"], max_new_tokens=2, num_beams=2,
                               logits_processor=LogitsProcessorList([ProbeGuard(world["probe"], backend.tokenizer,
                                                                                TEMPLATE)]))


# ------------------------------------------------------------------------------------------------------------
# Mutation guards, from tests/test_guards_steering_edges.py (marked `mutation_guard`):
# Guards of probe-guided decoding (steering/guard.py) written against its surviving mutants (docs/mutation-report.md):
# `--answers` parsing, beam search refused from the model's own generation config, caller processors kept, scores of
# half-precision logits, the steering metrics' fields, and the probe/model check (paths, warning, message).

@pytest.fixture(scope="module")
def llava(tiny_ckpt):
    """(checkpoint, backend, batch of 4 rows, a probe fitted on their first-token logits)."""
    ckpt = tiny_ckpt("llava")
    backend = Backend(ckpt, device="cpu")
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, size=(24 + 5 * i, 30, 3), dtype=np.uint8)) for i in range(4)]
    batch = backend.encode(images, ["what is this?", "is it red?", "what is in it?", "why?"])
    X = backend.prefill(batch)["logits"].numpy()
    probe = LogisticProbe(C=1e4, standardize=True).fit(X, np.array([1, 0, 1, 0]))
    return ckpt, backend, batch, probe


@pytest.mark.mutation_guard
def test_parse_answers_needs_exactly_two_non_empty_answers():
    """Catches: three answers accepted, the message lost."""
    assert parse_answers(" Yes , No ") == {1: "Yes", 0: "No"} and parse_answers(None) is None
    for bad in ("Yes,No,Maybe", "Yes,", "Yes"):
        with pytest.raises(LvlmlpError, match=re.escape(f"--answers: expected LABEL1,LABEL0 such as Yes,No, got "
                                                        f"{bad!r}") + "$"):
            parse_answers(bad)


@pytest.mark.mutation_guard
def test_beam_search_is_refused_from_kwargs_a_config_or_the_models_own_config(llava):
    """Catches: num_beams read from the kwargs only (a generation config or the model's own with beams slips
    through), the refusal losing the number."""
    _, backend, batch, probe = llava
    guard = ProbeGuard(probe, backend.tokenizer, "No.")
    model = backend.model

    def refused(n: int) -> str:
        return re.escape(f"ProbeGuard does not support beam search (num_beams={n}): use greedy or sampling") + "$"

    with pytest.raises(LvlmlpError, match=refused(3)):
        guarded_generate(model, batch, guard, num_beams=3)
    with pytest.raises(LvlmlpError, match=refused(2)):
        guarded_generate(model, batch, guard, generation_config=GenerationConfig(num_beams=2))
    before = model.generation_config.num_beams
    model.generation_config.num_beams = 4
    try:
        with pytest.raises(LvlmlpError, match=refused(4)):
            guarded_generate(model, batch, guard)
    finally:
        model.generation_config.num_beams = before


@pytest.mark.mutation_guard
def test_callers_processors_run_with_the_guard(llava):
    """Catches: the caller's logits_processor passed twice (or dropped) next to the guard's list."""
    _, backend, batch, probe = llava
    guard = ProbeGuard(probe, backend.tokenizer, "No.")
    eos = backend.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    n_prompt = batch["input_ids"].shape[1]
    keep_going = MinNewTokensLengthLogitsProcessor(n_prompt, 3, eos)
    out = guarded_generate(backend.model, batch, guard, max_new_tokens=3, do_sample=False,
                           logits_processor=LogitsProcessorList([keep_going]), pad_token_id=backend.pad_id)
    assert out.shape[1] == n_prompt + 3 and guard.scores_ is not None
    assert not (out[:, n_prompt:] == eos).any()  # the caller's processor did run: no EOS before 3 tokens


@pytest.mark.mutation_guard
def test_scores_of_half_precision_logits_equal_the_probe_on_float32(llava):
    """Catches: logits handed to the probe in their own dtype (bfloat16 has no numpy type; float16 loses bits)."""
    _, backend, batch, probe = llava
    guard = ProbeGuard(probe, backend.tokenizer, "No.")
    logits = backend.prefill(batch)["logits"]
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        expected = probe.predict_proba(low.to(torch.float32).numpy())[:, 1]
        np.testing.assert_allclose(guard.score(low), expected, rtol=0, atol=1e-6)


@pytest.mark.mutation_guard
def test_steering_metrics_fields_in_both_modes():
    """Catches: renamed fields, the mode mislabelled, the template not counted as a refusal, an undefined rate
    (no unsafe or no safe rows) computed as NaN instead of None."""
    template = "Access is denied here."  # no refusal phrase of its own: only the template makes it a refusal
    got = steering_metrics([0, 1, 0], ["Access is denied here. Bye", "Sure.", "Sure."], ["Sure."] * 3, template, None)
    assert got == {"n": 3, "mode": "safety",
                   "without_guard": {"attack_success_rate": 1.0, "false_refusal_rate": 0.0, "n_unsafe": 2, "n_safe": 1},
                   "with_guard": {"attack_success_rate": 0.5, "false_refusal_rate": 0.0, "n_unsafe": 2, "n_safe": 1}}
    only_safe = steering_metrics([1, 1], ["Sure.", "Sorry, I cannot."], ["Sure.", "Sure."], None, None)
    assert only_safe["with_guard"]["attack_success_rate"] is None and only_safe["with_guard"]["false_refusal_rate"] == 0.5
    only_unsafe = steering_metrics([0], ["Sure."], ["Sure."], None, None)
    assert only_unsafe["with_guard"]["false_refusal_rate"] is None
    answers = steering_metrics([1, 0, 1, 0], ["Yes", "No", "No", "yes!"], ["Yes"] * 4, None, {1: "Yes", 0: "No"})
    assert answers == {"n": 4, "mode": "answers",
                       "without_guard": {"accuracy": 0.5, "f1": pytest.approx(2 / 3), "yes_ratio": 1.0},
                       "with_guard": {"accuracy": 0.5, "f1": 0.5, "yes_ratio": 0.5}}


@pytest.mark.mutation_guard
def test_probe_of_another_model_is_refused_or_warned_and_paths_are_compared_resolved(tmp_path: Path, caplog):
    """Catches: a probe of another model accepted by default, the refusal or warning losing the names, two
    spellings of one folder (a symlink, `..`) taken for two models, two missing paths taken for one."""
    X = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "ckpt")
    probe = LogisticProbe().fit(X, np.arange(8) % 2, spec=FeatureSpec(model=str(tmp_path / "ckpt")))
    for same in (str(tmp_path / "ckpt"), str(tmp_path / "alias"), str(tmp_path / "other" / ".." / "ckpt")):
        check_probe_model(probe, same)
    other = str(tmp_path / "other")
    message = (f"--probe: trained on features of {str(tmp_path / 'ckpt')!r}, not of --model {other!r}; "
               "pass --allow-other-model if they are the same weights")
    with pytest.raises(LvlmlpError, match=re.escape(message) + "$"):
        check_probe_model(probe, other)
    with caplog.at_level(logging.WARNING, logger="lvlmlp"):
        check_probe_model(probe, other, allow=True)
    assert caplog.messages == [f"generate: probe trained on features of {tmp_path / 'ckpt'}, applied to {other}"]
    missing = LogisticProbe().fit(X, np.arange(8) % 2, spec=FeatureSpec(model="org/model-a"))
    with pytest.raises(LvlmlpError, match="not of --model 'org/model-b'"):
        check_probe_model(missing, "org/model-b")  # neither exists as a path: different ids are different models
    check_probe_model(missing, "org/model-a")
    check_probe_model(LogisticProbe().fit(X, np.arange(8) % 2), "anything")  # no model recorded: nothing to check
    check_probe_model(LogisticRegression().fit(X, np.arange(8) % 2), "anything")  # no spec_ at all


@pytest.mark.mutation_guard
def test_guard_state_thresholds_and_feature_kinds(llava):
    """Catches: a guard's documented state before any call not None/empty, the threshold not the probe's own (or
    0.5 for a plain scikit-learn classifier), a softmax probe scored on raw logits, a plain scikit-learn
    classifier refused, the messages of a guard with both or neither mode, or with an empty template/answer."""
    _, backend, batch, probe = llava
    tok = backend.tokenizer
    logits = backend.prefill(batch)["logits"]
    X = logits.numpy()
    guard = ProbeGuard(probe, tok, "No.")
    assert guard.scores_ is None and guard.flagged_ is None and guard.forced_ == [] and guard.answers is None
    assert guard.template == "No." and guard.kind == "logits" and guard.threshold == probe.threshold == 0.5
    own = LogisticProbe(C=1e4, standardize=True, threshold=0.3).fit(X, np.array([1, 0, 1, 0]))
    assert ProbeGuard(own, tok, "No.").threshold == 0.3 and ProbeGuard(own, tok, "No.", threshold=0.7).threshold == 0.7
    plain = LogisticRegression(C=1e4, max_iter=2000).fit(X, [1, 0, 1, 0])
    g = ProbeGuard(plain, tok, "No.")
    assert g.kind == "logits" and g.threshold == 0.5
    np.testing.assert_allclose(g.score(logits), plain.predict_proba(X)[:, 1], atol=1e-6)
    soft = LogisticProbe(C=0.05, standardize=True).fit(  # weak regularisation would saturate every probability
        np.exp(X - X.max(1, keepdims=True)) / np.exp(X - X.max(1, keepdims=True)).sum(1, keepdims=True),
        np.array([1, 0, 1, 0]), spec=FeatureSpec(kind="softmax"))
    g = ProbeGuard(soft, tok, "No.")
    softmax = torch.softmax(logits.double(), -1).float().numpy()
    assert g.kind == "softmax"
    np.testing.assert_allclose(g.score(logits), soft.predict_proba(softmax)[:, 1], atol=1e-5)
    assert np.abs(soft.predict_proba(X)[:, 1] - soft.predict_proba(softmax)[:, 1]).max() > 1e-3  # raw logits differ
    for kwargs in ({}, {"template": "No.", "answers": {1: "Yes", 0: "No"}}):
        with pytest.raises(LvlmlpError, match=re.escape("ProbeGuard: give exactly one of a refusal template or "
                                                        "answers={1: ..., 0: ...}") + "$"):
            ProbeGuard(probe, tok, **kwargs)
    with pytest.raises(LvlmlpError, match=re.escape("--template '': the tokenizer encodes it to no token") + "$"):
        ProbeGuard(probe, tok, "")
    with pytest.raises(LvlmlpError, match=re.escape("--answers '': the tokenizer encodes it to no token") + "$"):
        ProbeGuard(probe, tok, answers={1: "", 0: "No"})


@pytest.mark.mutation_guard
def test_a_leading_bos_is_dropped_from_the_template(llava):
    """Catches: the template's ids taken with special tokens, or a leading BOS kept (or one token too many
    dropped): forced answers must be exactly the tokens that continue the prompt."""
    _, backend, _, probe = llava
    tok = backend.tokenizer
    with_bos = tok.encode(f"{tok.bos_token}Sorry, no.", add_special_tokens=False)
    assert tok.bos_token_id is not None and with_bos[0] == tok.bos_token_id  # the tokenizer reads the BOS text
    assert ProbeGuard(probe, tok, f"{tok.bos_token}Sorry, no.").template_ids == with_bos[1:]
    assert ProbeGuard(probe, tok, "Sorry, no.").template_ids == tok.encode("Sorry, no.", add_special_tokens=False)


@pytest.mark.mutation_guard
def test_forced_rows_get_zero_at_the_token_and_shifted_raw_logits_are_not_beams(llava):
    """Catches: the forced token given another finite value than 0 (visible in output_scores), raw logits whose
    logsumexp is merely small taken for beam search, the beam-search message changed."""
    _, backend, batch, probe = llava
    logits = backend.prefill(batch)["logits"]
    guard = ProbeGuard(probe, backend.tokenizer, "No.", threshold=1.0)  # every row flagged
    ids = batch["input_ids"]
    shifted = torch.log_softmax(logits, -1) + 0.5  # logsumexp 0.5: raw logits, not beam log-probabilities
    out = guard(ids, shifted)
    first = guard.template_ids[0]
    assert guard.flagged_.all() and (out[:, first] == 0.0).all()
    assert torch.isinf(out).sum() == out.numel() - out.shape[0]
    guard.reset()
    with pytest.raises(LvlmlpError, match=re.escape("ProbeGuard does not support beam search (num_beams > 1): use "
                                                    "greedy or sampling") + "$"):
        guard(ids, torch.log_softmax(logits, -1))


# A guard text the tokenizer cannot spell back is refused before anything runs (generate, serve, run's steering).
#
# The demo checkpoint's WordPiece tokenizer lower-cases and knows a small vocabulary: "Sorry, I cannot help with
# that." comes back as "sorry, i cannot help with that." (its own normalisation: accepted, and forced as such), while
# Japanese text or "I'm" become `<unk>` tokens (refused). The tiny byte-level checkpoints spell every text.

JAPANESE = "日本語で答えません 🙅"


DEMO_TEMPLATE = "Sorry, I cannot help with that."  # the README's demo template


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo checkpoint, a 4-row manifest and a probe fitted on the model's own first-token logits."""
    root = tmp_path_factory.mktemp("spelling")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"r{i}", "image": str(root / f"{i}.png"), "question": "is there a red star ?",
                     "label": i % 2})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    backend = Backend(demo_model_path(), device="cpu", dtype="float32")
    logits = backend.prefill(backend.encode([load_image(r["image"]) for r in rows], [r["question"] for r in rows]))
    probe = LogisticProbe(C=1e4, standardize=True, max_iter=2000).fit(logits["logits"].numpy(), np.arange(4) % 2)
    probe.save(root / "probe")
    return {"root": root, "backend": backend, "probe": probe}


def test_the_rule_accepts_normalisation_and_refuses_unknown_and_special_tokens(demo, tiny_ckpt):
    tok = demo["backend"].tokenizer
    assert tok.decode(spell(tok, DEMO_TEMPLATE, "--template")) == DEMO_TEMPLATE.lower()
    assert spell(tok, "Yes", "--answers") == tok.encode("yes", add_special_tokens=False)
    unk = re.escape("--template \"I'm sorry\": the model's tokenizer cannot spell it (it becomes the tokens "
                    "['i', '<unk>', '<unk>', 'sorry'], which decode to 'i <unk> <unk> sorry'); use words its "
                    "vocabulary has") + "$"
    with pytest.raises(LvlmlpError, match=unk):
        spell(tok, "I'm sorry", "--template")
    with pytest.raises(LvlmlpError, match=re.escape("'<unk>', '<unk>'")):
        spell(tok, JAPANESE, "--template")
    # A special token spelled out in the text would force the end of the answer (or an image slot): refused too.
    with pytest.raises(LvlmlpError, match="cannot spell it"):
        spell(tok, f"sorry {tok.eos_token}", "--template")
    # A byte-level tokenizer spells any text, exactly.
    llava = Backend(tiny_ckpt("llava"), device="cpu", load_model=False).tokenizer
    assert llava.decode(spell(llava, JAPANESE, "--template")) == JAPANESE


def test_generate_refuses_an_unspellable_template_or_answer_before_writing(demo, tmp_path, capsys):
    base = ["generate", "--model", str(demo_model_path()), "--data", str(demo["root"] / "data.jsonl"), "--probe",
            str(demo["root"] / "probe"), "--device", "cpu", "--threshold", "1.0", "--max-new-tokens", "10",
            "--no-progress"]
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main([*base, "--template", JAPANESE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--template {JAPANESE!r}: the model's tokenizer cannot spell it" in err, err
    assert "['<unk>', '<unk>']" in err and not out.exists()
    assert main([*base, "--answers", "はい,no", "--out", str(out)]) == 2
    assert "--answers 'はい': the model's tokenizer cannot spell it" in capsys.readouterr().err and not out.exists()
    # The demo's template is spelled in the tokenizer's lower case, and every (flagged) row starts with it.
    assert main([*base, "--template", DEMO_TEMPLATE, "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4 and all(x["flagged"] for x in lines)
    assert all(x["response"].startswith(DEMO_TEMPLATE.lower()) for x in lines), lines


def test_serve_refuses_an_unspellable_template_or_answer_at_start(demo):
    base = ["serve", "--model", str(demo_model_path()), "--probe", str(demo["root"] / "probe"), "--device", "cpu"]
    with pytest.raises(LvlmlpError, match=re.escape(f"--template {JAPANESE!r}: the model's tokenizer cannot spell")):
        build_app(build_parser().parse_args([*base, "--template", JAPANESE]))
    with pytest.raises(LvlmlpError, match=re.escape("--answers 'ja': the model's tokenizer cannot spell it")):
        build_app(build_parser().parse_args([*base, "--answers", "ja,no"]))
    guard = build_app(build_parser().parse_args([*base, "--template", DEMO_TEMPLATE])).state.batcher.engine.guard
    assert demo["backend"].tokenizer.decode(guard.template_ids) == DEMO_TEMPLATE.lower()
    assert isinstance(guard, ProbeGuard)


def test_run_refuses_an_unspellable_steering_template_before_extracting(tmp_path):
    cfg = demo_config("safety", tmp_path, n_train=8, n_test=8)
    cfg.steering.template = JAPANESE
    with pytest.raises(LvlmlpError, match=re.escape(f"steering.template {JAPANESE!r}: the model's tokenizer cannot")):
        run_experiment(cfg, progress=False)
    assert not (tmp_path / "safety" / "runs").exists()  # nothing extracted


@pytest.mark.mutation_guard
def test_default_guard_forces_the_styles_words_else_the_safety_template():
    """Catches: the default guard of a task without a style (its default style's words: POPE's yes / no) or of a
    custom template (style "") taken from another rule, the dataset-answer marker kept as a word, a style with one
    label's words not forcing that label-0 phrase, and a style without words not falling back to SAFETY_TEMPLATE."""
    from lvlmlp.steering.guard import default_guard

    assert default_guard() == (SAFETY_TEMPLATE, None)
    assert default_guard("pope") == (None, {1: "yes", 0: "no"})  # no style: the task's default one (oe)
    assert default_guard("pope", "") == (SAFETY_TEMPLATE, None)  # a custom template: no words of the task
    assert default_guard("mmsafety", "mq") == (None, {1: "No", 0: "Yes"})
    assert default_guard("vizwiz", "oeh") == ("Unanswerable", None)  # label 1's "=answer" is no word to force
    assert default_guard("mmsafety") == (SAFETY_TEMPLATE, None)  # its default style defines no words


@pytest.mark.mutation_guard
def test_guided_decoding_records_every_row_by_id_over_batches_with_unbalanced_labels(setups, tmp_path, capsys):
    """Catches: records under other keys, the flag stored as the score, a row without an unguarded answer recorded
    as other than "", refusals counted without the template (a forced neutral text is a refusal only through it),
    label counts that coincide only with balanced labels, batches that skip rows, the progress bar shown by default
    or without its name, and images read without their row's id or the model's size check."""
    from lvlmlp.probing.baselines import AnswerRule
    from lvlmlp.steering.guard import guided_decoding

    backend, _, probe, _ = setups("llava")
    rows = [json.loads(x) for x in make_manifest(tmp_path, n=5).read_text().splitlines()]
    rows = [{**r, "image": str(tmp_path / r["image"])} for r in rows]
    X = backend.prefill(backend.encode([load_image(r["image"]) for r in rows], [r["question"] for r in rows]))
    scores = probe.predict_proba(X["logits"].numpy())[:, 1]
    template = "Blue sky."  # forced on flagged rows; no refusal phrase, so only the template makes it a refusal
    assert AnswerRule().score(template + " It is.") != 0.0
    labels = {"r0": 1, "r1": 1, "r2": 1, "r3": 0, "r4": 1}
    before = {"r0": "a plain answer", "r1": None, "r2": template + " x", "r3": "another answer", "r4": "fine"}
    capsys.readouterr()
    summary, records = guided_decoding(backend, probe, rows, before, labels, template, max_new_tokens=K,
                                       batch_size=2)
    assert capsys.readouterr().err == ""  # no progress bar unless asked
    assert [sorted(r) for r in records] == [["flagged", "id", "label", "probe_score", "response_after",
                                             "response_before"]] * 5
    assert [r["id"] for r in records] == ["r0", "r1", "r2", "r3", "r4"]
    assert [r["label"] for r in records] == [1, 1, 1, 0, 1]
    assert_same_scores(np.array([r["probe_score"] for r in records]), scores)
    flagged = [r["flagged"] for r in records]
    assert flagged == (scores < probe.threshold).tolist() and flagged[:4] == [False, True, False, True]
    assert [r["response_before"] for r in records] == ["a plain answer", "", template + " x", "another answer", "fine"]
    assert all(r["response_after"].startswith(template) for r in records if r["flagged"])

    def refused(text: str) -> bool:
        return text.startswith(template) or AnswerRule().score(text) == 0.0

    for key, side in (("response_before", "before"), ("response_after", "after")):
        assert summary[side] == {"label0_answered": int(not refused(records[3][key])),
                                 "label1_refused": sum(refused(records[i][key]) for i in (0, 1, 2, 4)),
                                 "n_label0": 1, "n_label1": 4}
    assert summary["before"]["label1_refused"] == 1 and summary["after"]["label1_refused"] >= 2  # r2; r1 forced
    guided_decoding(backend, probe, rows[:1], before, labels, template, max_new_tokens=2, progress=True)
    assert "guided decoding: " in capsys.readouterr().err  # tqdm's "DESC: 100%|..."
    Image.new("RGB", (100000, 1)).save(tmp_path / "thin.png")
    with pytest.raises(LvlmlpError, match=r"^row 'thin': .*thin\.png: the image is 100000x1 pixels, which the "):
        guided_decoding(backend, probe, [{"id": "thin", "image": str(tmp_path / "thin.png"), "question": "q?"}],
                        {"thin": "a"}, {"thin": 1}, template, max_new_tokens=2)
    with pytest.raises(LvlmlpError, match=r"^row 'gone': image not found: "):
        guided_decoding(backend, probe, [{"id": "gone", "image": str(tmp_path / "gone.png"), "question": "q?"}],
                        {"gone": "a"}, {"gone": 1}, template, max_new_tokens=2)


@pytest.mark.mutation_guard
def test_make_guard_checks_the_probes_own_feature_kind_and_model(setups, caplog):
    """Catches: a log-softmax probe checked as a raw-logits one (refused though it fits the model), and a probe of
    another model let through without --allow-other-model (or refused with it)."""
    from lvlmlp.steering.guard import make_guard

    backend, _, _, X = setups("llava")
    y = np.array(LABELS)
    own = LogisticProbe(C=1e4).fit(X, y, spec=FeatureSpec(kind="log_softmax", dim=X.shape[1],
                                                          model=backend.model_id))
    guard = make_guard(own, backend, TEMPLATE)
    assert guard.probe is own and guard.template_ids == spell(backend.tokenizer, TEMPLATE, "--template")
    other = LogisticProbe(C=1e4).fit(X, y, spec=FeatureSpec(kind="logits", dim=X.shape[1], model="someone/else"))
    with pytest.raises(LvlmlpError, match=re.escape(f"--probe: trained on features of 'someone/else', not of --model "
                                                    f"{backend.model_id!r}; pass --allow-other-model")):
        make_guard(other, backend, TEMPLATE)
    with caplog.at_level(logging.WARNING, logger="lvlmlp"):
        assert make_guard(other, backend, TEMPLATE, allow_other_model=True).probe is other
    assert "probe trained on features of someone/else" in caplog.text


@pytest.mark.mutation_guard
def test_spelling_squeezes_whitespace_only_and_reads_slow_tokenizers_without_a_normalizer(demo, tmp_path):
    """Catches: whitespace replaced by something else when the decoded text and the user's are compared (the demo's
    WordPiece tokenizer decodes "Sorry,I" as "sorry, i"), and a tokenizer without a fast backend (no normalizer)
    failing instead of comparing the text as written."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tok = demo["backend"].tokenizer
    assert tok.decode(spell(tok, "Sorry,I cannot help with that.", "--template")) == DEMO_TEMPLATE.lower()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "sorry", ",", "i",
                                                   "cannot", "help"]) + "\n")
    slow = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))  # transformers' Python WordPiece: no backend_tokenizer
    assert not hasattr(slow, "backend_tokenizer")
    assert slow.convert_ids_to_tokens(spell(slow, "sorry, i cannot help", "--template")) == [
        "sorry", ",", "i", "cannot", "help"]
    with pytest.raises(LvlmlpError, match="cannot spell it"):  # lower-cased without a normalizer to say so
        spell(slow, "Sorry", "--template")
