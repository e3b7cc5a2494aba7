"""`--vision` (issue 30): the vision encoder's output that the projector reads, mean-pooled over the image's tokens,
stored as vision.npy (N, D) and read by `open_run(...).vision()` / `--feature vision`; checked on every tiny family
but Chameleon (refused in one line: no continuous vision output) and Kosmos-2 (refused as a family): LLaVA, LLaVA-NeXT,
Qwen2-VL, Qwen2.5-VL, PaliGemma (1 and 2), Idefics3, SmolVLM, InstructBLIP, BLIP-2, Mllama, FastVLM, Gemma 3n and
PerceptionLM against their vision towers called directly (Gemma 3n's tolerance scaled as its features are), the
others against each image alone through the model (tolerance 1e-5: a batch of 3 against one image at a time,
float32)."""

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


def _rows(tmp_path: Path, n: int = 3, first: tuple[int, int] | None = None) -> tuple[Path, list[dict]]:
    manifest = tiny_manifest(tmp_path / "data")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:n]
    # other image sizes in one batch: Qwen's patch grids and LLaVA-NeXT's crop counts then differ between rows
    sizes = [(64, 24), (40, 90)] if first is None else [first, (64, 24), (40, 90)]
    for row, size in zip(rows[1:] if first is None else rows, sizes):
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
        if cfg.model_type in ("instructblip", "blip-2"):  # every token the Q-Former cross-attends to, CLS included
            return model.vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state[0].mean(dim=0).numpy()
        if cfg.model_type == "mllama":  # (1, 1, tiles, tokens, D), the layers side by side; the image's real tiles
            out = model.model.vision_model(pixel_values=pixels["pixel_values"],
                                           aspect_ratio_ids=pixels["aspect_ratio_ids"],
                                           aspect_ratio_mask=pixels["aspect_ratio_mask"])
            tiles = out.last_hidden_state[0, 0][pixels["aspect_ratio_mask"][0, 0].bool()]
            return tiles.reshape(-1, tiles.shape[-1]).mean(dim=0).numpy()
        if cfg.model_type == "fast_vlm":  # its hybrid tower's (1, D, h, w) state, every position a token
            return model.model.vision_tower(pixels["pixel_values"]).last_hidden_state[0].flatten(1).mean(dim=1).numpy()
        if cfg.model_type == "gemma3n":  # the same state, scaled by sqrt(D) as the model does before embed_vision
            state = model.model.vision_tower(pixel_values=pixels["pixel_values"], do_pooling=False).last_hidden_state
            return (state[0].flatten(1).mean(dim=1) * cfg.vision_config.hidden_size ** 0.5).numpy()
        if cfg.model_type == "perception_lm":  # (1, tiles, 3, H, W): every tile of the image, without the CLS token
            state = model.model.vision_tower(pixels["pixel_values"][0]).last_hidden_state
            state = state[:, 1:] if cfg.vision_use_cls_token else state
            return state.reshape(-1, state.shape[-1]).mean(dim=0).numpy()
        if cfg.model_type == "paligemma":
            return model.model.vision_tower(pixels["pixel_values"]).last_hidden_state[0].mean(dim=0).numpy()
        out = model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        return out.last_hidden_state.mean(dim=0).numpy()  # the blocks' output, before the patch merger


@pytest.mark.parametrize("family, new_tokens", [("llava", 0), ("llava", 2), ("qwen2_vl", 0), ("qwen2_5_vl", 2),
                                                ("paligemma", 0), ("paligemma2", 2), ("llava_next", 0),
                                                ("idefics3", 0), ("smolvlm", 2), ("instructblip", 2),
                                                ("blip-2", 0), ("mllama", 2), ("fast_vlm", 0), ("gemma3n", 2),
                                                ("perception_lm", 2)])
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
        # Gemma 3n's tower is convolutional (timm MobileNetV5), whose float32 rounding differs by batch size in
        # proportion to its activations, and the model scales its output by sqrt(D) (45 here) before the projector:
        # its tolerance is 2e-5 of the largest feature (about 1e-3 on features up to 70), the others' 1e-5 absolute.
        atol = 2e-5 * float(np.abs(expected).max()) if family == "gemma3n" else 1e-5
        np.testing.assert_allclose(run.vision()[i], expected, atol=atol, rtol=0, err_msg=f"{family} row {i}")
    # the feature view and a probe on it
    assert main(["probe", "train", "--run", str(out), "--feature", "vision", "--out", str(tmp_path / "probe")]) == 0
    spec = json.loads((tmp_path / "probe" / "probe.json").read_text())["feature_spec"]
    assert (spec["kind"], spec["dim"]) == ("vision", expected.shape[0])


