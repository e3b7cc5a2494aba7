"""Extractor: rows -> backend -> run folder, in left-padded batches, resumable, memory flat in N.

First-token logits come from ONE prefill forward (`logits_to_keep=1`); with `max_new_tokens=K` the backend runs
greedy generation and we keep the raw logits of the first K tokens, how many of them are valid per row (rows whose
answer ends early are kept and padded, never dropped), and the decoded response.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from lvlmlp.data import check_rows, images_fingerprint, rows_fingerprint
from lvlmlp.defaults import BATCH_SIZE, STORE_DTYPE_NAMES
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.loader import cores_for_workers, prepared_batches
from lvlmlp.extraction.store import Run, RunWriter, is_complete_run, open_run

if TYPE_CHECKING:
    from lvlmlp.extraction.backend import Backend

log = logging.getLogger("lvlmlp")

STORE_DTYPES = {name: np.dtype(name).type for name in STORE_DTYPE_NAMES}


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'I/N' -> (I, N) with 0 <= I < N."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise LvlmlpError(f"--shard: expected I/N such as 0/4, got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise LvlmlpError(f"--shard: need 0 <= I < N, got {spec!r}")
    return i, n


def shard_rows(rows: list[dict], shard: tuple[int, int] | None = None) -> list[dict]:
    """This shard's contiguous block of the (selected) rows; each row remembers its input position."""
    rows = [dict(row, _row_index=i) for i, row in enumerate(rows)]
    if shard:
        i, n = shard
        rows = rows[len(rows) * i // n : len(rows) * (i + 1) // n]
    return rows


def resolve_layers(backend: Backend, layers: Sequence[int] | str) -> list[int]:
    """`Backend.resolve_layers`; a `--backend` class without it (docs/backends.md) takes a list of indices only."""
    if hasattr(backend, "resolve_layers"):
        return backend.resolve_layers(layers)
    if isinstance(layers, str):
        raise LvlmlpError(f"--layers {layers}: this backend does not say its layer count; give the indices")
    return [int(x) for x in layers]


def finished_run(backend: Backend, rows: list[dict], out: str | Path, **settings: Any) -> Run | None:
    """The run in `out` when it is complete and was made with these settings (`run_settings`' arguments), else None.

    `backend` may be a `Backend(..., load_model=False)`: a finished run is then recognised without loading the
    weights (the vocabulary size, known only from the loaded model, is not compared; the weights hash is)."""
    if isinstance(settings.get("layers"), str):  # "quartiles": resolved from the config, without the weights
        settings = {**settings, "layers": resolve_layers(backend, settings["layers"])}
    if not is_complete_run(out, run_settings(backend_settings(backend), rows, **settings), ignore=("vocab_size",)):
        return None
    return open_run(out)


def check_options(store_dtype: str, on_error: str, batch_size: int, max_new_tokens: int,
                  label_fn: Callable | None, source: str) -> None:
    """One-line errors for bad extraction options, before any model is loaded."""
    if label_fn is not None and not max_new_tokens:
        raise LvlmlpError(f"{source}: labels come from the model's answers here; give --max-new-tokens K (> 0)")
    if store_dtype not in STORE_DTYPES:
        raise LvlmlpError(f"--store-dtype: expected one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if on_error not in ("fail", "skip"):
        raise LvlmlpError(f"--on-error: expected fail or skip, got {on_error!r}")
    if batch_size < 1 or max_new_tokens < 0:
        raise LvlmlpError("--batch-size must be >= 1 and --max-new-tokens >= 0")


def backend_settings(backend: Backend) -> dict:
    """What a run's manifest records of the loaded model (computed where the model is: here, or in a Ray actor)."""
    return {
        "model": backend.model_id,
        "model_revision": backend.revision,
        "weights_hash": backend.weights_hash,
        "family": backend.family,
        "compute_dtype": str(backend.dtype).replace("torch.", ""),
        "vocab_size": backend.vocab_size,
        "prompt_template": backend.prompt("{question}"),
        "device": str(backend.device),
        # Only when set: the checkpoint's own code ran (manifests of every other run stay as they were).
        **({"trust_remote_code": True} if getattr(backend, "trust_remote_code", False) else {}),
    }


def run_settings(model: dict, rows: list[dict], *, batch_size: int, max_new_tokens: int, logits_tokens: int | None,
                 hidden: bool, layers: Sequence[int], store_dtype: str, shard: tuple[int, int] | None,
                 labels_from_responses: bool, selection: dict | None = None, vision: bool = False) -> dict:
    """A run's manifest settings: `model` (see `backend_settings`) and the extraction options. The rows' hash
    leaves out `_row_index` (their position), so a finished run is recognised from rows numbered or not."""
    n_keep = max(1, min(max_new_tokens, logits_tokens or max_new_tokens))  # stored tokens; 1 for prefill
    return {
        **model,
        "dtype": store_dtype,
        "max_new_tokens": max_new_tokens,
        "logits_tokens": n_keep,
        "hidden": hidden,
        "layers": [int(x) for x in layers],
        **({"vision": True} if vision else {}),  # absent when off: runs made before --vision keep their identity
        "data_hash": rows_fingerprint({k: v for k, v in r.items() if k != "_row_index"} for r in rows),
        "images_hash": images_fingerprint(rows),  # sizes and modification times: replaced images are noticed
        "n_input_rows": len(rows),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "batch_size": batch_size,
        "labels_from_responses": labels_from_responses,
        "selection": selection,  # --split / --per-class / --limit / --seed that chose the rows
    }


def extract(
    backend: Backend,
    rows: list[dict],
    out: str | Path,
    *,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int = 0,
    logits_tokens: int | None = None,
    hidden: bool = False,
    layers: Sequence[int] | str = (),
    store_dtype: str = "float16",
    on_error: str = "fail",
    shard: tuple[int, int] | None = None,
    source: str = "rows",
    progress: bool = True,
    shard_size: int = 256,
    workers: int = 1,
    label_fn: Callable[[str, dict], int] | None = None,
    selection: dict | None = None,
    vision: bool = False,
) -> Run:
    """Extract features for `rows` (already selected; see `shard_rows`) into the run folder `out`.

    `label_fn(response, row)`: for tasks whose label is whether the model answered right (MathVista), each row's
    `label` is computed from its generated response and stored with its metadata."""
    check_options(store_dtype, on_error, batch_size, max_new_tokens, label_fn, source)
    layers = resolve_layers(backend, layers)  # "quartiles" -> this model's indices; the manifest stores those
    if vision:
        backend.check_vision()  # an unsupported family is said before any row is read
    rows = [dict(row, _row_index=row.get("_row_index", i)) for i, row in enumerate(rows)]
    check_rows(rows, source, on_error)  # before any model work or folder is written
    if not rows:
        raise LvlmlpError(f"{source}: no rows to extract")
    settings = run_settings(
        backend_settings(backend), rows, batch_size=batch_size, max_new_tokens=max_new_tokens,
        logits_tokens=logits_tokens, hidden=hidden, layers=layers, store_dtype=store_dtype, shard=shard,
        labels_from_responses=label_fn is not None, selection=selection, vision=vision,
    )
    n_keep = settings["logits_tokens"]  # stored tokens; 1 for prefill
    writer = RunWriter(out, settings, shard_size=shard_size)
    pending = [r for r in rows if r["id"] not in writer.done_ids]
    log.info(
        "extract: %s (%s, %s) -> %s: %d rows, %d to do, batch %d, %s", backend.model_id, backend.family,
        settings["compute_dtype"], out, len(rows), len(pending), batch_size,
        f"generate {max_new_tokens} tokens" if max_new_tokens else "prefill only",
    )
    dtype = STORE_DTYPES[store_dtype]
    try:
        bar = tqdm(total=len(pending), unit="row", file=sys.stderr, disable=not progress, desc="extract")
        chunks = [pending[s : s + batch_size] for s in range(0, len(pending), batch_size)]
        # closing: the workers stop on errors too
        with cores_for_workers(backend, workers), closing(
                prepared_batches(backend, chunks, workers, max_new_tokens)) as prepared:
            for chunk, (batch_rows, batch, failed) in zip(chunks, prepared):
                for row_id, message in failed:
                    if on_error == "fail":
                        bar.close()
                        raise LvlmlpError(f"{source}: {message}")
                    writer.fail(row_id, message)
                if batch_rows:
                    batch = backend.to_device(batch)
                    meta, arrays = run_batch(backend, batch_rows, batch, max_new_tokens, n_keep, hidden, layers,
                                             dtype, vision)
                    if label_fn is not None:
                        for m, row in zip(meta, batch_rows):
                            m["label"] = int(label_fn(m["response"], row))
                    writer.append(meta, arrays)
                bar.update(len(chunk))
        bar.close()
    except BaseException:
        writer.release()  # committed shards stay; the same command resumes from them
        raise
    run = writer.close([r["id"] for r in rows])
    if run.failures:
        log.warning("extract: %d row(s) skipped, see %s", len(run.failures), Path(out) / "failures.jsonl")
    return run


def run_batch(backend: Backend, rows: list[dict], batch: dict, max_new_tokens: int, n_keep: int, hidden: bool,
              layers: Sequence[int], dtype: type, vision: bool = False) -> tuple[list[dict], dict[str, np.ndarray]]:
    asked = {"vision": True} if vision else {}  # a `--backend` class (docs/backends.md) need not know `vision`
    if max_new_tokens:
        res = backend.generate(batch, max_new_tokens=max_new_tokens, hidden=hidden, layers=layers, **asked)
        # The backend returns exactly K columns, with zeros after each row's last valid token.
        logits = res["logits"][:, :n_keep].float().cpu().numpy()
        n_tokens = res["n_tokens"].cpu().numpy().astype(np.int32)
        if n_keep < max_new_tokens:  # the original's "last" token (--token_id -1): each row's last generated one
            last = (np.maximum(n_tokens, 1) - 1).tolist()
            last_logits = res["logits"][list(range(len(rows))), last].float().cpu().numpy()
        responses = res["responses"]
    else:
        res = backend.prefill(batch, hidden=hidden, layers=layers, **asked)
        logits = res["logits"].float().cpu().numpy()[:, None, :]
        n_tokens = np.ones(len(rows), dtype=np.int32)
        responses = None
    arrays = {
        "logits": logits.astype(dtype),
        "n_tokens": n_tokens,
        "row_index": np.array([r["_row_index"] for r in rows], dtype=np.int64),
    }
    if max_new_tokens and n_keep < max_new_tokens:
        arrays["last_logits"] = last_logits.astype(dtype)
    if hidden:
        arrays["hidden"] = res["hidden"].float().cpu().numpy()
    if layers:
        arrays["layers"] = res["layers"].float().cpu().numpy()
    if vision:
        arrays["vision"] = res["vision"].float().cpu().numpy()
    meta = []
    for i, row in enumerate(rows):
        m = {k: v for k, v in row.items() if k not in ("image", "_row_index")}
        if responses is not None:
            m["response"] = responses[i]
        meta.append(m)
    return meta, arrays
