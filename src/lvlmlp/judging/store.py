"""`judgments.jsonl` in a run folder: one JSON object per judged row, appended as replies arrive.

Each line: `id` (the run's row id), `template` (the judge template's name, e.g. `gpt_query_template_answer`),
`prompt_sha256` (of the filled template as sent), `reply` (the judge's message content as received) and
`verdict` (the reply read by the template's rule: e.g. "yes"/"no" or "safe"/"unsafe"; null when the rule cannot
read it: such rows are counted, never guessed). A later line for the same id replaces an earlier one.
`lvlmlp judge` adds `model` (the judge model asked), `sent` (false: MathVista's rules extracted the answer without
a request), `usage` (the reply's token counts) and, for MathVista, `prediction` (the normalised extraction).

`JudgmentLog` appends: one `write` per line, flushed and fsynced, so a killed judge leaves whole lines and at most
one torn last line, which the next judge cuts off before appending (the folder lock keeps writers one at a time).
"""

from __future__ import annotations

import json
import os
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
    model: str | None = None  # the judge model asked (None: not recorded)


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
            model = obj.get("model")
            judgment = Judgment(str(obj["template"]), str(obj["prompt_sha256"]), str(obj["reply"]),
                                None if verdict is None else str(verdict), None if model is None else str(model))
        except (ValueError, KeyError, TypeError) as err:
            if lineno == len(lines):  # the last line without its newline: a write cut short
                break
            raise LvlmlpError(f"{path}: line {lineno} is not a judgment ({type(err).__name__}: {err})") from None
        out[str(row_id)] = judgment
    return out


class JudgmentLog:
    """Appends judgments to `RUN/judgments.jsonl`, one durable line at a time. The caller holds the run folder's
    lock (`lvlmlp.locking.locked_folder`)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / JUDGMENTS_FILE
        self._fd: int | None = None  # opened at the first line: a judge that sends nothing leaves no file

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A line torn by a killed judge: cut it off, or the next line would be glued to it.
            data = os.pread(fd, size, 0)
            os.ftruncate(fd, data.rfind(b"\n") + 1)
            os.fsync(fd)
        return fd

    def append(self, record: dict) -> None:
        if self._fd is None:
            self._fd = self._open()
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, line)
        if written != len(line):  # a short write (full disk): cut it off, keep the file whole
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
            raise OSError(28, f"{self.path}: short write")
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JudgmentLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
