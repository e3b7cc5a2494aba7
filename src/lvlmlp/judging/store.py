"""`judgments.jsonl` in a run folder: one JSON object per judged row, appended as replies arrive.

Each line: `id` (the run's row id), `template` (the judge template's name, e.g. `gpt_query_template_answer`),
`prompt_sha256` (of the filled template as sent), `reply` (the judge's message content as received) and
`verdict` (the reply read by the template's rule: e.g. "yes"/"no" or "safe"/"unsafe"; null when the rule cannot
read it: such rows are counted, never guessed). A later line for the same id replaces an earlier one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lvlmlp.errors import LvlmlpError

JUDGMENTS_FILE = "judgments.jsonl"


@dataclass(frozen=True)
class Judgment:
    template: str
    prompt_sha256: str
    reply: str
    verdict: str | None


def read_judgments(run_dir: str | Path) -> dict[str, Judgment]:
    """Row id -> its latest judgment; {} when the run was never judged. A damaged line is a one-line error naming
    the file and the line (a torn last line, left by a killed judge, is ignored: that row is judged again)."""
    path = Path(run_dir) / JUDGMENTS_FILE
    if not path.is_file():
        return {}
    lines = path.read_bytes().split(b"\n")
    out: dict[str, Judgment] = {}
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            row_id, verdict = obj["id"], obj["verdict"]
            judgment = Judgment(str(obj["template"]), str(obj["prompt_sha256"]), str(obj["reply"]),
                                None if verdict is None else str(verdict))
        except (ValueError, KeyError, TypeError) as err:
            if lineno == len(lines):  # the last line without its newline: a write cut short
                break
            raise LvlmlpError(f"{path}: line {lineno} is not a judgment ({type(err).__name__}: {err})") from None
        out[str(row_id)] = judgment
    return out
