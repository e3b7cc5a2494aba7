"""--trust-remote-code: a checkpoint whose model code ships with its weights (its config's `auto_map`) is refused with
a one-line error naming the flag, and runs with it, recorded in the run's manifest. The checkpoint is built here: a
tiny LLaVA's weights under a model class of its own, in a modeling file saved beside them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.testing import tiny_manifest

# The checkpoint's own code: LLaVA under another model type and class names.
MODELING = '''from transformers import LlavaConfig, LlavaForConditionalGeneration


class TinyRemoteConfig(LlavaConfig):
    model_type = "tiny_remote"


class TinyRemoteForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = TinyRemoteConfig
'''


@pytest.fixture(scope="module")
def remote(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny LLaVA, the same weights as a remote-code checkpoint)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    base = tiny_ckpt("llava")
    root = tmp_path_factory.mktemp("remote")
    (root / "tiny_remote.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("tiny_remote", root / "tiny_remote.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_remote"] = module  # save_pretrained copies the file of the class's module
    try:
        spec.loader.exec_module(module)
        # Registered classes are saved with an auto_map pointing at their file, which is copied beside the weights.
        module.TinyRemoteConfig.register_for_auto_class()
        module.TinyRemoteForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
        llava = LlavaForConditionalGeneration.from_pretrained(base)
        model = module.TinyRemoteForConditionalGeneration(module.TinyRemoteConfig(**llava.config.to_dict()))
        model.load_state_dict(llava.state_dict())
        model.generation_config = llava.generation_config
        out = root / "ckpt"
        model.save_pretrained(out)
        AutoProcessor.from_pretrained(base).save_pretrained(out)
    finally:
        del sys.modules["tiny_remote"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "tiny_remote" and "AutoModelForImageTextToText" in config["auto_map"]
    assert (out / "tiny_remote.py").is_file()
    return base, out


def test_refused_without_the_flag_naming_it(remote, tmp_path, capsys) -> None:
    _, ckpt = remote
    message = (f"{ckpt}: the checkpoint ships its own model code; pass --trust-remote-code to run it (that code then "
               "runs with your rights: read it first)")
    with pytest.raises(LvlmlpError) as err:
        Backend(ckpt, device="cpu")
    assert str(err.value) == message
    manifest = tiny_manifest(tmp_path / "data", n_train=2, n_test=0)
    capsys.readouterr()
    code = main(["extract", "--model", str(ckpt), "--data", str(manifest), "--out", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 2 and capsys.readouterr().err.strip() == f"lvlmlp: error: {message}"
    assert not (tmp_path / "run").exists()


def test_runs_with_the_flag_and_records_it(remote, tmp_path) -> None:
    """The remote class is LLaVA's: with the flag, extraction equals the tiny LLaVA's, and the manifest says so."""
    base, ckpt = remote
    manifest = tiny_manifest(tmp_path / "data", n_train=6, n_test=0)
    common = ["--data", str(manifest), "--batch-size", "3", "--device", "cpu", "--store-dtype", "float32",
              "--max-new-tokens", "2", "--no-progress"]
    assert main(["extract", "--model", str(ckpt), "--trust-remote-code", "--out", str(tmp_path / "remote"),
                 *common]) == 0
    assert main(["extract", "--model", str(base), "--out", str(tmp_path / "native"), *common]) == 0
    remote_run, native = open_run(tmp_path / "remote"), open_run(tmp_path / "native")
    assert remote_run.manifest["trust_remote_code"] is True and remote_run.manifest["family"] == "tiny_remote"
    assert "trust_remote_code" not in native.manifest  # other runs' manifests are as they were
    for t in range(2):
        np.testing.assert_allclose(remote_run.logits(t), native.logits(t), atol=1e-5, rtol=0)
    assert remote_run.responses == native.responses
    # The finished run is recognised again with the flag (the manifest's settings include it).
    assert main(["extract", "--model", str(ckpt), "--trust-remote-code", "--out", str(tmp_path / "remote"),
                 *common]) == 0


def test_own_code_without_an_image_text_to_text_class_is_refused(remote, tmp_path) -> None:
    import shutil

    _, ckpt = remote
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    config = json.loads((other / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": config["auto_map"]["AutoConfig"],
                          "AutoModelForCausalLM": "tiny_remote.TinyRemoteForConditionalGeneration"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(LvlmlpError) as err:
        Backend(other, device="cpu", trust_remote_code=True)
    assert str(err.value) == (f"{other}: its own code registers no AutoModelForImageTextToText class (only "
                              "AutoConfig, AutoModelForCausalLM); lvlmlp loads vision-language models through that "
                              "class")
