"""`lvlmlp generate` (commands/generate.py): row selection, and options checked like the others: one line
naming the flag, exit 2, before any model is loaded."""

from __future__ import annotations

import pytest

from lvlmlp.cli import main
from tests.commands.conftest import ids_of


def test_generate_reads_the_split_and_refuses_temperature_without_sampling(tiny_ckpt, manifest, probe_dir,
                                                                          tmp_path, capsys):
    ckpt = tiny_ckpt("llava")
    base = ["generate", "--model", str(ckpt), "--data", str(manifest), "--probe", str(probe_dir / "probe"),
            "--template", "Sorry", "--max-new-tokens", "6", "--no-progress"]
    assert main([*base, "--split", "train", "--out", str(tmp_path / "g.jsonl")]) == 0
    assert ids_of(tmp_path / "g.jsonl") == [f"r{i}" for i in range(1, 12, 2)]
    capsys.readouterr()
    assert main([*base, "--temperature", "0.7", "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "--temperature applies to sampling only" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize("value", ["0", "-0.5", "nan", "inf"])
def test_generate_refuses_a_sampling_temperature_that_is_not_positive(tmp_path, capsys, value):
    (tmp_path / "data.jsonl").write_text('{"id": "a", "image": "a.png", "question": "q"}\n')
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--probe", str(tmp_path / "no-probe"), "--data",
            str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out.jsonl"), "--do-sample", "--temperature", value]
    assert main(argv) == 2
    shown = f"{float(value):g}"
    assert capsys.readouterr().err == (f"lvlmlp: error: --temperature must be a number > 0, got {shown} (for greedy "
                                       "decoding, leave out --do-sample)\n")
    assert not (tmp_path / "out.jsonl").exists()
