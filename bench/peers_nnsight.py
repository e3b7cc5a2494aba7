"""First-token logits with nnsight, a peer of `bench/peers.py`: the model wrapped in `nnsight.NNsight`, each
left-padded batch of the processor run through one `trace`, the last position's logits saved, `np.save` at the end.
Runs in a Python environment that has nnsight (not lvlmlp's: see bench/peers.py --nnsight-python).

    python bench/peers_nnsight.py MODEL_DIR MANIFEST.jsonl OUT.npy [--batch-size 8] [--threads N]
"""

from __future__ import annotations

import numpy as np
import torch
from nnsight import NNsight
from peer_cli import peer_args
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def main() -> None:
    args, rows = peer_args(__doc__, "--batch-size", 8)
    model = NNsight(AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval())
    processor = AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    out = []
    with torch.inference_mode():
        for s in range(0, len(rows), args.batch_size):
            chunk = rows[s : s + args.batch_size]
            texts = [processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
                add_generation_prompt=True, tokenize=False) for r in chunk]
            images = [[Image.open(r["image"]).convert("RGB")] for r in chunk]
            inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
            positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with model.trace(**inputs, position_ids=positions, logits_to_keep=1):
                logits = model.output.logits[:, -1].save()
            out.append(logits.float().numpy())
    np.save(args.out, np.concatenate(out).astype(np.float16))


if __name__ == "__main__":
    main()
