"""Feature views of a run: what a probe sees (raw logits, log-probabilities, probabilities, hidden states).

A view is lazy: `FeatureView(run, ...)[rows]` reads only those rows from the memory-mapped run arrays, converts
them to float32, applies the transform and checks they are finite. Probes that train in mini-batches index the
view batch by batch, so a run larger than RAM never has to be loaded whole.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy.special import log_softmax

from lvlmlp.defaults import FEATURE_KINDS
from lvlmlp.errors import LvlmlpError

# Rows converted per step by `feature_matrix`: bounds the float32 temporaries of one step to ~ chunk * V * 4 bytes.
_CHUNK = 2048


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a probe was trained on; saved with the probe and checked before it is applied."""

    kind: str = "logits"
    token: int = 0
    layer: int | None = None
    dim: int | None = None
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        where = f"layer {self.layer}" if self.kind == "layer" else f"token {self.token}"
        return f"{self.kind} of {where}, dim {self.dim}, model {self.model!r}"

    def mismatches(self, other: FeatureSpec) -> list[str]:
        """Fields in which `other` differs from this spec (an unknown value on either side is no mismatch)."""
        out = []
        for name in ("kind", "token", "layer", "dim", "model"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name in ("dim", "model") and (mine is None or theirs is None):
                continue
            if mine != theirs:
                out.append(f"{name} {theirs!r} (probe expects {mine!r})")
        return out


def _check_kind(kind: str, layer: int | None) -> None:
    if kind not in FEATURE_KINDS:
        raise LvlmlpError(f"--feature {kind!r}: unknown feature kind (choose from {', '.join(FEATURE_KINDS)})")
    if kind == "layer" and layer is None:
        raise LvlmlpError("--feature layer needs --layer L")


def transform(block: np.ndarray, kind: str) -> np.ndarray:
    """Raw float32 logits -> the feature `kind` (log_softmax / softmax; anything else unchanged). ProbeGuard
    applies the same function inside `generate`, so its scores equal `predict_proba` on a run."""
    if kind == "log_softmax":
        return log_softmax(block, axis=1).astype(np.float32, copy=False)
    if kind == "softmax":
        return np.exp(log_softmax(block, axis=1)).astype(np.float32, copy=False)
    return block


class FeatureView:
    """A lazy (N, D) float32 matrix over a run: `view[rows]` reads, transforms and validates those rows only."""

    def __init__(self, run: Any, kind: str = "logits", token: int = 0, layer: int | None = None) -> None:
        _check_kind(kind, layer)
        self.run, self.kind, self.token, self.layer = run, kind, int(token), layer
        if kind in ("logits", "log_softmax", "softmax"):
            self._source = run.logits(self.token)
        elif kind == "hidden":
            self._source = run.hidden()
        else:
            self._source = run.layer(int(layer))  # type: ignore[arg-type]
        # Logits rows past a row's last generated token are zero padding, not features.
        self._n_tokens = np.asarray(run.n_tokens) if kind in ("logits", "log_softmax", "softmax") else None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self._source.shape[0]), int(self._source.shape[1]))

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(
            kind=self.kind,
            token=self.token,
            layer=self.layer if self.kind == "layer" else None,
            dim=self.shape[1],
            model=self.run.manifest.get("model"),
        )

    def __getitem__(self, rows: Any) -> np.ndarray:
        idx = as_index(rows, len(self))
        if self._n_tokens is not None:
            padding = idx[self._n_tokens[idx] <= self.token]
            if padding.size:
                raise LvlmlpError(
                    f"row {self.run.ids[int(padding[0])]!r}: has no generated token {self.token} "
                    f"(it stopped after {int(self._n_tokens[padding[0]])}); select rows with n_tokens > {self.token}"
                )
        # Sorted reads walk the memory map forwards; the result is put back in the caller's order.
        order = np.argsort(idx, kind="stable")
        block = np.empty((idx.size, self.shape[1]), dtype=np.float32)
        block[order] = self._source[idx[order]]
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = int(idx[np.argmax(bad)])
            raise LvlmlpError(f"{self.run.path}: row {self.run.ids[row]!r} has NaN or infinite {self.kind} features")
        return transform(block, self.kind)


class RowSubset:
    """Rows `idx` of a matrix-like (array, memmap or FeatureView), itself indexable: lets a mini-batch probe
    train on one split of a run without copying it."""

    def __init__(self, source: Any, idx: np.ndarray) -> None:
        self.source, self.idx = source, np.asarray(idx, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.idx.size), int(self.source.shape[1]))

    def __len__(self) -> int:
        return int(self.idx.size)

    def __getitem__(self, rows: Any) -> np.ndarray:
        return np.asarray(self.source[self.idx[as_index(rows, len(self))]], dtype=np.float32)


def as_index(rows: Any, n: int) -> np.ndarray:
    """Row positions (int64) from None (all), a slice, a boolean mask or integer positions."""
    if rows is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(rows, slice):
        return np.arange(n, dtype=np.int64)[rows]
    arr = np.asarray(rows)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ValueError(f"boolean row mask of shape {arr.shape} for {n} rows")
        return np.flatnonzero(arr)
    return np.atleast_1d(arr.astype(np.int64, copy=False))


def valid_rows(run: Any, kind: str = "logits", token: int = 0) -> np.ndarray:
    """Boolean mask of rows that have features of that kind (logits of token t exist when n_tokens > t)."""
    if kind in ("logits", "log_softmax", "softmax"):
        return np.asarray(run.n_tokens) > token
    return np.ones(len(run), dtype=bool)


def feature_matrix(
    run: Any, kind: str = "logits", token: int = 0, layer: int | None = None, rows: Any = None
) -> np.ndarray:
    """(n, D) float32 features of `rows` (all rows by default), converted chunk by chunk.

    Raises LvlmlpError naming the row for NaN/inf features, and for logits of a token a row never generated.
    """
    view = FeatureView(run, kind=kind, token=token, layer=layer)
    idx = as_index(rows, len(view))
    out = np.empty((idx.size, view.shape[1]), dtype=np.float32)
    for start in range(0, idx.size, _CHUNK):
        out[start : start + _CHUNK] = view[idx[start : start + _CHUNK]]
    return out
