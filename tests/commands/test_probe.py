"""`lvlmlp probe` (commands/probe.py): its flags do what they say or are refused in one line naming the flag
(exit 2)."""

from __future__ import annotations

import json

import pytest

from lvlmlp.cli import main


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--probe", "lda", "--C", "2"], "--C does not apply to --probe lda"),
        (["--probe", "logistic", "--epochs", "3"], "--epochs does not apply to --probe logistic"),
        (["--probe", "lda", "--standardize"], "--standardize does not apply to --probe lda"),
        (["--layer", "1"], "--layer applies to --feature layer only"),
        (["--probe", "svm"], "--probe 'svm': unknown probe (choose from logistic, multinomial, lda, mlp, mtre)"),
    ],
)
def test_probe_train_refuses_hyper_parameters_of_another_probe(probe_dir, tmp_path, capsys, flags, needle):
    assert main(["probe", "train", "--run", str(probe_dir / "run"), "--out", str(tmp_path / "p"), *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_probe_train_hyper_parameters_take_effect(probe_dir, tmp_path):
    assert main(["probe", "train", "--run", str(probe_dir / "run"), "--out", str(tmp_path / "m"), "--probe",
                 "multinomial", "--epochs", "3", "--lr", "0.5", "--threshold", "0.3"]) == 0
    doc = json.loads((tmp_path / "m" / "probe.json").read_text())
    assert doc["params"]["epochs"] == 3 and doc["params"]["lr"] == 0.5 and doc["params"]["threshold"] == 0.3 and "threshold" not in doc
    assert doc["params"]["weight_decay"] == 1e-4  # not given: the probe class's own default
