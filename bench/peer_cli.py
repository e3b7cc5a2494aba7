"""The command line every peer script of `bench/peers.py` shares: MODEL MANIFEST OUT, --threads and one integer
option of its own; the manifest's rows read as plain JSON lines (the peers run without lvlmlp, nnsight's in a venv
of its own, so this imports nothing but torch)."""

from __future__ import annotations

import argparse
import json

import torch


def peer_args(doc: str | None, option: str, default: int) -> tuple[argparse.Namespace, list[dict]]:
    """(arguments, rows): `option` (e.g. --batch-size) with its default; torch's threads set when --threads is given."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("manifest")
    ap.add_argument("out")
    ap.add_argument(option, type=int, default=default)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.manifest) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return args, rows
