"""`lvlmlp transfer RUN_DIR_A RUN_DIR_B ...`: the probe of each finished `lvlmlp run` folder evaluated on the
others' test rows (one model, several tasks): the transfer table (docs/signals.md)."""

from __future__ import annotations

import argparse

from lvlmlp.ranges import NONNEG


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("transfer", help="transfer table: each run folder's probe on the other tasks' test rows")
    p.add_argument("run_dirs", nargs="+", help="finished `lvlmlp run` folders of one model (one task each)")
    p.add_argument("--out", required=True, help="folder for transfer.json, transfer.md and the per-cell scores "
                   "(new, empty or an earlier transfer table's: replaced whole)")
    p.add_argument("--prompt", default=None, help="the prompt whose probe and runs to use (default: the only one)")
    p.add_argument("--n-boot", type=NONNEG, default=1000,
                   help="bootstrap resamples of each cell's 95%% interval (default 1000)")
    p.add_argument("--seed", type=NONNEG, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.outputs import check_output
    from lvlmlp.study.transfer import markdown, transfer_table

    check_output(args.out, "transfer", {"RUN_DIR": args.run_dirs})  # never inside or over a run folder it reads
    print(markdown(transfer_table(args.run_dirs, args.out, args.prompt, args.n_boot, args.seed)))
    return 0
