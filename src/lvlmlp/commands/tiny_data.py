"""`lvlmlp tiny-data --out DIR`: a small labelled manifest with train/test splits (the data of configs/ci_tiny.yaml)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lvlmlp.ranges import COUNT, NONNEG


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tiny-data", help="write a tiny labelled train/test manifest (for tests and CI)")
    parser.add_argument("--out", required=True, type=Path, help="folder for manifest.jsonl and img/")
    parser.add_argument("--n-train", type=COUNT, default=24, help="train rows (default 24)")
    parser.add_argument("--n-test", type=COUNT, default=16, help="test rows (default 16)")
    parser.add_argument("--seed", type=NONNEG, default=0, help="seed of the images (default 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.outputs import check_output, replaced_folder
    from lvlmlp.testing import tiny_manifest

    check_output(args.out, "tiny-data")
    with replaced_folder(args.out, "tiny-data") as tmp:  # image paths in the manifest are relative: it moves whole
        name = tiny_manifest(tmp, args.n_train, args.n_test, args.seed).name
    print(args.out / name)
    return 0
