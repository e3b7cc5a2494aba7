"""The typed experiment config: shipped configs load, defaults come from the dataclasses only, the file, `--set`
and flags fill it through one path, and a new section is one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lvlmlp.errors import LvlmlpError
from lvlmlp.study import config
from lvlmlp.study.config import ExperimentConfig, Section
from lvlmlp.study.experiment import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path, ["data_root=d"], model="m")
    assert isinstance(cfg, ExperimentConfig) and cfg.name and cfg.out
    assert config.build(ExperimentConfig, cfg.to_dict()) == cfg  # the plain form round-trips


def test_defaults_come_from_the_dataclasses(tmp_path: Path):
    path = tmp_path / "minimal.yaml"
    path.write_text("model: m\ndata_root: d\nout: o\n")
    cfg = load_config(path)
    assert cfg == ExperimentConfig(name="minimal", model="m", data_root="d", out="o")
    assert (cfg.batch_size, cfg.n_boot, cfg.extract.store_dtype, cfg.probe.kind) == (8, 1000, "float16", "logistic")
    assert cfg["extract"]["layers"] == [] and dict(cfg.probe) == {"kind": "logistic", "feature": "logits"}


def test_file_set_and_flags_are_one_path(tmp_path: Path):
    base = "model: m\ndata_root: d\nout: o\n"
    (tmp_path / "a.yaml").write_text(base + "batch_size: 4\nextract: {layers: [1, 2]}\nprobe: {kind: lda}\n")
    (tmp_path / "b.yaml").write_text(base)
    from_file = load_config(tmp_path / "a.yaml")
    from_set = load_config(tmp_path / "b.yaml", ["batch_size=4", "extract.layers=[1, 2]", "probe.kind=lda"])
    from_flags = load_config(tmp_path / "b.yaml", ["extract.layers=[1, 2]", "probe.kind=lda"], batch_size=4)
    assert from_file.to_dict() | {"name": "b"} == from_set.to_dict() == from_flags.to_dict()
    # a later layer wins key by key, the rest of a section is kept
    cfg = load_config(tmp_path / "a.yaml", ["extract.hidden=true"], batch_size=2)
    assert (cfg.batch_size, cfg.extract.hidden, cfg.extract.layers) == (2, True, [1, 2])
    with pytest.raises(LvlmlpError, match="config: batch_size: must be an integer >= 1, got 0"):
        load_config(tmp_path / "b.yaml", batch_size=0)  # a flag is checked like the file


def test_open_probe_section_keeps_its_parameters_and_checks_them(tmp_path: Path):
    (tmp_path / "c.yaml").write_text("model: m\ndata_root: d\nout: o\nprobe: {kind: logistic, C: 0.5}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.probe.params == {"C": 0.5} and cfg.probe["C"] == 0.5 and cfg.probe.to_dict()["C"] == 0.5
    with pytest.raises(LvlmlpError, match="probe.shrinkage: not a parameter of the logistic probe"):
        load_config(tmp_path / "c.yaml", ["probe.shrinkage=auto"])


@dataclass
class FinetuneConfig(Section):
    epochs: int = field(default=1, metadata={"min": 1})
    lr: float = 1e-4


@dataclass
class Extended(ExperimentConfig):
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def test_a_new_section_is_one_dataclass():
    cfg = config.build(Extended, {"finetune": {"lr": 1}})
    assert cfg.finetune == FinetuneConfig(epochs=1, lr=1) and cfg.batch_size == 8
    with pytest.raises(LvlmlpError, match="config: finetune.epochs: must be an integer >= 1, got 0"):
        config.build(Extended, {"finetune": {"epochs": 0}})
    with pytest.raises(LvlmlpError, match=r"config: finetune.lr: expected a number, got 'fast'"):
        config.build(Extended, {"finetune": {"lr": "fast"}})
    with pytest.raises(LvlmlpError, match=r"unknown key finetune.'epoch'"):
        config.build(Extended, {"finetune": {"epoch": 2}})


def test_steering_section_and_analyses_n_boot(tmp_path: Path):
    """`steering:` (probe-guided decoding) needs a template, generated answers and a train/test split;
    `analyses.n_boot` sets the analyses' resamples apart from the main intervals'."""
    (tmp_path / "s.yaml").write_text("model: m\ndata_root: d\nout: o\nextract: {max_new_tokens: 4}\n"
                                     "steering: {template: 'Sorry.'}\nanalyses: {n_boot: 200}\n")
    cfg = load_config(tmp_path / "s.yaml")
    # threshold None: the probe's own (probe.json), one threshold for evaluation and steering
    assert (cfg.steering.template, cfg.steering.threshold, cfg.analyses.n_boot, cfg.n_boot) == ("Sorry.", None, 200, 1000)
    assert config.build(ExperimentConfig, cfg.to_dict()) == cfg
    assert load_config(tmp_path / "s.yaml", ["steering=null"]).steering is None
    with pytest.raises(LvlmlpError, match="config: steering.template is required"):
        load_config(tmp_path / "s.yaml", ["steering.template=null"])
    with pytest.raises(LvlmlpError, match=r"config: steering needs extract.max_new_tokens >= 1"):
        load_config(tmp_path / "s.yaml", ["extract.max_new_tokens=0"])
    with pytest.raises(LvlmlpError, match=r"config: steering needs .* splits \{train, test\}"):
        load_config(tmp_path / "s.yaml", ["splits.cv=5"])
    with pytest.raises(LvlmlpError, match=r"config: steering.threshold: expected a number, got 'high'"):
        load_config(tmp_path / "s.yaml", ["steering.threshold=high"])
    with pytest.raises(LvlmlpError, match=r"config: analyses.n_boot: must be an integer >= 0, got -1"):
        load_config(tmp_path / "s.yaml", ["analyses.n_boot=-1"])
