"""MathVista testmini: the label is whether the MODEL's answer is right, so rows carry no label.

Labels come later from the run's responses: `label_from_responses(run.meta)`, or, for a run judged with `lvlmlp
judge --task mathvista`, MathVista's own GPT answer extraction (`label_from_responses(run.meta, judged)`, see
`lvlmlp.judging.mathvista.judged_labels`) for the rows it judged. The checker is deterministic
(no LLM answer extraction): it reads the final answer span of the response and compares it by the question's
type, so the same responses always give the same labels. Records that carry an externally judged `true_false`
(the original's MathV_output.json after MathVista's GPT-4 answer extraction) keep that judgement instead.

`self_eval=true` is the original's second pass (dataset/MathV.py with a model name as split): every record of a
file with responses (MathV_output.json) becomes the question "Given the image, the query ..., and an answer ...
Is the answer correct?" and its label is `true_false` (or the checker's verdict).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from lvlmlp.errors import LvlmlpError
from lvlmlp.tasks.base import Request, Task, read_json, require

FIELDS = ("pid", "image", "query", "answer", "question_type", "answer_type", "choices", "precision", "unit")
JSON_NAMES = ("testmini.json", "annot_testmini.json", "data/testmini.json")
PARQUET_GLOBS = ("testmini*.parquet", "data/testmini*.parquet")

LAYOUT = """\
<data-root>/testmini.json (or annot_testmini.json, data/testmini.json): a JSON object pid -> record, or a list
    of records with "pid", "image" (relative path), "query", "answer", "question_type" (multi_choice |
    free_form), "answer_type" (text | integer | float | list), "choices", "precision", "unit"
<data-root>/data/testmini-*.parquet  the Hugging Face release instead (needs pyarrow)
--data-root may also be the JSON or parquet file itself
<image-root>/images/1.jpg ...        "image" paths are relative to it; default the data root (the file's folder
    when --data-root is a file)
