"""A competent hand-written first-token extractor with plain transformers: the peer `bench/peers.py` times.

What a careful user writes without lvlmlp: load the model and processor, render each row's prompt with the chat
template, left-pad batches, one forward with `logits_to_keep=1` (positions counted over real tokens, as `generate`
does, so a padded row gets its unpadded logits), and `np.save` the first token's logits at the end.

    python bench/peers_handwritten.py MODEL_DIR MANIFEST.jsonl OUT.npy [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import numpy as np
import torch
from peer_cli import left_padded_batches, peer_args
from transformers import AutoModelForImageTextToText, AutoProcessor


def first_token_logits(model_dir: str, rows: list[dict], batch_size: int = 8) -> np.ndarray:
    """(N, V) float32 logits of the first generated token of each row (`id`, `image`, `question`)."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    out = []
    with torch.inference_mode():
        for inputs, positions in left_padded_batches(processor, rows, batch_size):
            logits = model(**inputs, position_ids=positions, logits_to_keep=1).logits[:, -1]
            out.append(logits.float().numpy())
    return np.concatenate(out)


def main() -> None:
    args, rows = peer_args(__doc__, "--batch-size", 8)
    np.save(args.out, first_token_logits(args.model, rows, args.batch_size).astype(np.float16))


if __name__ == "__main__":
    main()
