"""`lvlmlp report`: a Markdown/HTML report with plots from `probe eval` folders."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    rep = subparsers.add_parser("report", help="Markdown/HTML report with plots from probe eval folders")
    rep.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIRS", help="folders written by `probe eval`")
    rep.add_argument("--out", required=True, help="report folder")
    rep.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.outputs import check_output, replaced_folder
    from lvlmlp.study.report import write_report

    check_output(args.out, "report", {"EVAL_DIRS": args.eval_dirs})
    with replaced_folder(args.out, "report") as tmp:  # a failed report leaves the previous one whole
        write_report(args.eval_dirs, tmp)
    print(f"report -> {Path(args.out) / 'report.html'}")
    return 0
