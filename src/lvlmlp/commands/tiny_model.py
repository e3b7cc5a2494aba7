"""`lvlmlp tiny-model --family F --out DIR`: a tiny random checkpoint of a VLM family (for tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lvlmlp.ranges import NONNEG
from lvlmlp.testing import FAMILIES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tiny-model", help="write a tiny random checkpoint of a VLM family (for tests)")
    parser.add_argument("--family", required=True, choices=FAMILIES, help="the model family to imitate")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=NONNEG, default=0, help="seed of the random weights (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.outputs import check_output, replaced_folder
    from lvlmlp.testing import tiny_model

    check_output(args.out, "tiny-model")
    with replaced_folder(args.out, "tiny-model") as tmp:
        tiny_model(args.family, tmp, seed=args.seed)
    print(args.out)
    return 0
