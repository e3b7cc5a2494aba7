"""MathVista's own scoring of a response: GPT answer extraction, then normalisation and comparison (`true_false`).

Ported from the lupantech/MathVista version that LVLM-LP's Task4_Unc_eval.ipynb ran (its `--output_dir
--output_file --llm_engine` flags are those of the first release, commit ed0d56d):

- `evaluation/extract_answer.py` `extract_answer`: an empty response, a multiple-choice response that is one of
  the choices, or an integer/float response that parses as one is its own extraction (no request); otherwise the
  prompt of `create_test_prompt` (the few-shot `demo_prompt` stripped, the query, the response, "Extracted
  answer: ") goes to the model as one USER message (`utilities.get_chat_response`: temperature 0, max_tokens 256)
  and the stripped reply is the extraction. `--quick_extract` was not used by the notebook, nor here.
- `evaluation/calculate_score.py` `normalize_extracted_answer` + `safe_equal`: a multiple-choice extraction "(B)"
  or "B" becomes that option's text, anything else the option nearest in Levenshtein distance; integers through
  `int(float(x))`; floats `round(float(x), precision)`; lists `str(x)`; then `prediction == answer`.

Rounding: the original passed the record's `precision` to `round` as it was. The Hugging Face release (which the
notebook read) stores it as a float (1.0), and `round(x, 1.0)` raises, so every float question scored false;
MathVista fixed this in Nov 2024 (`int(precision)`). `rounding="paper"` reproduces the former (lvlmlp's rows carry
`precision` as a float, as that release does), `rounding="fixed"` the latter (docs/paper-protocol.md).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from lvlmlp.errors import LvlmlpError
from lvlmlp.judging.templates import MATHVISTA, templates

Rounding = Literal["paper", "fixed"]
ROUNDINGS = ("paper", "fixed")
REQUEST_PARAMS = {"temperature": 0, "max_tokens": 256}  # utilities.get_chat_response's defaults
FIELDS = ("answer", "question_type", "answer_type", "choices", "precision")


def check_row(meta: dict[str, Any], where: str) -> None:
    """A MathVista run row carries the record fields the scoring reads; a self-evaluation row is not judged."""
    if "solution" in meta:
        raise LvlmlpError(f"{where}: row {meta.get('id')!r} is a self-evaluation row (its label is the true_false "
                          "of its input file); judge the first pass's run instead")
    for key in FIELDS:
        if key not in meta:
            raise LvlmlpError(f"{where}: row {meta.get('id')!r} has no {key!r} field; judge a run extracted with "
                              "--task mathvista")
    if meta["question_type"] == "multi_choice" and not meta["choices"]:
        raise LvlmlpError(f"{where}: row {meta.get('id')!r} is multiple choice without 'choices'")


def rule_extraction(response: str, row: dict[str, Any]) -> str | None:
    """extract_answer's answers without a model call, or None when the model must be asked."""
    if response == "":
        return ""
    if row["question_type"] == "multi_choice" and response in (row["choices"] or []):
        return response
    if row["answer_type"] == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if row["answer_type"] == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    return None


def extraction_prompt(query: str, response: str) -> str:
    """create_test_prompt(demo_prompt, query, response)."""
    demo = templates()[MATHVISTA].strip()
    return f"{demo}\n\n{query}\n\n{response}\n\nExtracted answer: "


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each), as Levenshtein.distance."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def normalize(extraction: Any, row: dict[str, Any], rounding: Rounding = "paper") -> str | None:
    """normalize_extracted_answer(extraction, choices, question_type, answer_type, precision)."""
    choices, precision = row["choices"], row["precision"]
    if row["question_type"] == "multi_choice":
        extraction = extraction.strip() if isinstance(extraction, str) else str(extraction)
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if len(letter) > 0:
            extraction = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        distances = [levenshtein(extraction, choice) for choice in choices]
        return choices[distances.index(min(distances))]
    answer_type = row["answer_type"]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            digits = precision if rounding == "paper" else int(precision)
            return str(round(float(extraction), digits))
    except (TypeError, ValueError, OverflowError):  # the original's bare `except:` -> None
        return None
    if answer_type == "list":
        return str(extraction)
    return extraction


def true_false(extraction: str, row: dict[str, Any], rounding: Rounding = "paper") -> bool:
    """safe_equal(normalize(extraction), answer)."""
    return normalize(extraction, row, rounding) == row["answer"]


def judged_labels(run: Any) -> Any:
    """(N,) float labels of a MathVista run: MathVista's `true_false` where the run's judgments hold a readable one
    for the row's current response, else the deterministic checker's label (`lvlmlp.tasks.mathvista`); None when
    the run has no such judgment (its own labels stand)."""
    import hashlib

    import numpy as np

    from lvlmlp.judging.store import read_judgments
    from lvlmlp.tasks.mathvista import label_from_responses

    judgments = read_judgments(run.path)
    judged: dict[str, bool] = {}
    for meta in run.meta:
        j = judgments.get(meta["id"])
        if j is None or j.template != MATHVISTA or j.verdict is None or meta.get("response") is None:
            continue
        sha = hashlib.sha256(extraction_prompt(meta["question"], meta["response"]).encode("utf-8")).hexdigest()
        if j.prompt_sha256 == sha:  # a judgment of this very response (not of an earlier extraction's)
            judged[meta["id"]] = j.verdict == "true"
    if not judged:
        return None
    return np.array(label_from_responses(run.meta, judged), dtype=float)
