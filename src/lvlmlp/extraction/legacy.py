"""`lvlmlp import-legacy`: the paper's output JSON lines into a run folder, streamed line by line.

The paper's `run_model.py` writes one JSON object per sample: `image`, `model_name`, `question`, `label`,
`response`, `output_ids`, `logits` (the V raw logits of the first generated token, as text) and task keys such
as `scenario` or `category`. Such files reach many gigabytes, so they are read one line at a time and written in
shards by `RunWriter`; memory stays at one shard of rows. `logits` may also be a list of per-token lists (the
first K generated tokens); a single list is stored as token 0 (the original's default `--token_id 0`).

Row ids: `question_id` or `id` when present, else the line number. POPE's files repeat `question_id` in each
category, so a row with a `category` gets `CATEGORY/QUESTION_ID` (as the pope task names its rows). MathVista's
first pass (MathV.jsonl) has a `pid` and holds the GOLD ANSWER in `label`: it is kept as `answer` and the row's
label comes from `judged` (the original's MathV_output.json with GPT-4's `true_false`), else stays empty; the
self-evaluation file (MathV_self_eval.jsonl) has a `pid` and a 0/1 label, kept as it is.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.data import iter_json_lines
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import Run, RunWriter

log = logging.getLogger(__name__)

_LABEL_WORDS = {"yes": 1, "no": 0, "true": 1, "false": 0}


def _label(value: Any, where: str) -> int | None:
    """int labels as they are; "yes"/"no" (POPE) and "true"/"false" as 1/0; integral floats and strings."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _LABEL_WORDS:
            return _LABEL_WORDS[text]
        try:
            return int(text)
        except ValueError:
            pass
    raise LvlmlpError(f"{where}: label {value!r} is not an integer, yes/no or true/false")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _numbers(values: Any, t: int, width: int, where: str) -> np.ndarray:
    """One token's logits as floats: a string, null, NaN or infinity is refused here, naming the line."""
    if not isinstance(values, list):
        raise LvlmlpError(f"{where}: token {t}'s logits are not a list of numbers")
    if len(values) != width:
        raise LvlmlpError(f"{where}: token {t} has {len(values)} logits, expected {width}")
    arr = np.asarray(values)  # dtype inferred in C: numbers only give an int or float array (files hold 32k per row)
    if arr.dtype.kind not in "iuf":
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        raise LvlmlpError(f"{where}: token {t}'s logits hold {bad!r}, not a number")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise LvlmlpError(f"{where}: token {t}'s logits hold {arr[~np.isfinite(arr)][0]!r} (NaN or infinite)")
    return arr


def _judged(path: Path) -> dict[str, bool]:
    """pid -> true_false of MathVista's scored output file (a JSON object "1".."N" -> record)."""
    import json

    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LvlmlpError(f"{path}: cannot read MathVista's scored output ({err})") from None
    if not isinstance(records, dict):
        raise LvlmlpError(f"{path}: expected a JSON object index -> record with 'pid' and 'true_false'")
    out = {}
    for key, rec in records.items():
        if not isinstance(rec, dict) or "true_false" not in rec:
            raise LvlmlpError(f"{path}: record {key!r} has no 'true_false' (run MathVista's calculate_score.py)")
        out[str(rec.get("pid", key))] = bool(rec["true_false"])
    return out


def _token_rows(logits: Any, where: str) -> list[list[float]]:
    if not isinstance(logits, list) or not logits:
        raise LvlmlpError(f"{where}: 'logits' must be a non-empty list of numbers or of per-token lists")
    return logits if isinstance(logits[0], list) else [logits]


