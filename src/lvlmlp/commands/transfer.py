"""`lvlmlp transfer RUN_DIR_A RUN_DIR_B ...`: the probe of each finished `lvlmlp run` folder evaluated on the
others' test rows (one model, several tasks): the transfer table (docs/signals.md)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("transfer", help="transfer table: each run folder's probe on the other tasks' test rows")
    p.add_argument("run_dirs", nargs="+", help="finished `lvlmlp run` folders of one model (one task each)")
    p.add_argument("--out", required=True, help="folder for transfer.json, transfer.md and the per-cell scores")
    p.add_argument("--prompt", default=None, help="the prompt whose probe and runs to use (default: the only one)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of each cell's 95%% interval")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.study.transfer import markdown, transfer_table

    print(markdown(transfer_table(args.run_dirs, args.out, args.prompt, args.n_boot, args.seed)))
    return 0
