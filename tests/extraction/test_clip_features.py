"""CLIP feature baseline: stored features equal CLIPModel.get_image_features / get_text_features computed
independently, the runs resume without loading the model, and probes read them through the feature views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.clip_features import ClipEncoder, extract_clip, tiny_clip
from lvlmlp.probing.features import feature_matrix


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    rows = []
    questions = ["is the image bright ?", "what is on the left", "is there a cat in the image ?"]
    for i in range(7):
        size = (int(rng.integers(20, 50)), int(rng.integers(20, 50)))
        mode = "RGBA" if i == 3 else "RGB"  # converted to RGB before the processor, as in the extractor
        img = Image.fromarray(rng.integers(0, 256, (*size, len(mode)), dtype=np.uint8), mode)
        img.save(root / f"{i}.png")
        rows.append({"id": f"c{i}", "image": str(root / f"{i}.png"), "question": questions[i % 3],
                     "label": i % 2, "note": "kept"})
    return tiny_clip(root / "model"), rows


def _independent(model_dir: Path, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """One row at a time, straight through transformers."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPProcessor.from_pretrained(model_dir)
    images, texts = [], []
    with torch.inference_mode():
        for row in rows:
            with Image.open(row["image"]) as im:
                pix = proc(images=im.convert("RGB"), return_tensors="pt")["pixel_values"]
            images.append(model.get_image_features(pixel_values=pix).pooler_output[0].numpy())
            tok = proc(text=[row["question"]], return_tensors="pt")
            texts.append(model.get_text_features(input_ids=tok["input_ids"],
                                                 attention_mask=tok["attention_mask"]).pooler_output[0].numpy())
    return np.stack(images), np.stack(texts)


def test_clip_features_equal_independent_clipmodel(clip_setup, tmp_path: Path):
    model_dir, rows = clip_setup
    outs = {k: tmp_path / k for k in ("image", "text", "concat")}
    runs = extract_clip(model_dir, rows, outs, batch_size=3, device="cpu", progress=False)
    image, text = _independent(model_dir, rows)
    assert image.shape == (7, 16) and text.shape == (7, 16)
    np.testing.assert_allclose(runs["image"].hidden(), image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs["text"].hidden(), text, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs["concat"].hidden(), np.concatenate([image, text], axis=1), rtol=1e-5, atol=1e-5)
    run = runs["concat"]
    assert run.ids == [r["id"] for r in rows] and run.meta[0] == {"id": "c0", "question": rows[0]["question"],
                                                                   "label": 0, "note": "kept"}
    assert (run.manifest["feature"], run.manifest["family"], run.manifest["hidden"]) == ("clip-concat", "clip", True)
    assert run.n_tokens.tolist() == [0] * 7
    # The ordinary feature view reads them, so every probe and `probe train --feature hidden` works on them.
    np.testing.assert_array_equal(feature_matrix(run, "hidden"), run.hidden())


def test_siglip_features_equal_independent_siglipmodel_with_fixed_length_text(clip_setup, tmp_path: Path):
    """SigLIP's text tower was trained on texts padded to a fixed length: the stored text features equal
    `get_text_features` on each question alone padded that way (and padding to the batch's longest would not)."""
    from transformers import SiglipModel, SiglipProcessor

    from lvlmlp.extraction.clip_features import tiny_siglip

    _, rows = clip_setup
    model_dir = tiny_siglip(tmp_path / "siglip")
    runs = extract_clip(model_dir, rows, {k: tmp_path / k for k in ("image", "text")}, batch_size=3, device="cpu",
                        progress=False)
    model = SiglipModel.from_pretrained(model_dir).eval()
    proc = SiglipProcessor.from_pretrained(model_dir)
    with torch.inference_mode():
        text = [model.get_text_features(**proc(text=[r["question"]], padding="max_length", return_tensors="pt"))
                .pooler_output[0].numpy() for r in rows]
        loose = model.get_text_features(**proc(text=[r["question"] for r in rows], padding=True,
                                               return_tensors="pt")).pooler_output.numpy()
        image = [model.get_image_features(**proc(images=Image.open(r["image"]).convert("RGB"), return_tensors="pt"))
                 .pooler_output[0].numpy() for r in rows]
    assert runs["text"].manifest["family"] == "siglip"
    np.testing.assert_allclose(runs["text"].hidden(), np.stack(text), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runs["image"].hidden(), np.stack(image), rtol=1e-5, atol=1e-5)
    assert np.abs(loose - np.stack(text)).max() > 1e-3  # the padding matters, so the check above means something


def test_clip_runs_resume_without_loading_the_model(clip_setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import lvlmlp.extraction.clip_features as cf

    model_dir, rows = clip_setup
    outs = {"image": tmp_path / "image"}
    first = extract_clip(model_dir, rows, outs, batch_size=4, device="cpu", progress=False)["image"].hidden().copy()
    manifest = (tmp_path / "image" / "manifest.json").read_text()

    def forbidden(*args, **kwargs):
        raise AssertionError("finished CLIP runs must not load the model")

    monkeypatch.setattr(cf, "ClipEncoder", forbidden)
    again = extract_clip(model_dir, rows, outs, batch_size=4, device="cpu", progress=False)["image"]
    np.testing.assert_array_equal(again.hidden(), first)
    assert (tmp_path / "image" / "manifest.json").read_text() == manifest
    # other rows are other data: refused by the store, naming what differs
    monkeypatch.setattr(cf, "ClipEncoder", ClipEncoder)
    with pytest.raises(LvlmlpError, match="data_hash"):
        extract_clip(model_dir, rows[:5], outs, device="cpu", progress=False)


def test_clip_errors_are_one_line(clip_setup, tmp_path: Path, tiny_ckpt):
    model_dir, rows = clip_setup
    with pytest.raises(LvlmlpError, match="unknown"):
        extract_clip(model_dir, rows, {"pixels": tmp_path / "p"}, progress=False)
    with pytest.raises(LvlmlpError, match="not a CLIP-like"):
        ClipEncoder(tiny_ckpt("llava"), device="cpu")
    broken = [dict(rows[0], image=str(tmp_path / "missing.png"))]
    with pytest.raises(LvlmlpError, match="missing.png"):
        extract_clip(model_dir, broken, {"image": tmp_path / "i"}, progress=False)
    assert not (tmp_path / "i").exists()
    json.dumps(rows)  # rows stay plain JSON (no state leaked into them)
