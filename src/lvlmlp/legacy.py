"""`lvlmlp import-legacy`: the paper's output JSON lines into a run folder, streamed line by line.

The paper's `run_model.py` writes one JSON object per sample: `image`, `model_name`, `question`, `label`,
`response`, `output_ids`, `logits` (the V raw logits of the first generated token, as text) and task keys such
as `scenario` or `category`. Such files reach many gigabytes, so they are read one line at a time and written in
shards by `RunWriter`; memory stays at one shard of rows. `logits` may also be a list of per-token lists (the
first K generated tokens); a single list is stored as token 0 (the paper's default `--token_id 0`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.data import iter_json_lines
from lvlmlp.errors import LvlmlpError
from lvlmlp.store import Run, RunWriter

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
    bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))), None)
    if bad is not None or any(v is None for v in values):
        raise LvlmlpError(f"{where}: token {t}'s logits hold {bad!r}, not a number")
    arr = np.asarray(values, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise LvlmlpError(f"{where}: token {t}'s logits hold {arr[~np.isfinite(arr)][0]!r} (NaN or infinite)")
    return arr


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
) -> Run:
    """Convert `path` (the paper's JSON lines) into the run folder `out`; re-running resumes.

    `vocab_size` checks every row's logits length (default: the first row's). `max_tokens` keeps at most that
    many generated tokens per row (default: the first row's count; a row with more is an error, never cut
    silently). `model` overrides the file's `model_name` (give a tokenizer path/id to use `token-prob`).
    """
    src = Path(path)
    if not src.is_file():
        raise LvlmlpError(f"{src}: no such file")
    if dtype not in ("float16", "float32"):
        raise LvlmlpError(f"--dtype {dtype}: choose float16 or float32")
    source_identity = {"source_size": src.stat().st_size, "source_sha256": _file_sha256(src)}
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
            raw_id = obj.get("question_id", obj.get("id"))
            row_id = str(raw_id) if raw_id is not None else str(line_no)
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
    run = writer.close(order)
    log.info("imported %d rows (%d tokens x %d logits) into %s", len(run), k_tokens, width, run.path)
    return run
