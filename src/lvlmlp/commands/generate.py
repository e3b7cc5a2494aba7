"""`lvlmlp generate`: probe-guided decoding; flagged rows start their answer with a template (default: the text the
original forced on MM-SafetyBench) or every row with the probe's answer, then the model goes on."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from lvlmlp.commands._args import (
    add_backend_argument,
    add_guard_arguments,
    add_model_arguments,
    add_task_arguments,
    backend_spec,
    guard_mode,
    input_flags,
    protocol_backend,
    rows_from_args,
    silence_progress_bars,
    token_budget,
)
from lvlmlp.errors import LvlmlpError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="probe-guided decoding: refuse (or answer) as the probe says")
    add_model_arguments(p)
    add_backend_argument(p)  # its `model` module is hooked to read the raw logits (docs/backends.md)
    p.add_argument("--data", help="JSON-lines manifest (one row per line: id, image, question, label)")
    add_task_arguments(p)  # --task ... as in `lvlmlp extract`; its --seed also seeds --do-sample
    add_guard_arguments(p, "rows")
    p.add_argument("--out", required=True, help="OUT.jsonl: {id, response, flagged, probe_score} per row")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="new tokens per answer (default 64, or the forced text's length when longer)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="with --do-sample (default 1.0)")
    p.add_argument("--eval", action="store_true",
                   help="also generate without the guard; write OUT.metrics.json (labelled manifests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    p.set_defaults(func=run)


def metrics_path(out: Path) -> Path:
    return out.with_name(out.stem + ".metrics.json") if out.suffix == ".jsonl" else Path(f"{out}.metrics.json")


def run(args: argparse.Namespace) -> int:
    from lvlmlp.outputs import check_output, replaced_file

    # Neither OUT.jsonl nor OUT.metrics.json may be (or sit inside) an input, e.g. the --data manifest itself.
    for path in (args.out, metrics_path(Path(args.out))):
        check_output(path, None, input_flags(args))
    template, answers = guard_mode(args, "generate")
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise LvlmlpError("--batch-size and --max-new-tokens must be >= 1")
    if args.temperature is not None and not args.do_sample:
        raise LvlmlpError("--temperature applies to sampling only: add --do-sample (greedy decoding has none)")
    if args.temperature is not None and not 0 < args.temperature < float("inf"):  # NaN fails both comparisons
        raise LvlmlpError(f"--temperature must be a number > 0, got {args.temperature:g} (for greedy decoding, "
                          "leave out --do-sample)")
    # The task's prompt template, as in `extract --task`: the probe only reads logits under the same prompt.
    rows, task_template, source = rows_from_args(args, "generate", seed_used=args.do_sample)
    prompt_template = args.prompt_template or task_template
    if args.eval:
        unlabelled = [r["id"] for r in rows if r.get("label") not in (0, 1)]
        if unlabelled:
            raise LvlmlpError(f"--eval: row {unlabelled[0]!r} has no 0/1 'label' in {source}")
    if args.no_progress:
        silence_progress_bars()

    import torch
    from tqdm import tqdm

    from lvlmlp.data import image_check, load_image
    from lvlmlp.probing.probes import load_probe
    from lvlmlp.steering.guard import guarded_responses, make_guard, steering_metrics

    probe = load_probe(args.probe)
    from lvlmlp.extraction.protocol import check_guidable

    backend = protocol_backend(args, prompt_template)  # --backend: its flags refused, then built by the spec
    if backend is None:
        backend = backend_spec(args, prompt_template).build()
    check_guidable(backend)
    guard = make_guard(probe, backend, template, answers, args.threshold, args.allow_other_model)
    max_new_tokens = token_budget(args, guard, "--max-new-tokens")
    gen: dict[str, Any] = {"do_sample": True, "temperature": 1.0 if args.temperature is None else args.temperature} if args.do_sample else {}
    seed = 0 if args.seed is None else args.seed

    out = Path(args.out)
    check = image_check(backend)  # images refused from their header before decoding
    labels, guarded, plain = [], [], []
    n_flagged = 0
    bar = tqdm(total=len(rows), unit="row", file=sys.stderr, disable=args.no_progress, desc="generate")
    # Written under a temporary name, renamed when every row is done: a failed run leaves the old file whole.
    with replaced_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start : start + args.batch_size]
            batch = backend.encode([load_image(r["image"], r["id"], check=check) for r in chunk],
                                   [r["question"] for r in chunk])
            # Reseeding per batch gives the unguarded run the same random draws: unflagged rows then agree.
            torch.manual_seed(seed + start)
            res = guarded_responses(backend, batch, guard, max_new_tokens=max_new_tokens, **gen)
            assert guard.scores_ is not None and guard.flagged_ is not None
            n_flagged += int(guard.flagged_.sum())
            base = None
            if args.eval:
                torch.manual_seed(seed + start)
                base = backend.generate(batch, max_new_tokens=max_new_tokens, **gen)["responses"]
            for i, row in enumerate(chunk):
                line = {"id": row["id"], "response": res["responses"][i], "flagged": bool(guard.flagged_[i]),
                        "probe_score": float(guard.scores_[i])}
                if base is not None:
                    line["response_unguarded"] = base[i]
                    labels.append(int(row["label"]))
                    guarded.append(res["responses"][i])
                    plain.append(base[i])
                f.write(json.dumps(line) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    print(f"{out}: {len(rows)} rows, {n_flagged} flagged (threshold {guard.threshold:g})")
    if args.eval:
        metrics = steering_metrics(labels, guarded, plain, template, answers)
        metrics.update(flagged_rate=n_flagged / max(len(rows), 1), threshold=guard.threshold)
        with replaced_file(metrics_path(out)) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
        print(f"{metrics_path(out)}: {json.dumps({k: metrics[k] for k in ('without_guard', 'with_guard')})}")
    return 0