--data-root may also be the original's MathV_output.json: a JSON object "1".."1000" -> the testmini record plus
    "response" and the judged "true_false" (used as the label instead of the checker's)
split: testmini only; the original evaluates with 10-fold StratifiedKFold (no shuffling) on it
prompt: default style oeh (the query + the VizWiz hint: what the original's MathVista scripts sent), or oe, cot
labels: none in the rows; after extraction, label_from_responses(run.meta) gives correct (1) / wrong (0)
option self_eval = true: the self-evaluation pass on a file with "response" (MathV_output.json); the row's
    question is the self-evaluation text (use prompt style oe, its template is the question itself) and its
    label is true_false, or the checker's verdict when absent
row id: pid"""

SELF_EVAL = (
    "Given the image,\nthe query '{query}',\nand an answer '{response}.\n"
    "Is the answer correct? Please respond with 'Yes' or 'No'."
)  # sic: the original leaves the answer's quote open (dataset/MathV.py)


def load(req: Request) -> list[dict]:
    path = _find_annotations(req)
    if req.data_root.is_file():  # a file as data root: images default to its folder
        req = replace(req, data_root=req.data_root.parent)
    records = _read_parquet(path, req.task) if path.suffix == ".parquet" else read_json(path, req.task)
    if isinstance(records, dict):
        records = [{"pid": pid, **rec} for pid, rec in records.items()]
    if not isinstance(records, list):
        raise req.error(f"{path}: expected a JSON object pid -> record, or a list of records")
    images = req.images(".")
    self_eval = str(req.options.get("self_eval", "false")).strip().lower()
    if self_eval not in ("true", "false"):
        raise req.error(f"option self_eval must be true or false, got {req.options['self_eval']!r}")
    rows = []
    for i, rec in enumerate(records):
        where = f"{req.task}: {path}: record {rec.get('pid', i)!r}"
        row = {
            "id": str(require(rec, "pid", where)),
            "image": str(images / require(rec, "image", where)),
            "question": require(rec, "query", where),
            "answer": str(require(rec, "answer", where)),
            "question_type": require(rec, "question_type", where),
            "answer_type": require(rec, "answer_type", where),
            "choices": _plain_list(rec.get("choices")),
            "precision": _plain_number(rec.get("precision")),
            "unit": rec.get("unit") or None,
        }
        if rec.get("true_false") is not None:
            row["true_false"] = bool(rec["true_false"])
        if self_eval == "true":
            response = str(require(rec, "response", where))
            row["query"], row["solution"] = row["question"], response  # not "response": the run writes its own
            row["question"] = SELF_EVAL.format(query=row["query"], response=response)
            row["label"] = int(row["true_false"]) if "true_false" in row else int(check_answer(response, row))
        rows.append(row)
    return rows


def _find_annotations(req: Request) -> Path:
    root = req.data_root
    if root.is_file():
        return root
    for name in JSON_NAMES:
        if (root / name).is_file():
            return root / name
    for pattern in PARQUET_GLOBS:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    return req.annotation(JSON_NAMES[0])  # raises, naming the first expected file


def _read_parquet(path: Path, task: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LvlmlpError(
            f"{task}: reading {path} needs pyarrow (pip install pyarrow), or pass the JSON annotation file"
        ) from None
    columns = [c for c in FIELDS if c in pq.read_schema(path).names]  # skip the big decoded_image column
    return pq.read_table(path, columns=columns).to_pylist()


def _plain_list(value: Any) -> list[str] | None:
    # Parquet gives numpy arrays or None; the run's metadata must be plain JSON.
    return None if value is None else [str(v) for v in list(value)]


def _plain_number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


# ---------------------------------------------------------------------------------------------- answer checker

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_FINAL = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*", re.IGNORECASE)
_LETTER = re.compile(r"^\(?([A-Z])\)?(?=$|[\s.:),\]])")


def check_answer(response: str, row: dict) -> bool:
    """Is `response` the right answer to the MathVista record `row`?

    Only the span after the last "answer is" / "answer:" is read (the whole response when absent). Multiple
    choice accepts the option letter (A, (B), C.) or the option text; integers and floats are the first number
    of that span (thousands separators and units ignored), floats compared after rounding to `precision`
    decimals (default: the answer's own decimals); lists compare their numbers in order; text answers compare
    case- and whitespace-insensitively.
    """
    answer = str(row["answer"])
    span = _final_span(response or "")
    if not span:
        return False
    if row.get("question_type") == "multi_choice":
        return _check_choice(span, [str(c) for c in row.get("choices") or []], answer)
    answer_type = row.get("answer_type")
    if answer_type in ("integer", "float"):
        got = _first_number(span)
        if got is None:
            return False
        if answer_type == "integer":
            return got == float(answer)
        precision = row.get("precision")
        digits = int(precision) if precision is not None else _decimals(answer)
        return round(got, digits) == round(float(answer), digits)
    if answer_type == "list":
        want = [_to_float(n) for n in _NUMBER.findall(answer)]
        got_list = [_to_float(n) for n in _NUMBER.findall(span)]
        return bool(want) and got_list == want
    return _norm_text(span) == _norm_text(answer)


def response_label(response: str, row: dict) -> int:
    """A row's label from the model's response: the row's own label when it has one (the self-evaluation pass),
    else its externally judged `true_false`, else the deterministic checker's verdict."""
    if row.get("label") is not None:
        return int(row["label"])
    if row.get("true_false") is not None:  # judged outside (the original: GPT-4 answer extraction)
        return int(bool(row["true_false"]))
    return int(check_answer(response, row))


def label_from_responses(rows_meta: list[dict], judged: Mapping[str, bool] | None = None) -> list[int]:
    """Labels (correct = 1) for a run's rows: `open_run(dir).meta`, each with the record fields and `response`.
    `judged`: row id -> MathVista's own `true_false` (`lvlmlp judge --task mathvista`: its GPT answer extraction
    and comparison), used instead of the deterministic checker for the rows it holds."""
    judged = judged or {}
    labels = []
    for meta in rows_meta:
        if meta.get("id") in judged:
            labels.append(int(bool(judged[meta["id"]])))
            continue
        if meta.get("response") is None:
            raise LvlmlpError(
                f"mathvista: row {meta.get('id')!r} has no response; extract with generation (max_new_tokens > 1)"
            )
        if "answer" not in meta:
            raise LvlmlpError(
                f"mathvista: row {meta.get('id')!r} has no 'answer' field; is this a MathVista run?"
            )
        labels.append(response_label(meta["response"], {**meta, "label": None}))
    return labels


def _final_span(response: str) -> str:
    parts = _FINAL.split(response)
    return parts[-1].strip()


def _check_choice(span: str, choices: list[str], answer: str) -> bool:
    if answer not in choices and re.fullmatch(r"[A-Z]", answer) and ord(answer) - 65 < len(choices):
        answer = choices[ord(answer) - 65]  # some copies store the letter instead of the option text
    picked = _pick_choice(span, choices)
    return picked is not None and _norm_text(picked) == _norm_text(answer)


def _pick_choice(span: str, choices: list[str]) -> str | None:
    norm = _norm_text(span)
    for choice in choices:  # the option text itself wins over a letter ("A" could be an option)
        if _norm_text(choice) == norm:
            return choice
    letter = _LETTER.match(span)
    if letter and ord(letter.group(1)) - 65 < len(choices):
        return choices[ord(letter.group(1)) - 65]
    # An option's text inside a sentence, as a whole word; ambiguous when several options appear.
    inside = [
        c for c in choices if c.strip() and re.search(rf"(?<!\w){re.escape(_norm_text(c))}(?!\w)", norm)
    ]
    return inside[0] if len(inside) == 1 else None


def _first_number(span: str) -> float | None:
    found = _NUMBER.search(span)
    return None if found is None else _to_float(found.group())


def _to_float(text: str) -> float:
    return float(text.replace(",", ""))


def _decimals(answer: str) -> int:
    return len(answer.split(".", 1)[1]) if "." in answer else 0


def _norm_text(text: str) -> str:
    return " ".join(text.lower().strip().strip("\"'`").rstrip(".").split())


TASK = Task(
    name="mathvista",
    description="MathVista testmini: will the model answer correctly? (correct = 1, labels from its responses)",
    kind="binary-from-response",
    splits=("testmini",),
    label_names=("wrong", "correct"),
    layout=LAYOUT,
    default_image_root=".",
    load=load,
    default_split="testmini",
    label_fn=response_label,
    default_prompt_style="oeh",
    options=(("self_eval", "true: the self-evaluation pass on a file with responses (default false)"),),
)
