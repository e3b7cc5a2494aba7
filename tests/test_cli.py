"""The command line's shape: commands live in lvlmlp/commands/, the parser is built without the heavy libraries,
and no library module imports a command module."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lvlmlp
from lvlmlp.commands import COMMANDS

SRC = Path(lvlmlp.__file__).resolve().parent
HEAVY = ("torch", "transformers", "sklearn", "scipy", "matplotlib")


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_help_of_every_command_leaves_heavy_libraries_unloaded() -> None:
    # `lvlmlp --help` and each `lvlmlp COMMAND --help` (and `probe train/eval --help`) in one fresh interpreter.
    code = f"""
import contextlib, io, json, sys
from lvlmlp.cli import main
out = {{}}
for argv in [["--help"]] + [[c, "--help"] for c in {[c.replace("_", "-") for c in COMMANDS]!r}] + [
        ["probe", "train", "--help"], ["probe", "eval", "--help"], ["probe", "compare", "--help"]]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    out[" ".join(argv)] = buf.getvalue()
out["loaded"] = sorted({{m.split(".")[0] for m in sys.modules}})
print(json.dumps(out))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert not set(HEAVY) & set(out["loaded"]), set(HEAVY) & set(out["loaded"])
    for name in COMMANDS:  # every registered command is listed by `lvlmlp --help` and answers its own --help
        command = name.replace("_", "-")
        assert command in out["--help"]
        assert out[f"{command} --help"].startswith(f"usage: lvlmlp {command}")
    assert "--feature" in out["probe train --help"] and "--baseline" in out["probe eval --help"]


def test_import_cli_loads_neither_torch_nor_transformers() -> None:
    proc = _python("import lvlmlp.cli", "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    # -X importtime writes one line per imported module: "import time: self | cumulative | [indent]name".
    loaded = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "lvlmlp.commands" in loaded and "lvlmlp.cli" in loaded  # the parse is right: our own modules show up
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "transformers")}


def _library_modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        if rel.parts[1] == "commands" or rel.parts[1:] == ("cli",):  # the command line itself
            continue
        names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return names


def test_no_library_module_imports_the_commands() -> None:
    modules = _library_modules()
    assert {"lvlmlp", "lvlmlp.extraction.extract", "lvlmlp.tasks", "lvlmlp.tasks.pope", "lvlmlp.steering.guard"} <= set(modules)
    # Statically: no import of lvlmlp.commands anywhere in a library module, lazy (inside a function) ones included.
    for name in modules:
        path = SRC.parent.joinpath(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(t.startswith("lvlmlp.commands") for t in targets), f"{name} imports {targets}"
    # And at run time: importing every library module afresh leaves lvlmlp.commands unloaded. In this process (a
    # fresh interpreter spent ~9 s of CPU on torch, transformers, peft, Ray... for this): lvlmlp's modules are taken
    # out of sys.modules, imported again, and the originals put back (the tests' objects stay the ones they hold).
    ours = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "lvlmlp" or m.startswith("lvlmlp.")}
    try:
        for name in modules:
            importlib.import_module(name)
        fresh = {m for m in sys.modules if m == "lvlmlp" or m.startswith("lvlmlp.")}
        assert set(modules) <= fresh  # they were imported again, not found in place
        assert not {m for m in fresh if m.startswith("lvlmlp.commands")}, fresh
    finally:
        for m in [m for m in sys.modules if m == "lvlmlp" or m.startswith("lvlmlp.")]:
            del sys.modules[m]
        sys.modules.update(ours)


def _manifest(root: Path, n: int = 4) -> Path:
    from lvlmlp.testing import tiny_manifest

    return tiny_manifest(root, n_train=n, n_test=0)


def test_finished_extraction_recognised_without_loading_the_weights(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForImageTextToText

    from lvlmlp.cli import main

    argv = ["extract", "--model", str(tiny_ckpt("llava")), "--data", str(_manifest(tmp_path)), "--out",
            str(tmp_path / "run"), "--max-new-tokens", "2", "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded for a finished run")

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", no_weights)
    assert main(argv) == 0
    assert capsys.readouterr().out == first  # the same summary line
    # Another setting is not "finished": the model is needed (and here refused by the spy), nothing is reused.
    with pytest.raises(AssertionError, match="weights were loaded"):
        main([*argv[:-3], "--max-new-tokens", "3", "--no-progress"])


def test_no_progress_silences_every_bar_for_that_command_only(tiny_ckpt, tmp_path, capfd):
    """Bars by default (ours and transformers' weight loading); none with --no-progress, on stderr's file
    descriptor (the forked loader worker's included); and transformers' setting given back after the command, so
    that a Python caller of main keeps its bars."""
    from transformers.utils import logging as hf_logging

    from lvlmlp.cli import main

    argv = ["extract", "--model", str(tiny_ckpt("llava")), "--data", str(_manifest(tmp_path)), "--max-new-tokens",
            "2", "--workers", "1"]
    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # whatever the environment says (HF_HUB_DISABLE_PROGRESS_BARS)
    try:
        capfd.readouterr()
        assert main([*argv, "--out", str(tmp_path / "bars")]) == 0
        shown = capfd.readouterr().err
        assert "Loading weights" in shown and "%|" in shown  # bars by default
        assert main([*argv, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
        quiet = capfd.readouterr().err
        assert "%|" not in quiet and "\r" not in quiet, quiet
        assert hf_logging.is_progress_bar_enabled()  # given back
        hf_logging.disable_progress_bar()  # a caller's own choice is kept too
        assert main([*argv, "--out", str(tmp_path / "again"), "--no-progress"]) == 0
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


_EXIT_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from lvlmlp.cli import console

out = Path(sys.argv[1])

class Teardown:  # its __del__ runs only in the interpreter's teardown (a module global's)
    def __del__(self):
        out.joinpath("teardown").write_text("ran")

keep = Teardown()
atexit.register(lambda: out.joinpath("atexit").write_text("ran"))
if sys.argv[2] == "thread":  # a thread still working when the command returns
    threading.Thread(target=lambda: (time.sleep(1), out.joinpath("thread").write_text("done"))).start()
sys.stdout.write("no newline, still buffered")  # written only by the flush before the exit
sys.argv = ["lvlmlp", *sys.argv[3:]]
console()
"""


def _program(out: Path, mode: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, str(out), mode, *argv], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("argv, code, stream, text", [
    (["tasks"], 0, "stdout", "vizwiz"),
    (["extract", "--batch-size", "0"], 2, "stderr", "lvlmlp: error: --batch-size"),
])
def test_the_program_exits_without_the_teardown_after_its_exit_functions_and_flushes(tmp_path, argv, code, stream,
                                                                                      text):
    """`lvlmlp` (`cli.console`) skips the interpreter's teardown (an object's __del__ that only it would run does not
    run), but not what the exit must do: the exit status, every buffered byte of stdout and stderr, and the atexit
    functions (logging's, temporary folders', the data loader's)."""
    res = _program(tmp_path, "-", *argv)
    assert res.returncode == code, res.stderr
    assert res.stdout.startswith("no newline, still buffered")
    assert text in getattr(res, stream)
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()


def test_the_program_waits_for_a_working_thread_with_the_ordinary_exit(tmp_path):
    res = _program(tmp_path, "thread", "tasks")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "teardown").read_text() == "ran"  # the interpreter's own teardown ran
