"""The backend protocol: what lvlmlp needs of a model that transformers' Auto classes do not load (docs/backends.md).

`lvlmlp extract / generate / serve --backend module:Class` (or `path/to/file.py:Class`) and a `lvlmlp run` config's
`backend:` build `Class(model, device=..., dtype=...)` (a `torch.device` and a `torch.dtype`, resolved from
--device/--dtype) through `BackendSpec(model, backend=...).build()` and use it, wrapped in `ProtocolBackend`, where
they would use `Backend`. `examples/minigpt4_backend.py` is a complete implementation.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from lvlmlp.errors import LvlmlpError


@runtime_checkable
class BackendProtocol(Protocol):
    """A loaded model, its tokenizer and its batching, as `lvlmlp.extraction.backend.Backend` provides them."""

    model_id: str  # recorded in the run's manifest
    family: str  # a name for the model's kind (the manifest's `family`)
    weights_hash: str  # changes whenever the weights do (a run resumes only with the same)
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    vocab_size: int  # columns of the logits
    max_length: int | None  # the longest input the model takes, if known
    tokenizer: Any  # `decode(ids, skip_special_tokens=True)`; `eos_token_id`, `pad_token_id`

    def prompt(self, question: str) -> str:
        """The text the model reads for `question` (recorded in the manifest as `prompt("{question}")`)."""

    def collate(self, images: list[Any], questions: list[str]) -> dict[str, torch.Tensor]:
        """One left-padded batch of CPU tensors (data-loader processes run this; NumPy-convertible dtypes)."""

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch on `device`, floating tensors in `dtype`."""

    def prefill(self, batch: dict[str, torch.Tensor], *, hidden: bool = False,
                layers: Sequence[int] = ()) -> dict[str, torch.Tensor]:
        """`logits` (B, V) float32 raw logits of the first generated token; `hidden` (B, H) and `layers`
        (B, len(layers), H) at the last prompt position when asked. Each row as if it were alone."""

    def generate(self, batch: dict[str, torch.Tensor], *, max_new_tokens: int, hidden: bool = False,
                 layers: Sequence[int] = (), logits_processor: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Greedy decoding: `logits` (B, K, V) float32 RAW logits (before `logits_processor`), `sequences` (B, K),
        `n_tokens` (B,) up to and including the end of sequence (pad ids and zero logits after it), `responses`."""


# Optional: `oversized(width, height) -> str | None`, why an image of that size (from its file's header) is refused
# before decoding; without it, images of more than `lvlmlp.data.MAX_PROCESSED_PIXELS` pixels are refused.
REQUIRED = ("model_id", "family", "weights_hash", "revision", "device", "dtype", "vocab_size", "max_length",
            "tokenizer", "prompt", "collate", "to_device", "prefill", "generate")


def _import(module: str, spec: str) -> Any:
    if module.endswith(".py"):  # a file, as users keep their backend next to their data
        path = Path(module)
        if not path.is_file():
            raise LvlmlpError(f"--backend {spec}: no such file {module}")
        found = importlib.util.spec_from_file_location(path.stem, path)
        loaded = importlib.util.module_from_spec(found)
        sys.modules[path.stem] = loaded  # pickling by reference (data-loader workers) finds it again
        found.loader.exec_module(loaded)
        return loaded
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise LvlmlpError(f"--backend {spec}: cannot import {module} ({err})") from None


class ProtocolBackend:
    """A protocol backend as lvlmlp's stages use a `Backend`: every member is the user's object's (`inner`), plus
    what lvlmlp derives from the protocol, so that the protocol stays what docs/backends.md lists."""

    def __init__(self, inner: Any, spec: str) -> None:
        self.inner = inner
        self.protocol_spec = spec  # "module:Class" as given: the run manifest's `backend`

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (copy, unpickling): never look it up in itself
            raise AttributeError(name)
        return getattr(self.inner, name)

    def encode(self, images: list[Any], questions: list[str]) -> dict[str, torch.Tensor]:
        """One batch on the device, as `Backend.encode` (`generate`, guided decoding, `serve`)."""
        return self.to_device(self.collate(images, questions))

    @property
    def pad_id(self) -> int:
        """The id `serve` pads finished rows with: the tokenizer's pad token, else its end of sequence."""
        pad = self.tokenizer.pad_token_id
        return int(self.tokenizer.eos_token_id if pad is None else pad)

    @property
    def eos_ids(self) -> set[int]:
        """Where `serve` ends an answer: the tokenizer's end of sequence (as the protocol's `generate` does)."""
        eos = self.tokenizer.eos_token_id
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}

    def padded_length_error(self, batch: dict[str, torch.Tensor], new_tokens: int) -> None:
        """None: the protocol has no padded limit (each row of a batch gives what it gives alone)."""
        return None

    def model_generate(self, batch: dict[str, torch.Tensor], *, max_new_tokens: int, do_sample: bool = False,
                       pad_token_id: int | None = None, **kwargs: Any) -> Any:
        """`lvlmlp serve`'s decoding, as `Backend.model_generate`: the backend's own `generate`, which is greedy and
        pads by itself (`do_sample` and `pad_token_id` are its), handing the rest (the guard and per-request sampling
        processors, stopping criteria, streamer) to transformers' `generate`; its raw logits are not used."""
        del do_sample, pad_token_id
        return self.generate(batch, max_new_tokens=max_new_tokens, **kwargs)

    def with_prompt_template(self, template: str | None) -> ProtocolBackend:
        """The backend's own prompt is its only one (`lvlmlp run` refuses other prompts before any work)."""
        if template is not None:
            raise LvlmlpError(f"--backend {self.protocol_spec}: the backend renders its own prompts; a prompt "
                              f"template ({template!r}) does not apply")
        return self

    def check_vision(self) -> None:
        raise LvlmlpError(f"--vision: --backend {self.protocol_spec} gives no vision features (the protocol has "
                          "none, docs/backends.md)")


def check_guidable(backend: Any) -> None:
    """Probe-guided decoding (`generate`, `serve`, `lvlmlp run`'s steering) hooks the backend's `model` (the torch
    module whose generating language model the guard watches): refused at start-up without one."""
    if isinstance(backend, ProtocolBackend) and not isinstance(getattr(backend, "model", None), torch.nn.Module):
        raise LvlmlpError(f"--backend {backend.protocol_spec}: guided decoding needs its `model` (the torch module "
                          "whose generating language model the guard watches, docs/backends.md)")


def load_backend(spec: str, model: str, *, device: str, dtype: str) -> ProtocolBackend:
    """`Class(model, device=, dtype=)` for `spec` = "module:Class" or "path/file.py:Class", checked to have every
    attribute of `BackendProtocol`, as a `ProtocolBackend`. Called by `BackendSpec.build` (the one backend
    factory)."""
    from lvlmlp.extraction.backend import resolve_device, resolve_dtype

    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise LvlmlpError(f"--backend: expected module:Class or path/file.py:Class, got {spec!r}")
    cls = getattr(_import(module, spec), name, None)
    if cls is None:
        raise LvlmlpError(f"--backend {spec}: {module} has no {name}")
    resolved = resolve_device(device)
    backend = cls(model, device=resolved, dtype=resolve_dtype(dtype, resolved))
    missing = [attr for attr in REQUIRED if not hasattr(backend, attr)]
    if missing:
        raise LvlmlpError(f"--backend {spec}: {name} lacks {', '.join(missing)} (the protocol: docs/backends.md)")
    return ProtocolBackend(backend, spec)
