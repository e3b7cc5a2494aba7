"""The backend protocol: what lvlmlp needs of a model that transformers' Auto classes do not load (docs/backends.md).

`lvlmlp extract --backend module:Class` (or `path/to/file.py:Class`) builds `Class(model, device=..., dtype=...)`
(a `torch.device` and a `torch.dtype`, resolved from --device/--dtype) and uses it where it would use `Backend`.
`examples/minigpt4_backend.py` is a complete implementation.
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


def load_backend(spec: str, model: str, *, device: str, dtype: str) -> Any:
    """`Class(model, device=, dtype=)` for `spec` = "module:Class" or "path/file.py:Class", checked to have every
    attribute of `BackendProtocol`."""
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
    return backend
