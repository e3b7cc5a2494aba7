"""`lvlmlp merge`: join the run folders of `extract --shard I/N` in manifest order."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="merge the run folders of `extract --shard I/N` in manifest order")
    m.add_argument("runs", nargs="+", metavar="RUNS", help="the run folders of every shard I/N (any order)")
    m.add_argument("--out", required=True, help="the merged run folder (new or empty; re-running resumes it)")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.extraction.store import merge_runs
    from lvlmlp.outputs import check_output

    check_output(args.out, "run", {"RUNS": args.runs})
    merged = merge_runs(args.runs, args.out)
    print(f"{merged.path}: {len(merged)} rows merged from {len(args.runs)} runs")
    return 0
