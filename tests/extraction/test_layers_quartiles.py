"""`layers: quartiles` (issue 30): HALP's layer set {0, L/4, L/2, 3L/4, L}, resolved per family from the model's own
layer count (extract `--layers quartiles`, the config key `extract.layers: quartiles`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend, quartile_layers
from lvlmlp.extraction.store import open_run
from lvlmlp.study.config import load_config
from lvlmlp.testing import tiny_manifest


def _expected(n_layers: int) -> list[int]:
    # written out independently: the k-th quarter of L, floored, for k = 0..4, each index once
    out: list[int] = []
    for k in range(5):
        index = int(np.floor(k * n_layers / 4))
        if index not in out:
            out.append(index)
    return out


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 7, 8, 28, 32, 40, 80])
def test_quartile_layers_formula(n_layers: int) -> None:
    assert quartile_layers(n_layers) == _expected(n_layers)


def test_quartile_layers_of_the_usual_sizes() -> None:
    assert quartile_layers(32) == [0, 8, 16, 24, 32]  # LLaVA-1.5-7B (Vicuna-7B)
    assert quartile_layers(28) == [0, 7, 14, 21, 28]  # Qwen2.5-VL-7B
    assert quartile_layers(2) == [0, 1, 2]  # the tiny checkpoints


def _deeper(ckpt: Path, out: Path, n_layers: int) -> Path:
    """A copy of a tiny checkpoint with `n_layers` decoder layers (the new layers initialised, then saved)."""
    shutil.copytree(ckpt, out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"]["num_hidden_layers"] = n_layers
    cfg["text_config"].pop("layer_types", None)  # one entry per layer; rebuilt by the config class
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(out)
    model.save_pretrained(out)
    return out


def _config_layers(ckpt: Path) -> int:
    return int(json.loads((ckpt / "config.json").read_text())["text_config"]["num_hidden_layers"])


def test_resolved_per_family_from_the_config(tiny_ckpt, tmp_path: Path) -> None:
    """Two tiny families of different depths: each gets its own indices, read without loading the weights."""
    llava = tiny_ckpt("llava")
    qwen = _deeper(tiny_ckpt("qwen2_5_vl"), tmp_path / "qwen8", 8)
    assert _config_layers(llava) == 2 and _config_layers(qwen) == 8
    assert Backend(llava, load_model=False).resolve_layers("quartiles") == [0, 1, 2]
    assert Backend(qwen, load_model=False).resolve_layers("quartiles") == [0, 2, 4, 6, 8]
    with pytest.raises(LvlmlpError, match=r"^--layers: unknown layer set 'halves'; give integers such as 8,16,-1 "
                                          r"or quartiles$"):
        Backend(llava, load_model=False).resolve_layers("halves")


def test_extract_layers_quartiles_equals_plain_transformers(tiny_ckpt, tmp_path: Path) -> None:
    """`extract --layers quartiles` on an 8-layer Qwen2.5-VL stores layers [0, 2, 4, 6, 8]: the hidden states at the
    last prompt position of a plain transformers forward, row by row (tolerance 1e-4: batch of 3 vs one row)."""
    qwen = _deeper(tiny_ckpt("qwen2_5_vl"), tmp_path / "qwen8", 8)
    manifest = tiny_manifest(tmp_path / "data")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:3]
    data = manifest.parent / "three.jsonl"  # image paths are relative to the manifest
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["extract", "--model", str(qwen), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--layers", "quartiles",
                 "--no-progress"]) == 0
    run = open_run(out)
    assert run.manifest["layers"] == [0, 2, 4, 6, 8]
    backend = Backend(qwen, device="cpu", dtype="float32")
    for i, row in enumerate(rows):
        from PIL import Image

        batch = backend.encode([Image.open(manifest.parent / row["image"]).convert("RGB")], [row["question"]])
        with torch.inference_mode():
            states = backend.model(**batch, output_hidden_states=True, return_dict=True).hidden_states
        for layer in (0, 2, 4, 6):  # 8: the last state, after the final norm (as `hidden`)
            np.testing.assert_allclose(run.layer(layer)[i], states[layer][0, -1].numpy(), atol=1e-4, rtol=0)
    # a re-run with the same spelling is recognised as finished (resolved from the config, no weights loaded)
    assert main(["extract", "--model", str(qwen), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--layers", "quartiles",
                 "--no-progress"]) == 0


def test_config_key(tmp_path: Path) -> None:
    base = {"model": "m", "data_root": "d.jsonl", "out": "o", "task": "jsonl"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, "extract": {"layers": "quartiles"}}))
    assert load_config(path).extract.layers == "quartiles"
    path.write_text(yaml.safe_dump({**base, "extract": {"layers": "halves"}}))
    with pytest.raises(LvlmlpError, match=r"^config: extract.layers: expected one of quartiles, got 'halves'$"):
        load_config(path)
    path.write_text(yaml.safe_dump({**base, "extract": {"layers": 5}}))
    with pytest.raises(LvlmlpError, match=r"^config: extract.layers: expected a list of integers or one of "
                                          r"quartiles, got 5$"):
        load_config(path)


def test_cli_refuses_an_unknown_layer_set(tmp_path: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path / "data")
    assert main(["extract", "--model", str(tmp_path / "no-model"), "--data", str(manifest), "--out",
                 str(tmp_path / "o"), "--layers", "8,x"]) == 2
    assert "--layers: expected comma-separated integers such as 8,16,-1 or quartiles, got '8,x'" in \
        capsys.readouterr().err
