"""A guard text the tokenizer cannot spell back is refused before anything runs (generate, serve, run's steering).

The demo checkpoint's WordPiece tokenizer lower-cases and knows a small vocabulary: "Sorry, I cannot help with
that." comes back as "sorry, i cannot help with that." (its own normalisation: accepted, and forced as such), while
Japanese text or "I'm" become `<unk>` tokens (refused). The tiny byte-level checkpoints spell every text.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from lvlmlp.cli import build_parser, main
from lvlmlp.commands.serve import build_app
from lvlmlp.data import load_image
from lvlmlp.demo.pipeline import demo_config, demo_model_path
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.probing.probes import LogisticProbe
from lvlmlp.steering.guard import ProbeGuard, spell
from lvlmlp.study.experiment import run_experiment

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
