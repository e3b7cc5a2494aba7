"""Shared by the command tests: a 12-row manifest whose splits and classes cross, `lvlmlp extract` on it, and
a probe trained on its run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp.cli import main


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 rows: train/test alternate, labels 0/1 in blocks so that splits and classes cross."""
    root = tmp_path_factory.mktemp("flags")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"img/{i}.png", "question": "what is this?", "label": (i // 2) % 2,
                      "split": "train" if i % 2 else "test"})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def ids_of(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def extract_cli(ckpt: Path, manifest: Path, out: Path, *flags: str) -> int:
    return main(["extract", "--model", str(ckpt), "--data", str(manifest), "--out", str(out), "--workers", "0",
                 "--no-progress", *flags])


@pytest.fixture(scope="module")
def probe_dir(tiny_ckpt, manifest, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    assert extract_cli(tiny_ckpt("llava"), manifest, root / "run") == 0
    assert main(["probe", "train", "--run", str(root / "run"), "--out", str(root / "probe")]) == 0
    return root
