"""Declared ranges of numeric options and config keys, checked once where the value enters (a flag's `type`, a
config key's metadata), with a one-line error naming the option and the allowed range, before anything loads.

Standard library only: the command modules use these as argparse types while the parser is built."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from lvlmlp.errors import LvlmlpError


@dataclass(frozen=True)
class Range:
    """An integer or a finite number within [lo, hi] (an end excluded when `lo_open`/`hi_open`; None: unbounded)."""

    kind: type = int
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def __name__(self) -> str:  # argparse names a type in its messages
        return "integer" if self.kind is int else "number"

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return (f"{what} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        return what

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def check(self, value: Any, name: str) -> Any:
        """`value`, or a one-line error: "NAME: must be <range>, got VALUE"."""
        if value is not None and not self.ok(value):
            raise LvlmlpError(f"{name}: must be {self.describe()}, got {value!r}")
        return value

    def __call__(self, text: str) -> Any:
        """argparse `type=`: the flag's text as a number in range (argparse names the flag in the message)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


COUNT = Range(int, 1)  # a number of things that must exist: rows per batch, epochs, resamples > 0 ...
NONNEG = Range(int, 0)  # 0 allowed: a seed, a token index, 0 bootstrap resamples (no intervals)
POSITIVE = Range(float, 0, lo_open=True)  # learning rates, regularisation strengths
NONNEG_FLOAT = Range(float, 0)
PROBABILITY = Range(float, 0, 1)  # thresholds on P(label 1)

# The probes' hyper-parameters (lvlmlp.probing.probes), shared by `probe train`'s flags and `lvlmlp run`'s
# `probe:` section, so that `--C -1` and `--set probe.C=-1` give the same message.
PROBE_PARAMS: dict[str, Range] = {
    "C": POSITIVE,
    "max_iter": COUNT,
    "epochs": COUNT,
    "batch_size": COUNT,
    "lr": POSITIVE,
    "weight_decay": NONNEG_FLOAT,
    "seed": NONNEG,
    "threshold": PROBABILITY,
    "tol": POSITIVE,
}


def check_probe_params(params: dict[str, Any], prefix: str) -> None:
    """Every numeric hyper-parameter in its range (`prefix`: "config: probe." or "--")."""
    for key, value in params.items():
        rng = PROBE_PARAMS.get(key)
        if rng is not None:
            rng.check(value, f"{prefix}{key}")
