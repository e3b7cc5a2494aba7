"""`--vision` (issue 30): the vision encoder's output that the projector reads, mean-pooled over the image's tokens,
stored as vision.npy (N, D) and read by `open_run(...).vision()` / `--feature vision`; checked against plain
transformers on tiny LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, PaliGemma, PaliGemma 2, Idefics3 and SmolVLM
checkpoints (tolerance 1e-5: a batch of 3 against one image at a
time, float32); other families refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp.cli import main
from lvlmlp.extraction.store import open_run
from lvlmlp.testing import tiny_manifest


def _rows(tmp_path: Path, n: int = 3) -> tuple[Path, list[dict]]:
    manifest = tiny_manifest(tmp_path / "data")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:n]
    # other image sizes in one batch: Qwen's patch grids and LLaVA-NeXT's crop counts then differ between rows
    for row, size in zip(rows[1:], [(64, 24), (40, 90)]):
        path = manifest.parent / row["image"]
        Image.open(path).convert("RGB").resize(size).save(path)
    data = manifest.parent / "some.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, rows


def _plain_vision(ckpt: Path, image: Image.Image) -> np.ndarray:
    """The projector's input computed with the model's public modules from the image processor's pixels alone,
    mean-pooled over the image's tokens."""
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    pixels = AutoProcessor.from_pretrained(ckpt).image_processor(images=[image], return_tensors="pt")
    cfg = model.config
    with torch.inference_mode():
        if cfg.model_type in ("llava", "llava_next"):
            pv = pixels["pixel_values"]
            if pv.dim() == 5:  # LLaVA-NeXT: (1, crops, 3, H, W), the base image and its crops, one image
                pv = pv[0]
            out = model.model.vision_tower(pv, output_hidden_states=True)
            feats = out.hidden_states[cfg.vision_feature_layer]
            if cfg.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]  # the CLS token is not given to the projector
            return feats.reshape(-1, feats.shape[-1]).mean(dim=0).numpy()  # over every crop's patches
        if cfg.model_type in ("idefics3", "smolvlm"):  # the tiny processor's sub-images hold pixels everywhere
            pv = pixels["pixel_values"][0]
            return model.model.vision_model(pixel_values=pv).last_hidden_state.reshape(-1, cfg.vision_config
                                                                                        .hidden_size).mean(0).numpy()
        if cfg.model_type == "paligemma":
            return model.model.vision_tower(pixels["pixel_values"]).last_hidden_state[0].mean(dim=0).numpy()
        out = model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        return out.last_hidden_state.mean(dim=0).numpy()  # the blocks' output, before the patch merger


@pytest.mark.parametrize("family, new_tokens", [("llava", 0), ("llava", 2), ("qwen2_vl", 0), ("qwen2_5_vl", 2),
                                                ("paligemma", 0), ("paligemma2", 2), ("llava_next", 0),
                                                ("idefics3", 0), ("smolvlm", 2)])
def test_vision_equals_plain_transformers(tiny_ckpt, tmp_path: Path, family: str, new_tokens: int) -> None:
    ckpt = tiny_ckpt(family)
    data, rows = _rows(tmp_path)
    out = tmp_path / "run"
    assert main(["extract", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--vision",
                 "--max-new-tokens", str(new_tokens), "--prompt-template", "{question}", "--no-progress"]) == 0
    run = open_run(out)
    assert run.manifest["vision"] is True
    assert run.vision().shape[0] == 3
    for i, row in enumerate(rows):
        image = Image.open(data.parent / row["image"]).convert("RGB")
        expected = _plain_vision(ckpt, image)
        assert run.vision().shape[1] == expected.shape[0]
        np.testing.assert_allclose(run.vision()[i], expected, atol=1e-5, rtol=0)
    # the feature view and a probe on it
    assert main(["probe", "train", "--run", str(out), "--feature", "vision", "--out", str(tmp_path / "probe")]) == 0
    spec = json.loads((tmp_path / "probe" / "probe.json").read_text())["feature_spec"]
    assert (spec["kind"], spec["dim"]) == ("vision", expected.shape[0])


def test_unsupported_family_is_refused(tiny_ckpt, tmp_path: Path, capsys) -> None:
    data, _ = _rows(tmp_path, 2)
    out = tmp_path / "run"
    ckpt = tiny_ckpt("instructblip")
    capsys.readouterr()  # building the checkpoint prints progress
    assert main(["extract", "--model", str(ckpt), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--vision", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("lvlmlp: error: --vision: not supported for model family "
                                               "'instructblip' yet (supported: llava, qwen2_vl, qwen2_5_vl, paligemma, "
                                                               "llava_next, idefics3, smolvlm)")
    assert not (out / "manifest.json").exists()


def test_a_run_without_vision_has_none(tiny_ckpt, tmp_path: Path) -> None:
    data, _ = _rows(tmp_path, 2)
    out = tmp_path / "run"
    assert main(["extract", "--model", str(tiny_ckpt("llava")), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    run = open_run(out)
    assert "vision" not in run.manifest
    with pytest.raises(Exception, match="this run has no 'vision' array"):
        run.vision()


def test_subimage_pooling_skips_padding_images_and_empty_patches() -> None:
    """Idefics3/SmolVLM pooling on a hand-made batch: a padding (all-zero) sub-image is not a row's image, and a
    patch without pixels (pixel_attention_mask 0 over it) is not averaged; checked with plain loops."""
    from lvlmlp.extraction.backend import _pool_subimages

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 2, 3, 4, 4, generator=gen) + 0.1
    pixels[1, 1] = 0.0  # row 1 has one real sub-image
    pam = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    pam[0, 1, :, 2:] = False  # row 0's second sub-image: its right half is padding (patches 1 and 3 of 2x2)
    captured = torch.randn(3, 4, 5, generator=gen)  # 3 real sub-images, 2x2 patches of 2 px, D = 5
    got = _pool_subimages(captured, {"pixel_values": pixels, "pixel_attention_mask": pam}, 2)
    row0 = [captured[0, p] for p in range(4)] + [captured[1, p] for p in (0, 2)]
    row1 = [captured[2, p] for p in range(4)]
    expected = torch.stack([sum(row0) / len(row0), sum(row1) / len(row1)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