# The module whose input (or `:output`, or keyword) is the vision encoder's output that the projector reads, per
# family, written here from each model's code apart from the quirks; one image alone, all of it mean-pooled (but for
# LFM2-VL's patches outside whole blocks, which the model does not read).
PLAIN_MODULE = {
    "gemma3": "model.multi_modal_projector", "llava_onevision": "model.multi_modal_projector",
    "idefics2": "model.connector", "mistral3": "model.multi_modal_projector", "qwen3_vl": "model.visual.merger",
    "internvl": "model.multi_modal_projector", "aya_vision": "model.multi_modal_projector",
    "glm4v": "model.visual.post_layernorm:output",
    "vipllava": "model.multi_modal_projector", "llava_next_video": "model.multi_modal_projector",
    "lfm2_vl": "model.vision_tower:output", "cohere2_vision": "model.multi_modal_projector",
    "gemma4": "model.embed_vision", "video_llava": "model.multi_modal_projector", "janus": "model.aligner",
    "deepseek_vl": "model.aligner", "ovis2": "model.visual_embeddings_table",
    "molmo2": "model.multi_modal_projector", "llama4": "multi_modal_projector",
    "qwen3_5": "model.visual.merger", "qwen3_vl_moe": "model.visual.merger", "glm4v_moe":
    "model.visual.post_layernorm:output", "qwen3_5_moe": "model.visual.merger", "glm46v":
    "model.visual.post_layernorm:output",
}


