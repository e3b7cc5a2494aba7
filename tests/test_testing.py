"""Tiny checkpoints: real, offline-loadable through the Auto classes, deterministic for a seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.families import quirks_of
from lvlmlp.testing import FAMILIES, SPECS, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_through_auto_classes(tiny_ckpt, family: str) -> None:
    path = tiny_ckpt(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.model_type == SPECS[family].model_type
    # Gemma 3n's MobileNet-V5 tower keeps timm's 84 blocks, their attention widths and its 2048 output channels (only
    # its other channels scale): about 1.5M parameters, every other family under 0.5M.
    assert sum(p.numel() for p in model.parameters()) < (2_000_000 if family == "gemma3n" else 500_000)
    # Every token the processor can emit has an embedding row.
    assert len(processor.tokenizer) <= model.get_input_embeddings().weight.shape[0]
    has_template = bool(getattr(processor, "chat_template", None))
    # A family's quirks say whether the backend renders its chat template: the tiny checkpoint has one exactly then.
    assert has_template == quirks_of(SPECS[family].model_type).chat_template
    ids = processor.tokenizer("is there a cat in the image ?", add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == "is there a cat in the image ?"  # byte-level BPE round trip


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    a = tiny_model("llava", tmp_path / "a", seed=0)
    b = tiny_model("llava", tmp_path / "b", seed=0)
    c = tiny_model("llava", tmp_path / "c", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_unknown_family_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(LvlmlpError, match="unknown model family 'gpt2'.*llava, llava_next"):
        tiny_model("gpt2", tmp_path)


def test_cli_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    assert main(["tiny-model", "--family", "llava", "--out", str(out), "--seed", "3"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {"0o644"}, modes
    assert main(["tiny-model", "--family", "nope", "--out", str(out)]) == 2
