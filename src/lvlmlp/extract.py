"""Extractor: rows -> backend -> run folder, in left-padded batches, resumable, memory flat in N.

First-token logits come from ONE prefill forward (`logits_to_keep=1`); with `max_new_tokens=K` the backend runs
greedy generation and we keep the raw logits of the first K tokens, how many of them are valid per row (rows whose
answer ends early are kept and padded, never dropped), and the decoded response.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from lvlmlp.data import check_images_exist, read_manifest, rows_fingerprint, validate_rows
from lvlmlp.errors import LvlmlpError
from lvlmlp.loader import cores_for_workers, prepared_batches
from lvlmlp.store import Run, RunWriter, merge_runs

if TYPE_CHECKING:
    from lvlmlp.backend import Backend

log = logging.getLogger("lvlmlp")

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
BATCH_SIZE = 8  # default rows per forward


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


def select_rows(rows: list[dict], limit: int | None = None, shard: tuple[int, int] | None = None) -> list[dict]:
    """Apply --limit, then keep this shard's contiguous block; each row remembers its input position."""
    rows = [dict(row, _row_index=i) for i, row in enumerate(rows[:limit] if limit else rows)]
    if shard:
        i, n = shard
        rows = rows[len(rows) * i // n : len(rows) * (i + 1) // n]
    return rows


def check_rows(rows: list[dict], source: str, on_error: str = "fail") -> None:
    """Ids, questions and labels are valid and (unless rows may be skipped) every image file exists."""
    validate_rows(rows, source)
    missing = check_images_exist(rows, source)
    if missing and on_error == "fail":
        raise LvlmlpError(missing[0][1])


def extract(
    backend: Backend,
    rows: list[dict],
    out: str | Path,
    *,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: int = 0,
    logits_tokens: int | None = None,
    hidden: bool = False,
    layers: Sequence[int] = (),
    store_dtype: str = "float16",
    on_error: str = "fail",
    shard: tuple[int, int] | None = None,
    source: str = "rows",
    progress: bool = True,
    shard_size: int = 256,
    workers: int = 1,
    label_fn: Callable[[str, dict], int] | None = None,
) -> Run:
    """Extract features for `rows` (already selected; see `select_rows`) into the run folder `out`.

    `label_fn(response, row)`: for tasks whose label is whether the model answered right (MathVista), each row's
    `label` is computed from its generated response and stored with its metadata."""
    if label_fn is not None and not max_new_tokens:
        raise LvlmlpError(f"{source}: labels come from the model's answers here; give --max-new-tokens K (> 0)")
    if store_dtype not in STORE_DTYPES:
        raise LvlmlpError(f"--store-dtype: expected one of {sorted(STORE_DTYPES)}, got {store_dtype!r}")
    if on_error not in ("fail", "skip"):
        raise LvlmlpError(f"--on-error: expected fail or skip, got {on_error!r}")
    if batch_size < 1 or max_new_tokens < 0:
        raise LvlmlpError("--batch-size must be >= 1 and --max-new-tokens >= 0")
    rows = [dict(row, _row_index=row.get("_row_index", i)) for i, row in enumerate(rows)]
    check_rows(rows, source, on_error)  # before any model work or folder is written

    n_keep = max(1, min(max_new_tokens, logits_tokens or max_new_tokens))  # stored tokens; 1 for prefill
    settings = {
        "model": backend.model_id,
        "model_revision": backend.revision,
        "weights_hash": backend.weights_hash,
        "family": backend.family,
        "compute_dtype": str(backend.dtype).replace("torch.", ""),
        "dtype": store_dtype,
        "vocab_size": backend.vocab_size,
        "prompt_template": backend.prompt("{question}"),
        "max_new_tokens": max_new_tokens,
        "logits_tokens": n_keep,
        "hidden": hidden,
        "layers": [int(x) for x in layers],
        "data_hash": rows_fingerprint({k: v for k, v in r.items() if k != "_row_index"} for r in rows),
        "n_input_rows": len(rows),
        "shard": f"{shard[0]}/{shard[1]}" if shard else None,
        "device": str(backend.device),
        "batch_size": batch_size,
        "labels_from_responses": label_fn is not None,
    }
    writer = RunWriter(out, settings, shard_size=shard_size)
    pending = [r for r in rows if r["id"] not in writer.done_ids]
    log.info(
        "extract: %s (%s, %s) -> %s: %d rows, %d to do, batch %d, %s", backend.model_id, backend.family,
        settings["compute_dtype"], out, len(rows), len(pending), batch_size,
        f"generate {max_new_tokens} tokens" if max_new_tokens else "prefill only",
    )
    dtype = STORE_DTYPES[store_dtype]
    bar = tqdm(total=len(pending), unit="row", file=sys.stderr, disable=not progress, desc="extract")
    chunks = [pending[s : s + batch_size] for s in range(0, len(pending), batch_size)]
    # closing: the workers stop on errors too
    with cores_for_workers(backend, workers), closing(prepared_batches(backend, chunks, workers)) as prepared:
        for chunk, (batch_rows, batch, failed) in zip(chunks, prepared):
            for row_id, message in failed:
                if on_error == "fail":
                    bar.close()
                    raise LvlmlpError(f"{source}: {message}")
                writer.fail(row_id, message)
            if batch_rows:
                batch = backend.to_device(batch)
                meta, arrays = _run_batch(backend, batch_rows, batch, max_new_tokens, n_keep, hidden, layers, dtype)
                if label_fn is not None:
                    for m, row in zip(meta, batch_rows):
                        m["label"] = int(label_fn(m["response"], row))
                writer.append(meta, arrays)
            bar.update(len(chunk))
    bar.close()
    run = writer.close()
    if run.failures:
        log.warning("extract: %d row(s) skipped, see %s", len(run.failures), Path(out) / "failures.jsonl")
    return run


def _run_batch(backend: Backend, rows: list[dict], batch: dict, max_new_tokens: int, n_keep: int, hidden: bool,
               layers: Sequence[int], dtype: type) -> tuple[list[dict], dict[str, np.ndarray]]:
    if max_new_tokens:
        res = backend.generate(batch, max_new_tokens=max_new_tokens, hidden=hidden, layers=layers)
        # The backend returns exactly K columns, with zeros after each row's last valid token.
        logits = res["logits"][:, :n_keep].float().cpu().numpy()
        n_tokens = res["n_tokens"].cpu().numpy().astype(np.int32)
        if n_keep < max_new_tokens:  # the original's "last" token (--token_id -1): each row's last generated one
            last = (np.maximum(n_tokens, 1) - 1).tolist()
            last_logits = res["logits"][list(range(len(rows))), last].float().cpu().numpy()
        responses = res["responses"]
    else:
        res = backend.prefill(batch, hidden=hidden, layers=layers)
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
    meta = []
    for i, row in enumerate(rows):
        m = {k: v for k, v in row.items() if k not in ("image", "_row_index")}
        if responses is not None:
            m["response"] = responses[i]
        meta.append(m)
    return meta, arrays


# ----------------------------------------------------------------------------------------------- CLI


def _layers(spec: str | None) -> list[int]:
    if not spec:
        return []
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise LvlmlpError(f"--layers: expected comma-separated integers such as 8,16,-1, got {spec!r}") from None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="hub id or local folder of a vision-language checkpoint")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | float16 | bfloat16")
    p.add_argument("--prompt-template", default=None, help='applied to the question first, e.g. "{question} Answer briefly."')
    p.add_argument("--raw-prompt", action="store_true", help="skip the chat template; pass the text as it is")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="a system turn before the user's (e.g. the llava_v1 line of the original LLaVA-1.5 runs, "
                   "docs/paper-protocol.md); default: the chat template's own")


