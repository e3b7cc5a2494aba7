"""Issue 26 item 3: the LLaVA-1.5 configs run the model in float16 as the original did (model/LLaVA.py: LLaVA's
loader in half precision, pixels `.half()`), other configs keep `auto`; the run's manifest records the dtype the
model computed in."""

from __future__ import annotations

from pathlib import Path

import torch

from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import extract
from lvlmlp.study.config import load_config
from lvlmlp.testing import tiny_manifest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_llava15_configs_run_float16_and_the_others_auto(tmp_path):
    dtypes = {p.name: load_config(p, model="m", data_root="d", out=str(tmp_path)).dtype
              for p in sorted(CONFIGS.glob("*_7b.yaml"))}
    llava = {name for name in dtypes if "_llava15_" in name}
    assert len(llava) == 6 and {dtypes[n] for n in llava} == {"float16"}
    assert {dtypes[n] for n in dtypes if n not in llava} == {"auto"}


def test_the_manifest_records_the_compute_dtype(tiny_ckpt, tmp_path):
    from lvlmlp.data import read_manifest

    rows = read_manifest(tiny_manifest(tmp_path / "data", n_train=2, n_test=2))
    backend = Backend(tiny_ckpt("llava"), device="cpu", dtype="float16")
    run = extract(backend, rows, tmp_path / "run", progress=False)
    assert next(backend.model.parameters()).dtype == torch.float16
    assert run.manifest["compute_dtype"] == "float16"
    batch = backend.to_device({"pixel_values": torch.zeros(1, 3, 2, 2)})
    assert batch["pixel_values"].dtype == torch.float16  # pixels in the model's precision, as `.half()` did
