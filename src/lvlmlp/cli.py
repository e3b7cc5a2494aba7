"""Command line: `lvlmlp SUBCOMMAND ...`. Each stage module registers its own subcommands with `register_cli`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from lvlmlp import __version__
from lvlmlp.commands import COMMANDS
from lvlmlp.errors import LvlmlpError

# Modules that define `register_cli(subparsers)`; the order is the order of `lvlmlp --help`.
COMMAND_MODULES = [
    "lvlmlp.extract",
    "lvlmlp.demo",
    "lvlmlp.tasks",
    "lvlmlp.evaluate",
    "lvlmlp.steering",
    "lvlmlp.testing",
    "lvlmlp.experiment",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lvlmlp", description="First-token probing of vision-language models.")
    parser.add_argument("--version", action="version", version=f"lvlmlp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    for name in COMMANDS:  # lvlmlp/commands/<name>.py: the new home of every command (issue 13)
        importlib.import_module(f"lvlmlp.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="lvlmlp: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args) or 0)
    except LvlmlpError as err:
        # One line on stderr, naming the file, row id or option at fault (contract section 3).
        print(f"lvlmlp: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lvlmlp: interrupted; what was committed is kept, the same command resumes from there", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
