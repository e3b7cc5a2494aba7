"""The paper's per-sample loop (LVLM-LP's extraction scripts), with plain transformers: one row at a time through
`generate(output_scores=True, max_new_tokens=...)`, the first step's scores written as a JSON line per row.
A peer of `bench/peers.py` (the same loop as (a) of `bench/extract_throughput.py`, in a process of its own).

    python bench/peers_paper.py MODEL_DIR MANIFEST.jsonl OUT.jsonl [--max-new-tokens 20] [--threads N]
"""

from __future__ import annotations

import json

import torch
from peer_cli import peer_args
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def main() -> None:
    args, rows = peer_args(__doc__, "--max-new-tokens", 20)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    with open(args.out, "w") as f, torch.inference_mode():
        for row in rows:
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]}],
                add_generation_prompt=True, tokenize=False)
            inputs = processor(images=[Image.open(row["image"]).convert("RGB")], text=[text], return_tensors="pt")
            res = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            f.write(json.dumps({"image": row["image"], "question": row["question"], "label": row.get("label"),
                                "logits": res.scores[0][0].float().tolist()}) + "\n")


if __name__ == "__main__":
    main()