def _plain_module_vision(ckpt: Path, family: str, image: Image.Image, question: str) -> np.ndarray:
    """One image alone through the model's own forward (the processor's inputs for that one row, no padding), the
    tensor `PLAIN_MODULE` names recorded by a hook of this test, mean-pooled over every token the model reads."""
    from lvlmlp.extraction.backend import Backend

    be = Backend(ckpt, device="cpu", dtype="float32", prompt_template="{question}")
    batch = be.encode([image], [question])
    path, _, part = PLAIN_MODULE[family].partition(":")
    seen: list[torch.Tensor] = []
    module = be.model.get_submodule(path)
    if part == "output":
        handle = module.register_forward_hook(lambda m, a, out: seen.append(getattr(out, "last_hidden_state", out)))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw[part] if part else (a[0] if a else next(iter(kw.values())))),
            with_kwargs=True)
    with torch.inference_mode():
        be.model(**batch)
    handle.remove()
    # Ovis2 also embeds its image indicator token ids with the table: the soft tokens are the float inputs
    x = torch.cat([t for t in seen if t.is_floating_point()]).float()
    if family == "lfm2_vl":  # (tiles, patches, D) of (h, w) patch grids; the projector reads whole 2x2 blocks
        f = be.config.downsample_factor
        x = torch.cat([t[: h * w].reshape(h, w, -1)[: h // f * f, : w // f * f].reshape(-1, t.shape[-1])
                       for t, (h, w) in zip(x, batch["spatial_shapes"].tolist())])
    return x.reshape(-1, x.shape[-1]).mean(dim=0).numpy()


@pytest.mark.parametrize("family", sorted(PLAIN_MODULE))
def test_vision_of_every_family_equals_its_rows_alone(tiny_ckpt, tmp_path: Path, family: str) -> None:
    """A batch of 3 rows of other image sizes (other crop counts, patch grids, tiles) equals each image alone
    through the model, to 1e-5 absolute (float32); the families whose layout needs no generated token are checked
    on a prefill, the others (and every third family) with 2 generated tokens."""
    ckpt = tiny_ckpt(family)
    # Idefics2 pads a batch's pixels and encodes every patch holding a real pixel: a 32 px image (patch 7) is read as
    # 5 x 5 patches in a batch and 4 x 4 alone, by the model itself; a 28 px one is the same both ways.
    data, rows = _rows(tmp_path, first=(28, 28) if family == "idefics2" else None)
    out = tmp_path / "run"
    new_tokens = 2 if sorted(PLAIN_MODULE).index(family) % 3 == 0 else 0
    assert main(["extract", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--vision",
                 "--max-new-tokens", str(new_tokens), "--prompt-template", "{question}", "--no-progress"]) == 0
    vision = open_run(out).vision()
    assert vision.shape[0] == 3
    for i, row in enumerate(rows):
        image = Image.open(data.parent / row["image"]).convert("RGB")
        expected = _plain_module_vision(ckpt, family, image, row["question"])
        assert vision.shape[1] == expected.shape[0]
        np.testing.assert_allclose(vision[i], expected, atol=1e-5, rtol=0, err_msg=f"{family} row {i}")


def test_unsupported_family_is_refused(tiny_ckpt, tmp_path: Path, capsys) -> None:
    data, _ = _rows(tmp_path, 2)
    out = tmp_path / "run"
    ckpt = tiny_ckpt("chameleon")
    capsys.readouterr()  # building the checkpoint prints progress
    assert main(["extract", "--model", str(ckpt), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--vision", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lvlmlp: error: --vision: not available for model family 'chameleon': its images enter as discrete VQ "
        "tokens of the text vocabulary: no projector reads a continuous vision-encoder output")
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


def test_quirks_naming_a_missing_module_or_a_wrong_layout_are_refused(tiny_ckpt, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The vision hook is data (`Quirks.vision_input` / `vision_layout`): a row that names a module the model lacks
    is refused before any row is read, and a layout that does not fit the captured tensor stops the batch in one
    line rather than pool the wrong rows (LLaVA-NeXT's crops read as one image per row)."""
    import dataclasses

    from lvlmlp.errors import LvlmlpError
    from lvlmlp.extraction import families
    from lvlmlp.extraction.backend import Backend

    data, rows = _rows(tmp_path)
    images = [Image.open(data.parent / r["image"]).convert("RGB") for r in rows]
    monkeypatch.setitem(families.QUIRKS, "llava", dataclasses.replace(families.QUIRKS.get("llava", families.Quirks()),
                                                                      vision_input="model.no_projector"))
    be = Backend(tiny_ckpt("llava"), device="cpu", dtype="float32")
    with pytest.raises(LvlmlpError) as err:
        be.check_vision()
    assert str(err.value) == ("--vision: the llava model has no module 'model.no_projector' (its quirks' "
                              "vision_input); the vision output cannot be taken")
    monkeypatch.setitem(families.QUIRKS, "llava_next", dataclasses.replace(families.QUIRKS["llava_next"],
                                                                           vision_layout="batched"))
    be = Backend(tiny_ckpt("llava_next"), device="cpu", dtype="float32")
    batch = be.encode(images, [r["question"] for r in rows])
    with pytest.raises(LvlmlpError) as err:
        be.prefill(batch, vision=True)
    crops = int((batch["pixel_values"].flatten(2).abs().sum(-1) > 0).sum())  # the real ones; padding crops are 0
    assert crops > 3 and str(err.value) == (f"--vision: the captured vision output holds {crops} images for a batch "
                                            "of 3 rows; the family's vision layout does not fit this model")


def test_every_tiny_family_is_checked_or_refused() -> None:
    """A family added to `lvlmlp.testing.SPECS` gets its --vision check here (a `PLAIN_MODULE` entry) or a refusal
    (`Quirks.vision_refused`, or the family refused as a whole)."""
    from lvlmlp.extraction.families import quirks_of
    from lvlmlp.testing import SPECS

    direct = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma", "idefics3", "smolvlm", "instructblip",
              "blip-2", "mllama", "fast_vlm", "gemma3n", "perception_lm"}  # the first test
    types = {spec.model_type for spec in SPECS.values()}
    refused = {t for t in types if quirks_of(t).vision_refused or quirks_of(t).refused}
    assert refused == {"chameleon", "kosmos-2"}
    assert types - refused == direct | set(PLAIN_MODULE)
    assert not (direct & set(PLAIN_MODULE)) and not (refused & set(PLAIN_MODULE))
