"""`lvlmlp serve` (commands/serve.py): `--port` is checked like the other options: one line, exit 2, before
any model is loaded (the model path here does not exist, so reaching the loader would give another error)."""

from __future__ import annotations

import pytest

from lvlmlp.cli import main


@pytest.mark.parametrize(("flags", "message"), [
    (["--port", "99999"], "--port must be a TCP port, 1 to 65535, got 99999"),
    (["--port", "0"], "--port must be a TCP port, 1 to 65535, got 0"),
    (["--port", "-1"], "--port must be a TCP port, 1 to 65535, got -1"),
])
def test_serve_refuses_a_port_out_of_range(tmp_path, capsys, flags, message):
    argv = ["serve", "--model", str(tmp_path / "no-model"), "--probe", str(tmp_path / "no-probe"), *flags]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"lvlmlp: error: {message}\n"
