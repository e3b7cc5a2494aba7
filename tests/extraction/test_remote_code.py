"""--trust-remote-code: a checkpoint whose model code ships with its weights (its config's `auto_map`) is refused with
a one-line error naming the flag, and runs with it, recorded in the run's manifest, whether its code registers
AutoModelForImageTextToText or only AutoModelForCausalLM. The checkpoints are built here: a tiny LLaVA's weights under
a model class of its own, in a modeling file saved beside them."""

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


class {prefix}Config(LlavaConfig):
    model_type = "{model_type}"


class {prefix}ForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = {prefix}Config
'''


def remote_checkpoint(base: Path, root: Path, module_name: str, model_type: str, auto_class: str) -> Path:
    """The tiny LLaVA `base`'s weights under a class of a modeling file of its own (`module_name`.py, saved beside
    them), of model type `model_type`, registered in config.json's auto_map for `auto_class` only."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    prefix = "".join(part.title() for part in model_type.split("_"))
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module_name}.py").write_text(MODELING.format(prefix=prefix, model_type=model_type))
    spec = importlib.util.spec_from_file_location(module_name, root / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # save_pretrained copies the file of the class's module
    try:
        spec.loader.exec_module(module)
        config_cls, model_cls = getattr(module, f"{prefix}Config"), getattr(module, f"{prefix}ForConditionalGeneration")
        # Registered classes are saved with an auto_map pointing at their file, which is copied beside the weights.
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class(auto_class)
        llava = LlavaForConditionalGeneration.from_pretrained(base)
        model = model_cls(config_cls(**llava.config.to_dict()))
        model.load_state_dict(llava.state_dict())
        model.generation_config = llava.generation_config
        out = root / f"ckpt-{module_name}"  # transformers caches a folder's code under the folder's name
        model.save_pretrained(out)
        AutoProcessor.from_pretrained(base).save_pretrained(out)
    finally:
        del sys.modules[module_name]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and sorted(config["auto_map"]) == ["AutoConfig", auto_class]
    assert (out / f"{module_name}.py").is_file()
    return out


@pytest.fixture(scope="module")
def remote(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny LLaVA, the same weights as a remote-code checkpoint registering AutoModelForImageTextToText)."""
    base = tiny_ckpt("llava")
    root = tmp_path_factory.mktemp("remote")
    return base, remote_checkpoint(base, root, "tiny_remote", "tiny_remote", "AutoModelForImageTextToText")


@pytest.fixture(scope="module")
def remote_lm(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny LLaVA, the same weights under a model type whose own code registers AutoModelForCausalLM only, as
    Molmo's, Phi-4-multimodal's and mPLUG-Owl's ports do)."""
    base = tiny_ckpt("llava")
    root = tmp_path_factory.mktemp("remote_lm")
    return base, remote_checkpoint(base, root, "tiny_remote_lm", "tiny_remote_lm", "AutoModelForCausalLM")


def test_refused_without_the_flag_naming_it(remote, tmp_path, capsys) -> None:
    _, ckpt = remote
    message = (f"{ckpt}: the checkpoint ships its own model code; pass --trust-remote-code (a run config: "
               "trust_remote_code: true) to run it (that code then runs with your rights: read it first)")
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


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModel"])
def test_own_code_registering_only_another_auto_class_loads_through_it(remote_lm, tiny_ckpt, tmp_path, capsys,
                                                                        auto_class) -> None:
    """A checkpoint whose code registers AutoModelForCausalLM (Molmo, Phi-4-multimodal) or AutoModel (MiniCPM-V)
    only, no AutoModelForImageTextToText: refused without the flag naming it; with it, loaded through the class
    auto_map names, extraction equal to the same weights under the built-in LLaVA class, the flag and the Auto class
    in the manifest."""
    if auto_class == "AutoModelForCausalLM":
        base, ckpt = remote_lm
    else:
        base = tiny_ckpt("llava")
        ckpt = remote_checkpoint(base, tmp_path / "own", "tiny_remote_lm", "tiny_remote_lm", auto_class)
    manifest = tiny_manifest(tmp_path / "data", n_train=6, n_test=0)
    common = ["--data", str(manifest), "--batch-size", "4", "--device", "cpu", "--store-dtype", "float32",
              "--max-new-tokens", "3", "--hidden", "--no-progress"]
    capsys.readouterr()
    assert main(["extract", "--model", str(ckpt), "--out", str(tmp_path / "refused"), *common]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lvlmlp: error: {ckpt}: the checkpoint ships its own model code; pass --trust-remote-code (a run config: "
        "trust_remote_code: true) to run it (that code then runs with your rights: read it first)")
    assert not (tmp_path / "refused").exists()
    backend = Backend(ckpt, device="cpu", dtype="float32", trust_remote_code=True)
    assert backend.auto_class == auto_class
    # transformers built the checkpoint's own class (from its file, through the Auto class), not LLaVA's
    assert type(backend.model).__name__ == "TinyRemoteLmForConditionalGeneration"
    assert type(backend.model).__module__.endswith("tiny_remote_lm")
    assert main(["extract", "--model", str(ckpt), "--trust-remote-code", "--out", str(tmp_path / "remote"),
                 *common]) == 0
    assert main(["extract", "--model", str(base), "--out", str(tmp_path / "native"), *common]) == 0
    remote_run, native = open_run(tmp_path / "remote"), open_run(tmp_path / "native")
    assert remote_run.manifest["trust_remote_code"] is True
    assert remote_run.manifest["auto_class"] == auto_class
    assert remote_run.manifest["family"] == "tiny_remote_lm" and native.manifest["family"] == "llava"
    assert "auto_class" not in native.manifest
    for t in range(3):
        np.testing.assert_allclose(remote_run.logits(t), native.logits(t), atol=1e-5, rtol=0)
    np.testing.assert_allclose(remote_run.hidden(), native.hidden(), atol=1e-5, rtol=0)
    assert remote_run.responses == native.responses and list(remote_run.n_tokens) == list(native.n_tokens)


def test_run_config_trust_remote_code(remote_lm, tmp_path, capsys) -> None:
    """`lvlmlp run`'s `trust_remote_code: true` loads the checkpoint as the flag does (its runs equal the built-in
    class's extraction, the manifest says so); without it the run stops naming the key, before any folder."""
    base, ckpt = remote_lm
    manifest = tiny_manifest(tmp_path / "data", n_train=6, n_test=4)
    config = tmp_path / "remote.yaml"
    config.write_text(json.dumps({"model": str(ckpt), "data_root": str(manifest), "device": "cpu", "dtype": "float32",
                                  "splits": {"train": "train", "test": "test"}, "n_boot": 0,
                                  "extract": {"store_dtype": "float32"}}))
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "refused"), "--no-progress"]) == 2
    assert "pass --trust-remote-code (a run config: trust_remote_code: true)" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "runs").exists()
    assert main(["run", str(config), "--set", "trust_remote_code=true", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert main(["extract", "--model", str(base), "--data", str(manifest), "--split", "test", "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--out", str(tmp_path / "native"),
                 "--no-progress"]) == 0
    run, native = open_run(tmp_path / "out" / "runs" / "default-test"), open_run(tmp_path / "native")
    assert run.manifest["trust_remote_code"] is True and run.manifest["auto_class"] == "AutoModelForCausalLM"
    assert run.ids == native.ids
    np.testing.assert_allclose(run.logits(0), native.logits(0), atol=1e-5, rtol=0)


def test_own_code_without_a_loadable_model_class_is_refused(remote, tmp_path) -> None:
    import shutil

    _, ckpt = remote
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    config = json.loads((other / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": config["auto_map"]["AutoConfig"],
                          "AutoModelForSequenceClassification": "tiny_remote.TinyRemoteForConditionalGeneration"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(LvlmlpError) as err:
        Backend(other, device="cpu", trust_remote_code=True)
    assert str(err.value) == (f"{other}: its own code registers no model class lvlmlp can load (only AutoConfig, "
                              "AutoModelForSequenceClassification; lvlmlp loads AutoModelForImageTextToText, "
                              "AutoModelForCausalLM, AutoModel)")
