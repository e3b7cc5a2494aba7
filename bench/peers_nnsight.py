"""First-token logits with nnsight, a peer of `bench/peers.py`: the model wrapped in `nnsight.NNsight`, each
left-padded batch of the processor run through one `trace`, the last position's logits saved, `np.save` at the end.
Runs in a Python environment that has nnsight (not lvlmlp's: see bench/peers.py --nnsight-python).

    python bench/peers_nnsight.py MODEL_DIR MANIFEST.jsonl OUT.npy [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import numpy as np
import torch
from nnsight import NNsight
from peer_cli import left_padded_batches, peer_args
from transformers import AutoModelForImageTextToText, AutoProcessor


def main() -> None:
    args, rows = peer_args(__doc__, "--batch-size", 8)
    model = NNsight(AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval())
    processor = AutoProcessor.from_pretrained(args.model)
    out = []
    with torch.inference_mode():
        for inputs, positions in left_padded_batches(processor, rows, args.batch_size):
            with model.trace(**inputs, position_ids=positions, logits_to_keep=1):
                logits = model.output.logits[:, -1].save()
            out.append(logits.float().numpy())
    np.save(args.out, np.concatenate(out).astype(np.float16))


if __name__ == "__main__":
    main()
