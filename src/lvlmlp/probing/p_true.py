"""P(True) (Kadavath et al. 2022; lm-polygraph's `PTrue`): a second pass that asks the model whether its own answer is
correct, scored by the probability of "Yes" as its first token.

The question is the paper's MathVista self-evaluation wording (the original's dataset/MathV.py, here
`lvlmlp.tasks.mathvista.SELF_EVAL`, its open quote kept), generalised to every task: `{query}` is the row's question
(the text the task gives, before any prompt style) and `{response}` the model's own answer from the run. The pass
is one prefill per row, with the row's image, through the model's chat template without a prompt style (as the
original's self-evaluation pass ran with style `oe`, whose template is the question itself). The score is the
softmax probability of the first generated token summed over the ids that may start "Yes"
(`baselines.answer_token_ids`, as `token-prob:Yes`): higher = the model says its answer is right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lvlmlp.defaults import BATCH_SIZE
from lvlmlp.errors import LvlmlpError

NAME = "p-true"


def self_eval_question(question: str, response: str) -> str:
    """The self-evaluation question of a row: the paper's MathVista wording with this row's question and answer."""
    from lvlmlp.tasks.mathvista import SELF_EVAL

    return SELF_EVAL.format(query=question, response=response)


def p_true_scores(backend: Any, rows: Sequence[dict], responses: Mapping[str, str | None], batch_size: int = BATCH_SIZE
                  ) -> np.ndarray:
    """P("Yes") of the self-evaluation pass for each row (`responses`: row id -> the model's answer). The backend's
    prompt style is left out of the pass (a backend of its own, sharing the model: `Backend.with_prompt_template`);
    `backend` itself is not changed."""
    import torch

    from lvlmlp.data import load_image
    from lvlmlp.probing.baselines import answer_token_ids

    missing = [r["id"] for r in rows if responses.get(r["id"]) is None]
    if missing:
        raise LvlmlpError(f"row {missing[0]!r}: no answer to self-evaluate (P(True) needs the run's responses: "
                          "extract with max_new_tokens >= 1)")
    yes = answer_token_ids(backend.tokenizer, "Yes")
    plain = backend.with_prompt_template(None)
    out = np.empty(len(rows))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images = [load_image(r["image"], r["id"]) for r in chunk]
        questions = [self_eval_question(str(r["question"]), str(responses[r["id"]])) for r in chunk]
        logits = plain.prefill(plain.encode(images, questions))["logits"].double()
        probs = torch.softmax(logits, dim=-1)[:, yes].sum(dim=-1)
        out[start : start + len(chunk)] = probs.cpu().numpy()
    return out
