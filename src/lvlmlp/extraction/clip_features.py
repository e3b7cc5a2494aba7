"""CLIP / SigLIP feature baseline: does a plain image-text encoder already know what the VLM's first token knows?

Any checkpoint whose model has `get_image_features` and `get_text_features` (`CLIPModel`, `SiglipModel`,
`Siglip2Model`, ...) gives three feature kinds per row:

- `image`: the projected image embedding (`get_image_features(...).pooler_output`);
- `text`: the projected embedding of the row's question as it is (no prompt template);
- `concat`: `[image, text]`.

Embeddings are kept as the model returns them (not L2-normalised): a linear probe can learn any scaling.
Each kind is stored as an ordinary run folder whose `hidden.npy` (N, D) holds the features, with manifest
`"feature": "clip-image"` (etc.), `"hidden": true`, `max_new_tokens` 0 and `n_tokens` 0 (no generated token, so
no logits array). Probes read them through the usual feature view: `feature_matrix(run, "hidden")`, or
`lvlmlp probe train --run RUN --feature hidden`.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lvlmlp.data import check_rows, load_image, rows_fingerprint
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import oversized
from lvlmlp.extraction.store import Run, RunWriter, is_complete_run, open_run

log = logging.getLogger("lvlmlp")

KINDS: tuple[str, ...] = ("image", "text", "concat")


def _tensor(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEncoder:
    """A loaded CLIP-like model and its processor."""

    def __init__(self, model: str | Path, device: str = "auto") -> None:
        from transformers import AutoModel, AutoProcessor

        self.model_id = str(model)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id)
            self.model = AutoModel.from_pretrained(self.model_id, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise LvlmlpError(f"clip model {self.model_id!r}: cannot load it ({str(err).splitlines()[0]})") from None
        if not all(hasattr(self.model, f) for f in ("get_image_features", "get_text_features")):
            raise LvlmlpError(f"clip model {self.model_id!r}: {type(self.model).__name__} is not a CLIP-like "
                              "image-text encoder (no get_image_features / get_text_features)")
        self.model.to(self.device).eval()
        self.family: str = self.model.config.model_type
        # SigLIP was trained on texts padded to a fixed length; its text tower expects exactly that.
        self.text_padding = "max_length" if self.family.startswith("siglip") else True

    @torch.inference_mode()
    def encode(self, images: Sequence[Any], texts: Sequence[str]) -> dict[str, np.ndarray]:
        """{"image": (B, D), "text": (B, D'), "concat": (B, D + D')} float32 features of one batch."""
        pix = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        tok = self.processor(text=list(texts), return_tensors="pt", padding=self.text_padding, truncation=True)
        image = _tensor(self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device)))
        text_inputs = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        text = _tensor(self.model.get_text_features(**text_inputs))
        image_np = image.float().cpu().numpy()
        text_np = text.float().cpu().numpy()
        return {"image": image_np, "text": text_np, "concat": np.concatenate([image_np, text_np], axis=1)}


def _settings(model: str, family: str | None, kind: str, rows: list[dict]) -> dict[str, Any]:
    return {
        "model": model,
        "family": family,
        "feature": f"clip-{kind}",
        "dtype": "float32",
        "vocab_size": None,
        "prompt_template": "{question}",
        "max_new_tokens": 0,
        "logits_tokens": 0,
        "hidden": True,
        "layers": [],
        "data_hash": rows_fingerprint({k: v for k, v in r.items() if k != "_row_index"} for r in rows),
        "n_input_rows": len(rows),
    }


def extract_clip(
    model: str | Path,
    rows: list[dict],
    outs: dict[str, str | Path],
    *,
    batch_size: int = 16,
    device: str = "auto",
    on_error: str = "fail",
    progress: bool = True,
    encoder: ClipEncoder | None = None,
) -> dict[str, Run]:
    """Write one run folder per feature kind (`outs` = {kind: folder}); resumable like `extract`.

    Folders already complete with the same model and rows are returned as they are, without loading the model.
    """
    unknown = sorted(set(outs) - set(KINDS))
    if unknown:
        raise LvlmlpError(f"clip kind {unknown[0]!r}: unknown (choose from {', '.join(KINDS)})")
    rows = [dict(row, _row_index=row.get("_row_index", i)) for i, row in enumerate(rows)]
    check_rows(rows, "clip", on_error)
    model_id = str(model)
    todo = {k: Path(p) for k, p in outs.items() if not is_complete_run(p, _settings(model_id, None, k, rows), ignore=("family",))}
    if not todo:
        return {k: open_run(p) for k, p in outs.items()}
    enc = encoder or ClipEncoder(model_id, device=device)
    processor = getattr(enc, "processor", None)  # an image the processor would blow up is refused from its header
    check = functools.partial(oversized, processor) if processor is not None else None
    writers = {k: RunWriter(p, _settings(model_id, enc.family, k, rows)) for k, p in todo.items()}
    try:
        pending = [r for r in rows if any(r["id"] not in w.done_ids for w in writers.values())]
        bar = tqdm(total=len(pending), unit="row", file=sys.stderr, disable=not progress, desc="clip")
        for start in range(0, len(pending), batch_size):
            batch, images = [], []
            for row in pending[start : start + batch_size]:
                try:
                    images.append(load_image(row["image"], row["id"], check=check))
                    batch.append(row)
                except LvlmlpError as err:
                    if on_error == "fail":
                        raise LvlmlpError(f"clip: {err}") from None
                    for w in writers.values():
                        if row["id"] not in w.done_ids:
                            w.fail(row["id"], str(err))
            if batch:
                feats = enc.encode(images, [r["question"] for r in batch])
                for kind, writer in writers.items():
                    keep = [i for i, r in enumerate(batch) if r["id"] not in writer.done_ids]
                    if not keep:
                        continue
                    meta = [{k: v for k, v in batch[i].items() if k not in ("image", "_row_index")} for i in keep]
                    writer.append(meta, {
                        "hidden": feats[kind][keep],
                        "n_tokens": np.zeros(len(keep), dtype=np.int32),  # no generated token: no logits
                        "row_index": np.array([batch[i]["_row_index"] for i in keep], dtype=np.int64),
                    })
            bar.update(len(pending[start : start + batch_size]))
        bar.close()
    except BaseException:
        for writer in writers.values():
            writer.release()  # committed shards stay; the same call resumes from them
        raise
    for writer in writers.values():
        writer.close([r["id"] for r in rows])
    return {k: open_run(p) for k, p in outs.items()}


def tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random `CLIPModel` checkpoint (32-px images, 16-d projections) with a byte-level CLIP tokenizer and
    image processor, saved with `save_pretrained`: for tests and offline tries of the CLIP baseline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("t", "h"), ("th", "e</w>"), ("i", "s</w>"), ("a", "n"), ("o", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 64,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_siglip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random `SiglipModel` checkpoint (32-px images, texts padded to 32 tokens) with a SentencePiece tokenizer
    trained here on a few sentences (needs the `sentencepiece` and `protobuf` packages, as real SigLIP does)."""
    import tempfile

    import sentencepiece as spm
    from transformers import (
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
        SiglipTextConfig,
        SiglipTokenizer,
        SiglipVisionConfig,
    )

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(["is the image bright", "what is on the left", "is there a cat in the image",
                                       "a photo of a dog", "the quick brown fox jumps over the lazy dog"] * 20))
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=f"{tmp}/spiece", vocab_size=36,
                                       model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
        tokenizer = SiglipTokenizer(vocab_file=f"{tmp}/spiece.model", model_max_length=32)
        processor = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                                    tokenizer=tokenizer)
        processor.save_pretrained(out)
    text = SiglipTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1,
                            eos_token_id=1)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=8)
    torch.manual_seed(seed)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval().save_pretrained(out)
    return out
