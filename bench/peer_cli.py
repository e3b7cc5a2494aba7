"""What every peer script of `bench/peers.py` shares: the command line (MODEL MANIFEST OUT, --threads and one integer
option of its own; the manifest's rows read as plain JSON lines) and the batches a competent transformers user
prepares (`left_padded_batches`). The peers run without lvlmlp, nnsight's in a venv of its own, so this imports
only torch and, for the batches, PIL."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

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


def left_padded_batches(processor: Any, rows: list[dict], batch_size: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """(inputs, position_ids) of each batch of `rows`: the chat template, left padding, positions counted over the
    real tokens (as `generate` counts them), images decoded with PIL."""
    from PIL import Image

    processor.tokenizer.padding_side = "left"
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
            add_generation_prompt=True, tokenize=False) for r in chunk]
        images = [[Image.open(r["image"]).convert("RGB")] for r in chunk]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        yield inputs, (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
