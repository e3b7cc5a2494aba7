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
from typing import Any

import numpy as np
from tqdm import tqdm

from lvlmlp.data import (
    ValidRows,
    check_rows,
    image_stamp,
    images_fingerprint,
    rows_fingerprint,
    selected,
    validate_rows,
)
from lvlmlp.defaults import BATCH_SIZE, STORE_DTYPE_NAMES  # noqa: F401 - BATCH_SIZE: bench/ imports it from here
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.loader import Started, cores_for_workers, prepared_batches
from lvlmlp.extraction.options import ExtractOptions
from lvlmlp.extraction.store import Run, RunWriter, is_complete_run, open_run

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
    numbered = selected(rows, (dict(row, _row_index=i) for i, row in enumerate(rows)))
    if shard:
        i, n = shard
        numbered = selected(numbered, numbered[len(numbered) * i // n : len(numbered) * (i + 1) // n])
    return numbered


def resolve_layers(backend: Backend, layers: Sequence[int] | str) -> list[int]:
    """`Backend.resolve_layers`; a `--backend` class without it (docs/backends.md) takes a list of indices only."""
    if hasattr(backend, "resolve_layers"):
        return backend.resolve_layers(layers)
    if isinstance(layers, str):
        raise LvlmlpError(f"--layers {layers}: this backend does not say its layer count; give the indices")
    return [int(x) for x in layers]


def finished_run(backend: Backend, rows: list[dict], out: str | Path, options: ExtractOptions | None = None, *,
                 labels_from_responses: bool = False, selection: dict | None = None, **changes: Any) -> Run | None:
    """The run in `out` when it is complete and was made with these settings (`run_settings`' arguments), else None.

    `backend` may be a `Backend(..., load_model=False)`: a finished run is then recognised without loading the
    weights (the vocabulary size, known only from the loaded model, is not compared; the weights hash is)."""
    options = ExtractOptions.of(options, **changes)
    if isinstance(options.layers, str):  # "quartiles": resolved from the config, without the weights
        options = ExtractOptions.of(options, layers=resolve_layers(backend, options.layers))
    settings = run_settings(backend_settings(backend), rows, options, labels_from_responses=labels_from_responses,
                            selection=selection)
    if not is_complete_run(out, settings, ignore=("vocab_size",)):
        return None
    return open_run(out)


class CheckedRows(ValidRows):
    """Rows numbered and checked by `checked_rows`, the one row check of an extraction: `extract` and `ray_extract`
    take them as they are (`lvlmlp extract` checks its rows before it loads the model, then hands them on)."""


def checked_rows(rows: list[dict], source: str, on_error: str) -> CheckedRows:
    """The rows to extract, each with its input position (`_row_index`, kept when `shard_rows` set it), checked
    (`check_rows`) before any model work or folder is written; rows already checked are returned as they are."""
    if isinstance(rows, CheckedRows):
        return rows
    rows = CheckedRows(dict(row, _row_index=row.get("_row_index", i))
                       for i, row in enumerate(validate_rows(rows, source)))  # a manifest's or task's: as read
    check_rows(rows, source, on_error)  # the selected rows' images and sizes
    return rows


def numbered_rows(rows: list[dict], source: str, on_error: str) -> CheckedRows:
    """`checked_rows`, and none at all refused."""
    rows = checked_rows(rows, source, on_error)
    if not rows:
        raise LvlmlpError(f"{source}: no rows to extract")
    return rows


def batches_of(rows: list[dict], batch_size: int) -> list[list[dict]]:
    """The forwards' batches, in order: what the single-process extractor and each Ray replica run."""
    return [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]


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
        # and which of its Auto classes it was loaded through (its config's auto_map key)
        **({"trust_remote_code": True, "auto_class": backend.auto_class}
           if getattr(backend, "trust_remote_code", False) else {}),
        # Only for a protocol backend (docs/backends.md): its class, as --backend / the config's `backend:` named it.
        **({"backend": backend.protocol_spec} if getattr(backend, "protocol_spec", None) else {}),
    }


def run_settings(model: dict, rows: list[dict], options: ExtractOptions | None = None, *,
                 labels_from_responses: bool = False, selection: dict | None = None,
                 image_stamps: dict[str, str] | None = None, **changes: Any) -> dict:
    """A run's manifest settings: `model` (see `backend_settings`) and the extraction options (`layers` resolved to
    indices). The rows' hash leaves out `_row_index` (their position), so a finished run is recognised from rows
    numbered or not."""
    options = ExtractOptions.of(options, **changes)
    shard = options.shard
    return {
        **model,
        "dtype": options.store_dtype,
        "max_new_tokens": options.max_new_tokens,
        "logits_tokens": options.n_keep,  # stored tokens; 1 for prefill
        "hidden": options.hidden,
        "layers": list(options.layers),
        **({"vision": True} if options.vision else {}),  # absent when off: runs made before --vision keep identity
        "data_hash": rows_fingerprint({k: v for k, v in r.items() if k != "_row_index"} for r in rows),
        "images_hash": images_fingerprint(rows, image_stamps),  # sizes and modification times: replaced images are noticed
        "n_input_rows": len(rows),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "batch_size": options.batch_size,
        "labels_from_responses": labels_from_responses,
        "selection": selection,  # --split / --per-class / --limit / --seed that chose the rows
    }


def extract(
    backend: Backend,
    rows: list[dict],
    out: str | Path,
    options: ExtractOptions | None = None,
    *,
    source: str = "rows",
    progress: bool = True,
    label_fn: Callable[[str, dict], int] | None = None,
    selection: dict | None = None,
    **changes: Any,
) -> Run:
    """Extract features for `rows` (already selected; see `shard_rows`) into the run folder `out`, as `options` say
    (`changes`: `ExtractOptions` fields given as keywords, over `options` or the defaults). `backend` may be built
    without its weights (`load_model=False`, as `lvlmlp extract` does): they then load here, once the data-loader
    workers of a new run are at work.

    `label_fn(response, row)`: for tasks whose label is whether the model answered right (MathVista), each row's
    `label` is computed from its generated response and stored with its metadata. `selection`: how the rows were
    chosen (--split / --per-class / --limit / --seed), recorded in the manifest."""
    options = ExtractOptions.of(options, **changes)
    options.check_labels(label_fn is not None, source)
    # "quartiles" -> this model's indices; the manifest stores those
    options = ExtractOptions.of(options, layers=resolve_layers(backend, options.layers))
    if options.vision:
        backend.check_vision()  # an unsupported family is said before any row is read
    rows = numbered_rows(rows, source, options.on_error)  # before any model work or folder is written
    # Each image stat'ed once: the stamps give the run's images_hash and go into every committed shard, so that a
    # resumed run notices its extracted rows' images replaced under it.
    stamps = {r["id"]: image_stamp(r) for r in rows}
    started = _started_early(backend, rows, out, options)
    try:
        if _without_weights(backend):  # `lvlmlp extract`'s: they load now
            backend.load_weights()
            if options.vision:
                backend.check_vision()  # now also that the module its quirks name is in the model
        settings = run_settings(backend_settings(backend), rows, options, labels_from_responses=label_fn is not None,
                                selection=selection, image_stamps=stamps)
        writer = RunWriter(out, settings, shard_size=options.shard_size, image_stamps=stamps)
        pending = [r for r in rows if r["id"] not in writer.done_ids]
        log.info(
            "extract: %s (%s, %s) -> %s: %d rows, %d to do, batch %d, %s", backend.model_id, backend.family,
            settings["compute_dtype"], out, len(rows), len(pending), options.batch_size,
            f"generate {options.max_new_tokens} tokens" if options.max_new_tokens else "prefill only",
        )
        try:
            bar = tqdm(total=len(pending), unit="row", file=sys.stderr, disable=not progress, desc="extract")
            chunks = batches_of(pending, options.batch_size)
            if started is not None and started.chunks != chunks:  # rows done meanwhile (by another process)
                started.close()
                started = None
            batches = started or prepared_batches(backend, chunks, options.workers, options.max_new_tokens)
            # closing: the workers stop on errors too
            with cores_for_workers(backend, options.workers), closing(batches) as prepared:
                for chunk, (batch_rows, batch, failed) in zip(chunks, prepared):
                    for row_id, message in failed:
                        if options.on_error == "fail":
                            bar.close()
                            raise LvlmlpError(f"{source}: {message}")
                        writer.fail(row_id, message)
                    if batch_rows:
                        batch = backend.to_device(batch)
                        meta, arrays = run_batch(backend, batch_rows, batch, options)
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
    finally:
        if started is not None:
            started.close()  # its workers stop when the weights fail to load, or the run folder refuses the run
    if run.failures:
        log.warning("extract: %d row(s) skipped, see %s", len(run.failures), Path(out) / "failures.jsonl")
    return run


def _without_weights(backend: Backend) -> bool:
    """A `Backend` built with `load_model=False`. (A `--backend` class loads its model itself; its `model`, which only
    guided decoding needs, may be None.)"""
    return isinstance(backend, Backend) and backend.model is None


def _started_early(backend: Backend, rows: list[dict], out: str | Path, options: ExtractOptions) -> Started | None:
    """For a backend built without its weights and a new run folder, where every row is to do: the data-loader
    workers started now, before the weights load (they need only the processor, and prepare batches meanwhile).
    A resumed run knows what is left only from its folder, opened against the loaded model: None, as for a loaded
    backend or no workers."""
    folder = Path(out)
    if not _without_weights(backend) or options.workers <= 0 or (folder.is_dir() and any(folder.iterdir())):
        return None
    return Started(backend, batches_of(rows, options.batch_size), options.workers, options.max_new_tokens)


def run_batch(backend: Backend, rows: list[dict], batch: dict,
              options: ExtractOptions) -> tuple[list[dict], dict[str, np.ndarray]]:
    """One prepared batch through the model: the manifest rows and the arrays to store (`options.layers`: indices)."""
    max_new_tokens, n_keep, hidden, layers = options.max_new_tokens, options.n_keep, options.hidden, list(options.layers)
    dtype, vision = STORE_DTYPES[options.store_dtype], options.vision
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