def _rows_from_args(args: argparse.Namespace) -> tuple[list[dict], str | None, str]:
    if bool(args.data) == bool(getattr(args, "task", None)):
        raise LvlmlpError("extract: give exactly one of --data MANIFEST.jsonl or --task NAME")
    if args.data:
        return read_manifest(args.data), None, str(args.data)
    from lvlmlp.tasks import task_rows_from_args

    rows, template = task_rows_from_args(args)
    return rows, template, f"task {args.task}"


def cmd_extract(args: argparse.Namespace) -> int:
    from lvlmlp.backend import Backend

    rows, task_template, source = _rows_from_args(args)
    # a task applies --limit itself (seeded subset); a manifest's --limit keeps its first N rows
    rows = select_rows(rows, None if args.task else args.limit, parse_shard(args.shard))
    check_rows(rows, source, args.on_error)  # before the (possibly minutes-long) model load
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    template = args.prompt_template or task_template
    label_fn = None
    if args.task:
        from lvlmlp.tasks import get_task

        if get_task(args.task).needs_generation:  # MathVista: label = whether the model's answer is right
            from lvlmlp.tasks.mathvista import response_label

            label_fn = response_label
            if not args.max_new_tokens:
                raise LvlmlpError(f"--task {args.task}: labels come from the model's answers; give --max-new-tokens")
    backend = Backend(args.model, device=args.device, dtype=args.dtype, prompt_template=template,
                      raw_prompt=args.raw_prompt, system_prompt=args.system_prompt)
    run = extract(
        backend, rows, args.out, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        logits_tokens=args.logits_tokens, hidden=args.hidden, layers=_layers(args.layers),
        store_dtype=args.store_dtype, on_error=args.on_error, shard=parse_shard(args.shard), source=source,
        progress=not args.no_progress, shard_size=args.shard_size, workers=args.workers, label_fn=label_fn,
    )
    print(f"{run.path}: {len(run)} rows, logits {run.n_logit_tokens} x {run.manifest['vocab_size']}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    run = merge_runs(args.runs, args.out)
    print(f"{run.path}: {len(run)} rows merged from {len(args.runs)} runs")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="first-token (and first K tokens') logits into a run folder")
    p.add_argument("--data", help="JSON-lines manifest (contract section 1)")
    try:
        from lvlmlp.tasks import add_task_arguments
    except ImportError:  # tasks are optional while the package is being assembled
        pass
    else:
        add_task_arguments(p)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="run folder; re-running the same command resumes it")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="0: one prefill forward (first token only); K: greedy generation keeping K tokens' logits")
    p.add_argument("--logits-tokens", type=int, default=None, help="keep only the first T tokens' logits")
    p.add_argument("--hidden", action="store_true", help="also keep the final-norm hidden state at the first token")
    p.add_argument("--layers", default=None, help="also keep these layers' hidden states, e.g. 8,16,-1")
    p.add_argument("--store-dtype", default="float16", choices=sorted(STORE_DTYPES))
    p.add_argument("--shard", default=None, help="I/N: process the I-th of N contiguous blocks (merge afterwards)")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    p.add_argument("--limit", type=int, default=None,
                   help="only N rows: the first N of a manifest, a seeded random N of a --task")
    p.add_argument("--shard-size", type=int, default=256, help="rows per committed shard (resume granularity)")
    p.add_argument("--workers", type=int, default=1,
                   help="data-loader processes preparing batches while the model runs (default 1; more on a "
                        "many-core GPU machine; 0: in this process)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract)

    m = sub.add_parser("merge", help="merge the run folders of `extract --shard I/N` in manifest order")
    m.add_argument("runs", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)
