"""`lvlmlp report`: a Markdown/HTML report with plots from `probe eval` folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    rep = subparsers.add_parser("report", help="Markdown/HTML report with plots from probe eval folders")
    rep.add_argument("eval_dirs", nargs="+", help="folders written by `probe eval`")
    rep.add_argument("--out", required=True, help="report folder")
    rep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.study.report import write_report

    write_report(args.eval_dirs, args.out)
    print(f"report -> {Path(args.out) / 'report.html'}")
    return 0
