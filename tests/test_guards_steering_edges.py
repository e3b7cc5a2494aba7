"""Guards of probe-guided decoding (steering/guard.py) written against its surviving mutants (docs/mutation-report.md):
`--answers` parsing, beam search refused from the model's own generation config, caller processors kept, scores of
half-precision logits, the steering metrics' fields, and the probe/model check (paths, warning, message)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from transformers import GenerationConfig, LogitsProcessorList, MinNewTokensLengthLogitsProcessor

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.probing.features import FeatureSpec
from lvlmlp.probing.probes import LogisticProbe
from lvlmlp.steering.guard import (
    ProbeGuard,
    check_probe_model,
    guarded_generate,
    parse_answers,
    steering_metrics,
)


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


def test_parse_answers_needs_exactly_two_non_empty_answers():
    """Catches: three answers accepted, the message lost."""
    assert parse_answers(" Yes , No ") == {1: "Yes", 0: "No"} and parse_answers(None) is None
    for bad in ("Yes,No,Maybe", "Yes,", "Yes"):
        with pytest.raises(LvlmlpError, match=re.escape(f"--answers: expected LABEL1,LABEL0 such as Yes,No, got "
                                                        f"{bad!r}") + "$"):
            parse_answers(bad)


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


def test_scores_of_half_precision_logits_equal_the_probe_on_float32(llava):
    """Catches: logits handed to the probe in their own dtype (bfloat16 has no numpy type; float16 loses bits)."""
    _, backend, batch, probe = llava
    guard = ProbeGuard(probe, backend.tokenizer, "No.")
    logits = backend.prefill(batch)["logits"]
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        expected = probe.predict_proba(low.to(torch.float32).numpy())[:, 1]
        np.testing.assert_allclose(guard.score(low), expected, rtol=0, atol=1e-6)


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


def test_a_leading_bos_is_dropped_from_the_template(llava):
    """Catches: the template's ids taken with special tokens, or a leading BOS kept (or one token too many
    dropped): forced answers must be exactly the tokens that continue the prompt."""
    _, backend, _, probe = llava
    tok = backend.tokenizer
    with_bos = tok.encode(f"{tok.bos_token}Sorry, no.", add_special_tokens=False)
    assert tok.bos_token_id is not None and with_bos[0] == tok.bos_token_id  # the tokenizer reads the BOS text
    assert ProbeGuard(probe, tok, f"{tok.bos_token}Sorry, no.").template_ids == with_bos[1:]
    assert ProbeGuard(probe, tok, "Sorry, no.").template_ids == tok.encode("Sorry, no.", add_special_tokens=False)


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
