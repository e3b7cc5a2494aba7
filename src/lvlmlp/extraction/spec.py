"""Which model to load and how to prompt it, defined once: `lvlmlp extract`, `generate`, `finetune` and `serve`, a
`lvlmlp run` config, Ray replicas and the finetuning comparison all build one `BackendSpec` and load it with
`build()`: a `Backend`, or with `backend` a protocol backend (`protocol.load_backend`). No torch here: a command
builds the spec before deciding whether the weights load at all."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lvlmlp.errors import LvlmlpError

if TYPE_CHECKING:
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.protocol import ProtocolBackend


@dataclass(frozen=True)
class BackendSpec:
    """The `Backend` arguments. `prompt_template` is the one thing that varies between the prompts of one loaded
    model (`Backend.with_prompt_template`); everything else is the loaded model's."""

    model: str
    device: str = "auto"
    dtype: str = "auto"
    prompt_template: str | None = None  # "{question}" stands for the row's question; None: the question alone
    raw_prompt: bool = False  # the template is the whole prompt (no chat template around it)
    system_prompt: str | None = None  # a system turn before the user's; None: the chat template's own default
    trust_remote_code: bool = False  # run the checkpoint's own Python code (its config's auto_map)
    # "module:Class" or "path/file.py:Class": a model outside the Auto classes, written to the backend protocol
    # (extraction/protocol.py, docs/backends.md); it renders its own prompts and loads its own model
    backend: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))  # a Path is accepted; the manifest records a string
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise LvlmlpError(f"--prompt-template: {self.prompt_template!r} has no {{question}} placeholder")
        if self.backend is not None:  # the commands and the run config refuse these by their own names first
            given = [name for name in ("prompt_template", "raw_prompt", "system_prompt", "trust_remote_code")
                     if getattr(self, name) not in (None, False)]
            if given:
                raise LvlmlpError(f"--backend {self.backend}: the backend renders its own prompts and loads its own "
                                  f"model, so it takes no {', '.join(given)}")

    @classmethod
    def of(cls, spec: BackendSpec | Mapping[str, Any]) -> BackendSpec:
        """A spec, or a mapping of its fields (Ray's `model` argument as it was: {"model": ..., "device": ...})."""
        return spec if isinstance(spec, BackendSpec) else cls(**spec)

    def replace(self, **changes: Any) -> BackendSpec:
        return dataclasses.replace(self, **changes)

    def loads_as(self, other: BackendSpec) -> bool:
        """Whether one loaded model serves both specs (they differ at most in the prompt template)."""
        return self.replace(prompt_template=None) == other.replace(prompt_template=None)

    def build(self, load_model: bool = True) -> Backend | ProtocolBackend:
        """The backend (`load_model=False`: config, processor, prompt and weights hash only; a protocol backend
        has no such light load and always loads its model)."""
        if self.backend is not None:
            from lvlmlp.extraction.protocol import load_backend

            return load_backend(self.backend, self.model, device=self.device, dtype=self.dtype)
        from lvlmlp.extraction.backend import Backend

        return Backend(self.model, device=self.device, dtype=self.dtype,
                       prompt_template=self.prompt_template, raw_prompt=self.raw_prompt, load_model=load_model,
                       system_prompt=self.system_prompt, trust_remote_code=self.trust_remote_code)
