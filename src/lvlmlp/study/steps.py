"""Resumable steps of `lvlmlp run` (and the demo): a step whose stamp in `OUT/steps/NAME.json` matches the hash of
its settings is done; `cached` returns an analysis step's stored JSON result or computes and stores it."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lvlmlp.study.config import Section
from lvlmlp.study.layout import RunLayout

log = logging.getLogger("lvlmlp")


def step_key(settings: Any) -> str:
    """The hash a step's stamp holds: its settings (config sections as their dicts, anything else as its str)."""
    def plain(obj: Any) -> Any:
        return obj.to_dict() if isinstance(obj, Section) else str(obj)

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=plain).encode()).hexdigest()[:20]


class Steps:
    """Stamps in OUT/steps/NAME.json: a step whose stamp matches its settings' hash is done."""

    def __init__(self, out: Path) -> None:
        self.dir = RunLayout(out).steps

    def done(self, name: str, key: str) -> bool:
        path = self.dir / f"{name}.json"
        try:  # a damaged stamp (or result, in `cached`) is this folder's own cache: the step runs again
            return path.is_file() and json.loads(path.read_text()).get("key") == key
        except (ValueError, AttributeError):
            log.warning("%s: damaged step stamp; the step runs again", path)
            return False

    def mark(self, name: str, key: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"{name}.json").write_text(json.dumps({"key": key}))


def cached(steps: Steps, name: str, key: str, path: Path, compute: Callable[[], Any]) -> Any:
    """The JSON result of an analysis step, recomputed only when its settings or input runs changed."""
    if steps.done(name, key) and path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("%s: damaged result; the step runs again", path)
    from lvlmlp.outputs import write_text_atomic

    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(result, indent=2))
    steps.mark(name, key)
    return result
