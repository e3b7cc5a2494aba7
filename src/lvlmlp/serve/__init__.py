"""`lvlmlp serve`: an OpenAI-compatible chat-completions server guarded by a first-token probe.

`load_engine` loads the model (`Backend`, or a protocol backend) and the probe into a `ProbeGuard`, checked as `lvlmlp generate` checks
them; `create_app(engine, ServeConfig(...))` is the FastAPI application (run it with uvicorn). Modules: `schema`
(the request and its image), `batcher` (batched guarded generation in one worker thread), `app` (HTTP, metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lvlmlp.serve.app import ServeConfig, create_app
from lvlmlp.serve.batcher import Engine, Job, Result
from lvlmlp.serve.schema import ApiError, Limits

__all__ = ["ApiError", "Engine", "Job", "Limits", "Result", "ServeConfig", "create_app", "load_engine"]


def load_engine(model: str | Path, probe: str | Path, *, template: str | None = None,
                answers: Mapping[int, str] | None = None, threshold: float | None = None, device: str = "auto",
                dtype: str = "auto", prompt_template: str | None = None, raw_prompt: bool = False,
                system_prompt: str | None = None, allow_other_model: bool = False,
                trust_remote_code: bool = False, backend: str | None = None) -> Engine:
    """The backend and the guard, refused at start-up (not at the first request) when the probe does not fit.
    `backend`: "module:Class" of a protocol backend (docs/backends.md), built by the same `BackendSpec`."""
    from lvlmlp.extraction.protocol import check_guidable
    from lvlmlp.extraction.spec import BackendSpec
    from lvlmlp.probing.probes import load_probe
    from lvlmlp.steering.guard import make_guard

    fitted = load_probe(probe)
    loaded = BackendSpec(model, device=device, dtype=dtype, prompt_template=prompt_template, raw_prompt=raw_prompt,
                         system_prompt=system_prompt, trust_remote_code=trust_remote_code, backend=backend).build()
    check_guidable(loaded)
    return Engine(loaded, make_guard(fitted, loaded, template, answers, threshold, allow_other_model))
