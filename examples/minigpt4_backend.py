"""An lvlmlp backend for a model outside transformers' Auto classes (docs/backends.md): a MiniGPT-4-shaped toy.

The model is plain torch modules: a vision encoder (7 px patches, pooled to 4 image tokens), a linear projector, and
a causal language model; nothing registers it with an Auto class. `MiniGPT4Backend` gives lvlmlp what the protocol
asks (`lvlmlp.extraction.protocol`): prompts, a left-padded batch, first-token logits and hidden states, greedy
generation with raw logits and a logits processor, the tokenizer.

    python examples/minigpt4_backend.py tiny-minigpt4      # writes a tiny random checkpoint folder
    lvlmlp extract --backend examples/minigpt4_backend.py:MiniGPT4Backend --model tiny-minigpt4 --data ... --out ...
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

IMAGE = "<ImageHere>"  # one placeholder token per image embedding
N_IMAGE_TOKENS = 4
SIZE = 28  # pixels a side


class TinyMiniGPT4(nn.Module):
    """Vision encoder -> projector -> causal LM, as MiniGPT-4 (ViT + Q-Former -> linear -> Vicuna), only tiny."""

    def __init__(self, vocab_size: int, pad_id: int, hidden: int = 32) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.vision = nn.Sequential(nn.Conv2d(3, hidden, kernel_size=7, stride=7), nn.GELU(), nn.AdaptiveAvgPool2d(2))
        self.projector = nn.Linear(hidden, hidden)
        self.lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=512, pad_token_id=pad_id,
                                               initializer_range=0.2))

    def embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_id: int) -> torch.Tensor:
        """Token embeddings, with each row's image placeholders replaced by its projected image features."""
        text = self.lm.get_input_embeddings()(input_ids)
        image = self.projector(self.vision(pixel_values).flatten(2).transpose(1, 2))  # (B, 4, H)
        return text.masked_scatter((input_ids == image_id)[..., None], image.to(text.dtype))


def write_tiny(out: str | Path, seed: int = 0) -> Path:
    """A tiny random checkpoint folder: `weights.pt` and a tokenizer trained offline."""
    from lvlmlp.testing import Tokens, _tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(Tokens(("<unk>", "<s>", "</s>", "<pad>", IMAGE, "###"), bos="<s>", eos="</s>", pad="<pad>",
                            unk="<unk>", add_bos=True))
    tok.save_pretrained(out / "tokenizer")
    torch.manual_seed(seed)
    torch.save(TinyMiniGPT4(len(tok), tok.pad_token_id).state_dict(), out / "weights.pt")
    return out


class MiniGPT4Backend:
    """The lvlmlp backend protocol for `TinyMiniGPT4` checkpoints (see `lvlmlp.extraction.protocol.BackendProtocol`)."""

    family = "minigpt4-example"
    revision = None

    def __init__(self, model: str, *, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import PreTrainedTokenizerFast

        folder = Path(model)
        self.model_id, self.device, self.dtype = str(model), device, dtype
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
        self.tokenizer.padding_side = "left"  # every row's last prompt token in the last column
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE)
        self.model = TinyMiniGPT4(len(self.tokenizer), self.tokenizer.pad_token_id)
        self.model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu"))
        self.model.to(device, dtype).eval()
        self.weights_hash = hashlib.sha256((folder / "weights.pt").read_bytes()).hexdigest()
        self.vocab_size = len(self.tokenizer)
        self.max_length = 512
        self.num_layers = 2

    def prompt(self, question: str) -> str:
        return f"###Human: <Img>{IMAGE}</Img> {question} ###Assistant:"

    def collate(self, images: list[Any], questions: list[str]) -> dict[str, torch.Tensor]:
        """CPU tensors of one left-padded batch (data-loader workers run this)."""
        texts = [self.prompt(q).replace(IMAGE, IMAGE * N_IMAGE_TOKENS) for q in questions]
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        pixels = np.stack([np.asarray(im.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32) / 255.0
                           for im in images])
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "pixel_values": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()}

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None) for k, v in batch.items()}

    def encode(self, images: list[Any], questions: list[str]) -> dict[str, torch.Tensor]:
        return self.to_device(self.collate(images, questions))

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        return {"inputs_embeds": self.model.embeds(batch["input_ids"], batch["pixel_values"], self.image_id),
                "attention_mask": mask,
                # positions counted over real tokens, so left padding shifts nothing (as generate does)
                "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}

    @torch.inference_mode()
    def prefill(self, batch: dict[str, torch.Tensor], *, hidden: bool = False,
                layers: Sequence[int] = ()) -> dict[str, torch.Tensor]:
        out = self.model.lm(**self._inputs(batch), output_hidden_states=True, use_cache=False)
        result = {"logits": out.logits[:, -1].float()}
        if hidden:
            result["hidden"] = out.hidden_states[-1][:, -1].float()
        if layers:
            result["layers"] = torch.stack([out.hidden_states[i][:, -1].float() for i in layers], dim=1)
        return result

    @torch.inference_mode()
    def generate(self, batch: dict[str, torch.Tensor], *, max_new_tokens: int, hidden: bool = False,
                 layers: Sequence[int] = (), logits_processor: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Greedy decoding: RAW logits (B, K, V), ids (B, K), `n_tokens` up to and including the end of sequence,
        pad ids and zero logits after it, decoded responses."""
        inputs = self._inputs(batch)
        inputs.pop("position_ids")  # generate counts them from the attention mask itself
        eos = self.tokenizer.eos_token_id
        out = self.model.lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, logits_processor=logits_processor,
                                     pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos,
                                     **{k: v for k, v in kwargs.items() if k not in ("do_sample",)})
        steps, bsz = len(out.logits), inputs["attention_mask"].shape[0]
        logits = torch.zeros(bsz, max_new_tokens, out.logits[0].shape[-1], device=self.device)
        logits[:, :steps] = torch.stack(out.logits, dim=1).float()
        ids = torch.full((bsz, max_new_tokens), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
        ids[:, :steps] = out.sequences[:, -steps:]
        is_eos = ids == eos
        n_tokens = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(ids[:, 0], steps))
        valid = torch.arange(max_new_tokens, device=self.device)[None] < n_tokens[:, None]
        ids, logits = ids.masked_fill(~valid, self.tokenizer.pad_token_id), logits.masked_fill(~valid[..., None], 0)
        result: dict[str, Any] = {
            "logits": logits, "sequences": ids, "n_tokens": n_tokens.cpu(),
            "responses": [self.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                          for row, n in zip(ids.tolist(), n_tokens.tolist())],
        }
        if hidden or layers:
            result.update({k: v for k, v in self.prefill(batch, hidden=hidden, layers=layers).items() if k != "logits"})
        return result


if __name__ == "__main__":
    print(write_tiny(sys.argv[1] if len(sys.argv) > 1 else "tiny-minigpt4"))
