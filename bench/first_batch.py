"""Run `lvlmlp ARGS...` and write, as JSON to the file named by $LVLMLP_PHASES, the seconds since this process
started at which each start-up phase ended: imports, config, processor, weights hash, the first batch prepared and
the data-loader worker forked, model weights, run folder, the first batch's forward. Used by `bench/startup.py
--first-batch`; it wraps functions without changing what they do.

    LVLMLP_PHASES=phases.json python bench/first_batch.py extract --model M --data D --out O
"""

from __future__ import annotations

import json
import os
import sys


def process_age() -> float:
    """Seconds since this process was started (by the kernel's clock: the interpreter's start-up counted)."""
    with open("/proc/self/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as f:
        return float(f.read().split()[0]) - started


marks: dict[str, float] = {}


def mark(name: str) -> None:
    marks.setdefault(name, round(process_age(), 3))  # the first time only


def after(owner: object, attr: str, name: str) -> None:
    """Mark `name` when `owner.attr` first returns."""
    func = getattr(owner, attr)

    def wrapped(*args: object, **kwargs: object) -> object:
        result = func(*args, **kwargs)
        mark(name)
        return result

    setattr(owner, attr, wrapped)


def main() -> None:
    mark("python")
    import lvlmlp.cli

    mark("cli")
    from lvlmlp.extraction import backend, extract, loader, store

    mark("import torch + lvlmlp.extraction")
    import transformers  # the package only (lazy): the backend imports its Auto classes, timed there

    def wrap_loaders() -> None:
        """Mark when the processor and the model weights have loaded (wrapped once the backend imported them)."""
        for cls, label in ((transformers.AutoProcessor, "processor"),
                           (transformers.AutoModelForImageTextToText, "model weights")):
            func = cls.from_pretrained.__func__

            def loaded(klass: type, *args: object, _func=func, _label=label, **kwargs: object) -> object:
                result = _func(klass, *args, **kwargs)
                mark(_label)
                return result

            cls.from_pretrained = classmethod(loaded)

    config = backend.load_model_config

    def config_loaded(*args: object, **kwargs: object) -> object:
        # Called by `Backend` right after it imported transformers' Auto classes (with its collector paused).
        if "import transformers' Auto classes" not in marks:
            mark("import transformers' Auto classes")
            wrap_loaders()
        result = config(*args, **kwargs)
        mark("config")
        return result

    backend.load_model_config = config_loaded
    after(backend, "_weights_hash", "weights hash")
    after(backend.Backend, "__init__", "Backend (config, processor, hash)")  # the weights load in extract
    after(loader.Started, "__init__", "first batch prepared, worker forked")  # before the weights load
    after(store.RunWriter, "__init__", "run folder opened")
    after(backend.Backend, "prefill", "first batch's forward")
    del extract
    try:
        code = lvlmlp.cli.main(sys.argv[1:])
    finally:
        mark("exit")
        with open(os.environ["LVLMLP_PHASES"], "w") as f:
            json.dump(marks, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
