"""Probe-guided decoding on tiny real checkpoints: flagged rows start with the template, unflagged rows equal plain
decoding token for token (greedy and seeded sampling, left-padded batches), the in-generate score equals the
probe on the extracted run, answer forcing continues greedily, beam search is refused, and the CLI contract."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessorList

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.probing.features import FeatureSpec
from lvlmlp.probing.probes import LogisticProbe, load_probe
from lvlmlp.steering.guard import SAFETY_TEMPLATE, ProbeGuard, guarded_generate, is_refusal

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


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "instructblip"])
def test_flagged_rows_get_template_unflagged_rows_unchanged(setups, family):
    backend, batch, probe, X = setups(family)
    assert (batch["attention_mask"] == 0).any(), "the batch should be left-padded"
    plain = backend.generate(batch, max_new_tokens=K)
    guard = ProbeGuard(probe, backend.tokenizer, TEMPLATE)
    with guard.watching(backend.model):
        res = backend.generate(batch, max_new_tokens=K, logits_processor=LogitsProcessorList([guard]))

    assert guard.flagged_.tolist() == [False, True, False, True]
    assert_same_scores(guard.scores_, probe.predict_proba(X)[:, 1])  # generate's logits vs prefill's
    n_tpl = len(guard.template_ids)
    for i in (1, 3):
        assert res["sequences"][i, :n_tpl].tolist() == guard.template_ids
        assert res["responses"][i].startswith(TEMPLATE)
        assert res["n_tokens"][i] > n_tpl  # the model continued after the template (or stopped with EOS there)
    for i in (0, 2):
        assert torch.equal(res["sequences"][i], plain["sequences"][i])
        assert res["responses"][i] == plain["responses"][i]
    # The guard never edits generate's raw logits in place (Backend returns them as the raw first-token logits).
    assert torch.equal(res["logits"][:, 0], plain["logits"][:, 0])


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
