"""`lvlmlp demo`: the whole method on the embedded synthetic world and tiny trained model, in about a minute."""

from __future__ import annotations

import argparse
from pathlib import Path

from lvlmlp.ranges import COUNT, NONNEG, Range


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole method on the embedded synthetic world and tiny trained model")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out; re-running resumes it)")
    p.add_argument("--n-train", type=Range(int, 4), default=200, help="train rows per analogue (default 200)")
    p.add_argument("--n-test", type=Range(int, 4), default=200, help="test rows per analogue (default 200)")
    p.add_argument("--max-new-tokens", type=COUNT, default=5,
                   help="tokens generated per row (token decay 1..K; default 5)")
    p.add_argument("--batch-size", type=COUNT, default=32, help="rows per forward (default 32)")
    p.add_argument("--seed", type=NONNEG, default=0, help="seed of the world and the sampling (default 0)")
    p.add_argument("--model", default=None, help="another checkpoint instead of the embedded demo model")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--threads", type=COUNT, default=1,
                   help="torch CPU threads (default 1: the tiny demo model's ops are too small to gain from more; "
                        "2 threads took twice as long on a 2-core machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.commands._args import input_flags
    from lvlmlp.outputs import check_output, write_text_atomic

    check_output(args.out, "demo", input_flags(args))  # before torch is imported
    import torch

    from lvlmlp.commands._args import silence_progress_bars
    from lvlmlp.demo.pipeline import run_demo, summary_table, verdicts

    torch.set_num_threads(args.threads)
    silence_progress_bars()  # transformers' weight-loading bars (one per model load); the demo shows its own bar
    results = run_demo(args.out, n_train=args.n_train, n_test=args.n_test, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, seed=args.seed, model=args.model, device=args.device,
                       progress=not args.no_progress)
    summary = summary_table(results)
    out = Path(args.out)
    # The README's demo table is this file's content (tests/test_readme.py checks it against a fresh run).
    write_text_atomic(out / "summary.md", summary + "\n")
    print(summary)
    print("", *verdicts(results), sep="\n")  # in words (report.html has them too); not in summary.md
    print(f"\nwrote {out / 'summary.md'}, {out / 'results.json'} and {out / 'report.html'} in {results['seconds']} s")
    return 0