def import_legacy(
    path: str | Path,
    out: str | Path,
    vocab_size: int | None = None,
    max_tokens: int | None = None,
    dtype: str = "float32",
    model: str | None = None,
    shard_size: int = 256,
    judged: str | Path | None = None,
) -> Run:
    """Convert `path` (the paper's JSON lines) into the run folder `out`; re-running resumes.

    `vocab_size` checks every row's logits length (default: the first row's). `max_tokens` keeps at most that
    many generated tokens per row (default: the first row's count; a row with more is an error, never cut
    silently). `model` overrides the file's `model_name` (give a tokenizer path/id to use `token-prob`).
    `judged`: MathVista's MathV_output.json ("1".."N" -> record with `pid` and `true_false`) labelling a MathV.jsonl.
    """
    src = Path(path)
    if not src.is_file():
        raise LvlmlpError(f"{src}: no such file")
    if dtype not in ("float16", "float32"):
        raise LvlmlpError(f"--dtype {dtype}: choose float16 or float32")
    source_identity = {"source_size": src.stat().st_size, "source_sha256": _file_sha256(src)}
    verdicts = _judged(Path(judged)) if judged is not None else None
    writer: RunWriter | None = None
    width = k_tokens = 0
    seen: set[str] = set()
    position = 0

    order: list[str] = []
    try:
        for line_no, obj in iter_json_lines(src):
            where = f"{src}:{line_no}"
            if "logits" not in obj:
                raise LvlmlpError(f"{where}: no 'logits' field (responses without logits cannot be probed)")
            tokens = _token_rows(obj.pop("logits"), where)
            if writer is None:
                width = vocab_size or len(tokens[0])
                k_tokens = max_tokens or len(tokens)
                writer = RunWriter(
                    out,
                    {
                        "model": model or obj.get("model_name"),
                        "family": "legacy",
                        "dtype": dtype,
                        "vocab_size": width,
                        "prompt_template": None,
                        "max_new_tokens": k_tokens,
                        "hidden": False,
                        "layers": [],
                        "source": "import-legacy",
                        "source_file": str(src.resolve()),
                        **source_identity,  # a resumed import refuses a source that changed meanwhile
                    },
                    shard_size=shard_size,
                )
            if len(tokens) > k_tokens:
                if max_tokens is None:
                    raise LvlmlpError(
                        f"{where}: logits of {len(tokens)} tokens but the first row has {k_tokens}; "
                        "pass --max-tokens N to keep the first N"
                    )
                tokens = tokens[:k_tokens]
            raw_id = obj.get("question_id", obj.get("pid", obj.get("id")))
            row_id = str(raw_id) if raw_id is not None else str(line_no)
            if obj.get("category") is not None and raw_id is not None:
                row_id = f"{obj['category']}/{raw_id}"  # POPE: question ids restart in every category
            if row_id in seen:
                raise LvlmlpError(f"{where}: duplicate id {row_id!r}")
            seen.add(row_id)
            order.append(row_id)
            row_position, position = position, position + 1
            if row_id in writer.done_ids:
                continue  # committed by an earlier, interrupted import
            block = np.zeros((k_tokens, width), dtype=dtype)
            for t, values in enumerate(tokens):
                block[t] = _numbers(values, t, width, where)
            if "pid" in obj and isinstance(obj.get("label"), str):  # MathV.jsonl: the label is the gold answer
                obj["answer"] = obj.pop("label")
                if verdicts is not None:
                    if str(obj["pid"]) not in verdicts:
                        raise LvlmlpError(f"{where}: pid {obj['pid']!r} is not in {judged}")
                    obj["true_false"] = verdicts[str(obj["pid"])]
                obj["label"] = None if verdicts is None else int(obj["true_false"])
            obj["label"] = _label(obj.get("label"), where)
            # One row at a time: the writer buffers one shard and commits it (memory stays flat in the file's size).
            writer.append([{**obj, "id": row_id}], {"logits": block[None], "n_tokens": np.array([len(tokens)]),
                                                    "row_index": np.array([row_position])})
    except BaseException:
        if writer is not None:
            writer.release()  # committed shards stay; the same command resumes from them
        raise
    if writer is None:
        raise LvlmlpError(f"{src}: no rows")
    if verdicts is not None and len(seen) != len(verdicts):
        log.warning("%s judges %d answers, %s has %d rows", judged, len(verdicts), src, len(seen))
    run = writer.close(order)
    log.info("imported %d rows (%d tokens x %d logits) into %s", len(run), k_tokens, width, run.path)
    return run
