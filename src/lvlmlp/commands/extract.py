"""`lvlmlp extract`: first-token (and first K tokens') logits of a model on a manifest or a task into a run folder."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lvlmlp.commands._args import (
    add_backend_argument,
    add_model_arguments,
    add_task_arguments,
    backend_spec,
    input_flags,
    protocol_backend,
    rows_from_args,
    selection,
    silence_progress_bars,
)
from lvlmlp.defaults import BATCH_SIZE, STORE_DTYPE_NAMES
from lvlmlp.errors import LvlmlpError
from lvlmlp.ranges import COUNT, NONNEG

if TYPE_CHECKING:
    from lvlmlp.extraction.options import ExtractOptions

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="first-token (and first K tokens') logits into a run folder")
    p.add_argument("--data", help="JSON-lines manifest (one row per line: id, image, question, label)")
    add_task_arguments(p)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="run folder; re-running the same command resumes it")
    add_backend_argument(p)
    p.add_argument("--batch-size", type=COUNT, default=BATCH_SIZE, help=f"rows per forward (default {BATCH_SIZE})")
    p.add_argument("--max-new-tokens", type=NONNEG, default=0,
                   help="0: one prefill forward (first token only); K: greedy generation keeping K tokens' logits "
                   "(default 0)")
    p.add_argument("--logits-tokens", type=COUNT, default=None,
                   help="keep only the first T tokens' logits, 1 <= T <= --max-new-tokens (default: all K)")
    p.add_argument("--hidden", action="store_true",
                   help="also keep the final-norm hidden state at the first token (default: not kept)")
    p.add_argument("--layers", default=None,
                   help="also keep these layers' hidden states, e.g. 8,16,-1, or quartiles: {0, L/4, L/2, 3L/4, L} "
                        "of the model's L layers (HALP's; default none)")
    p.add_argument("--vision", action="store_true",
                   help="also keep the vision encoder's output that the projector reads, mean-pooled over the "
                        "image's tokens (vision.npy; every family but InstructBLIP; default: not kept)")
    p.add_argument("--store-dtype", default="float16", choices=sorted(STORE_DTYPE_NAMES),
                   help="dtype of the stored logits and hidden states (default float16)")
    p.add_argument("--shard", default=None,
                   help="I/N: process the I-th of N contiguous blocks (merge afterwards; default: every row)")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="a row whose image cannot be read: fail stops the run, skip records it in failures.jsonl "
                   "(default fail)")
    p.add_argument("--shard-size", type=COUNT, default=256,
                   help="rows per committed shard (resume granularity; default 256)")
    p.add_argument("--workers", type=NONNEG, default=1,
                   help="data-loader processes preparing batches while the model runs (default 1; more on a "
                        "many-core GPU machine; 0: in this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray (Ray Data, one model replica per GPU or CPU slot): alone, a local Ray instance "
                        "for this run; auto or ADDRESS: join that cluster (pip install 'lvlmlp[ray]')")
    p.add_argument("--ray-replicas", type=COUNT, default=None, metavar="N",
                   help="with --ray: model replicas (default: one per GPU of the cluster, else one per CPU)")
    p.add_argument("--ray-timeout", type=float, default=None, metavar="SECONDS",
                   help="with --ray ADDRESS: give up when the cluster does not answer within this time (default 30)")
    p.set_defaults(func=run)


def parse_layers(spec: str | None) -> list[int] | str:
    if not spec:
        return []
    if spec.strip() == "quartiles":  # resolved from the model's layer count by the extractor
        return "quartiles"
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise LvlmlpError(f"--layers: expected comma-separated integers such as 8,16,-1 or quartiles, "
                          f"got {spec!r}") from None


def options_of(args: argparse.Namespace) -> ExtractOptions:
    """The extraction options of the flags; a bad one is said by its flag (`--store-dtype: ...`)."""
    from lvlmlp.extraction.extract import parse_shard
    from lvlmlp.extraction.options import ExtractOptions, ExtractOptionsError, flag_names

    try:
        return ExtractOptions(max_new_tokens=args.max_new_tokens, logits_tokens=args.logits_tokens,
                              hidden=args.hidden, layers=parse_layers(args.layers), vision=args.vision,
                              store_dtype=args.store_dtype, shard=parse_shard(args.shard), batch_size=args.batch_size,
                              on_error=args.on_error, shard_size=args.shard_size, workers=args.workers)
    except ExtractOptionsError as err:
        raise LvlmlpError(err.named(flag_names())) from None


def run(args: argparse.Namespace) -> int:
    from lvlmlp.data import rows_fingerprint
    from lvlmlp.extraction.extract import checked_rows, extract, finished_run, shard_rows
    from lvlmlp.outputs import check_output

    # First of all: before the rows are read and long before any weight file is opened (or hashed).
    check_output(args.out, "run", input_flags(args))
    rows, task_template, source = rows_from_args(args, "extract")
    # the whole input's hash (before --shard cuts it): `merge` refuses shards cut from different inputs
    # and the task (a probe records the task of its run; probe eval warns on another task's run)
    chosen = {**selection(args), "input_hash": rows_fingerprint(rows), "task": args.task}
    options = options_of(args)
    # Checked once, here, before the (possibly minutes-long) model load; extract takes the checked rows as they are.
    rows = checked_rows(shard_rows(rows, options.shard), source, options.on_error)
    if (Path(args.out) / "manifest.json").is_file():  # a finished run whose images were replaced: refused here
        from lvlmlp.data import images_fingerprint
        from lvlmlp.extraction.store import check_images_unchanged

        check_images_unchanged(args.out, rows_fingerprint({k: v for k, v in r.items() if k != "_row_index"}
                                                          for r in rows), images_fingerprint(rows))
    if args.no_progress:
        silence_progress_bars()
    if args.logits_tokens is not None and not args.max_new_tokens:
        raise LvlmlpError("--logits-tokens applies to generated tokens: give --max-new-tokens K too")
    if args.logits_tokens is not None and args.logits_tokens > args.max_new_tokens:
        raise LvlmlpError(f"--logits-tokens {args.logits_tokens} is above --max-new-tokens {args.max_new_tokens}: "
                          "keep at most the tokens generated")
    template = args.prompt_template or task_template
    label_fn = None
    if args.task:
        from lvlmlp.tasks import get_task

        label_fn = get_task(args.task).label_fn  # MathVista: label = whether the model's answer is right
        if label_fn is not None and not args.max_new_tokens:
            raise LvlmlpError(f"--task {args.task}: labels come from the model's answers; give --max-new-tokens")
    if args.ray_replicas is not None and args.ray is None:
        raise LvlmlpError("--ray-replicas applies to --ray [ADDRESS] only")
    if args.ray_timeout is not None and args.ray is None:
        raise LvlmlpError("--ray-timeout applies to --ray [ADDRESS] only")
    if args.vision and args.ray is not None:
        raise LvlmlpError("--vision does not run on --ray yet; extract without --ray")
    if args.ray is not None and args.workers != 1:
        raise LvlmlpError("--workers does not apply with --ray (each Ray replica prepares its own batches)")
    backend = protocol_backend(args, template)
    if backend is not None:  # a model outside the Auto classes (docs/backends.md)
        run_ = extract(backend, rows, args.out, options, source=source, progress=not args.no_progress,
                       label_fn=label_fn, selection=chosen)
        print(f"{run_.path}: {len(run_)} rows, logits {run_.n_logit_tokens} x {run_.manifest['vocab_size']}")
        return 0
    spec = backend_spec(args, template)
    run_ = light = None
    if args.ray is not None:  # the model loads in the Ray replicas, not here; a finished run is recognised there
        from lvlmlp.extraction.ray_extract import ray_extract, ray_options

        run_ = ray_extract(spec, rows, args.out, options,
                           ray=ray_options(args.ray, args.ray_replicas, args.ray_timeout), source=source,
                           progress=not args.no_progress, label_fn=label_fn, selection=chosen)
    elif (Path(args.out) / "manifest.json").is_file():
        # A finished run is recognised from the config, processor and weights hash, without loading the weights.
        light = spec.build(load_model=False)
        run_ = finished_run(light, rows, args.out, options, labels_from_responses=label_fn is not None,
                            selection=chosen)
        if run_ is not None:
            log.info("%s: finished already with these settings; nothing to do", run_.path)
    if run_ is None:  # not finished: extract (resuming what is committed), the weights loaded by `extract` once
        # its data-loader workers, which need only the processor, are at work
        run_ = extract(light or spec.build(load_model=False), rows, args.out, options, source=source,
                       progress=not args.no_progress, label_fn=label_fn, selection=chosen)
    print(f"{run_.path}: {len(run_)} rows, logits {run_.n_logit_tokens} x {run_.manifest['vocab_size']}")
    return 0
