"""P(True) (issue 30): the self-evaluation pass's first-token P("Yes") on a tiny real checkpoint equals a direct
computation with plain transformers (the question written out here, the "Yes" ids taken from the tokenizer)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.probing.p_true import p_true_scores, self_eval_question
from lvlmlp.testing import tiny_manifest


def test_question_is_the_papers_wording() -> None:
    assert self_eval_question("How many cats?", "2") == (
        "Given the image,\nthe query 'How many cats?',\nand an answer '2.\n"
        "Is the answer correct? Please respond with 'Yes' or 'No'.")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_p_true_equals_a_direct_computation(tiny_ckpt, tmp_path, family: str) -> None:
    ckpt = tiny_ckpt(family)
    manifest = tiny_manifest(tmp_path / "data")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:3]
    for r in rows:
        r["image"] = str(manifest.parent / r["image"])
    answers = {rows[0]["id"]: "Yes, it is bright", rows[1]["id"]: "no", rows[2]["id"]: "a dark square"}
    backend = Backend(ckpt, device="cpu", dtype="float32", prompt_template="Answer briefly. {question}")
    got = p_true_scores(backend, rows, answers, batch_size=3)
    assert backend.prompt_template == "Answer briefly. {question}"  # restored after the pass

    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    proc = AutoProcessor.from_pretrained(ckpt)
    tok = proc.tokenizer
    yes = []
    for variant in ("Yes", " Yes"):
        first = next(t for t in tok.encode(variant, add_special_tokens=False) if tok.decode([t]).strip())
        if first not in yes:
            yes.append(first)
    for i, r in enumerate(rows):
        text = (f"Given the image,\nthe query '{r['question']}',\nand an answer '{answers[r['id']]}.\n"
                "Is the answer correct? Please respond with 'Yes' or 'No'.")
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
        inputs = proc(images=[Image.open(r["image"]).convert("RGB")], text=[prompt], return_tensors="pt")
        with torch.inference_mode():
            logits = model(**inputs).logits[0, -1].double()
        expected = float(torch.softmax(logits, dim=-1)[yes].sum())
        # batch of 3 (left-padded) against one row: float32 rounding only
        assert got[i] == pytest.approx(expected, abs=1e-6, rel=1e-4)
    assert np.all((got > 0) & (got < 1))


def test_a_row_without_an_answer_is_refused(tiny_ckpt, tmp_path) -> None:
    manifest = tiny_manifest(tmp_path / "data")
    row = json.loads(manifest.read_text().splitlines()[0])
    backend = Backend(tiny_ckpt("llava"), device="cpu", dtype="float32", load_model=False)
    with pytest.raises(LvlmlpError, match=r"^row 'train-0': no answer to self-evaluate \(P\(True\) needs the run's "
                                          r"responses: extract with max_new_tokens >= 1\)$"):
        p_true_scores(backend, [row], {"train-0": None})
