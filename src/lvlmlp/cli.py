"""Command line: `lvlmlp COMMAND ...`. Each command is a module of lvlmlp/commands/ listed in `COMMANDS`; building
the parser imports only those light modules (the library is imported when a command runs)."""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from lvlmlp import __version__
from lvlmlp.commands import COMMANDS, _args
from lvlmlp.errors import LvlmlpError


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default: one that does not is given "(default X)" from the flag itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text
                and action.default not in (None, False, [], argparse.SUPPRESS)):
            text += " (default %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with lvlmlp's one-line errors: "lvlmlp: error: --C: must be a finite number > 0, got '-1'" (exit 2),
    the usage left to `--help`. Sub-commands' parsers are of this class too (argparse uses the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # raised, not exited: `main` prints it as every other error (one line, status 2; a Python caller gets 2)
        raise LvlmlpError(f"{message.removeprefix('argument ')} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lvlmlp", description="First-token probing of vision-language models.")
    parser.add_argument("--version", action="version", version=f"lvlmlp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lvlmlp.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except LvlmlpError as err:
        print(f"lvlmlp: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="lvlmlp: %(message)s", stream=sys.stderr
    )
    try:
        with _args.progress_bars_restored():  # --no-progress silences transformers' bars for this command only
            return int(args.func(args) or 0)
    except LvlmlpError as err:
        # One line on stderr, naming the file, row id or option at fault.
        print(f"lvlmlp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lvlmlp: interrupted; what was committed is kept, the same command resumes from there", file=sys.stderr)
        return 130


def console() -> NoReturn:
    """The `lvlmlp` program (and `python -m lvlmlp.cli`): `main` on the command line's arguments, then the exit.

    The exit skips the interpreter's teardown (freeing every object and module of torch and transformers one by one:
    0.4-0.5 s of a 4 s `extract` here), as `os._exit` does, after doing what matters of it: the functions
    registered with `atexit` (logging's flush, temporary folders, data-loader and Ray clean-ups) and flushing
    stdout and stderr. A thread still running (not a daemon) gets the ordinary exit, which waits for it."""
    code = main()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # (runs each once and forgets them: a fall-back `sys.exit` does not repeat them)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stream: the ordinary exit reports it as Python does
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    console()
