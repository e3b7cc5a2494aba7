"""Feature views of a run: what a probe sees (raw logits, log-probabilities, probabilities, hidden states, and the
first K tokens' raw logits side by side: `multi-token`, the input of MTRE, see docs/signals.md).

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
    tokens: int | None = None  # `multi-token`: how many generated tokens (K)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["tokens"] is None:  # the other kinds' specs stay as they were written before `tokens` existed
            del out["tokens"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        where = f"layer {self.layer}" if self.kind == "layer" else f"token {self.token}"
        if self.kind == MULTI_TOKEN:
            where = f"tokens 0..{(self.tokens or 1) - 1}"
        return f"{self.kind} of {where}, dim {self.dim}, model {self.model!r}"

    def mismatches(self, other: FeatureSpec) -> list[str]:
        """Fields in which `other` differs from this spec (an unknown value on either side is no mismatch)."""
        out = []
        for name in ("kind", "token", "layer", "dim", "model", "tokens"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if name in ("dim", "model") and (mine is None or theirs is None):
                continue
            if mine != theirs:
                out.append(f"{name} {theirs!r} (probe expects {mine!r})")
        return out


MULTI_TOKEN = "multi-token"


def _check_kind(kind: str, layer: int | None, tokens: int | None = None) -> None:
    if kind not in FEATURE_KINDS:
        raise LvlmlpError(f"--feature {kind!r}: unknown feature kind (choose from {', '.join(FEATURE_KINDS)})")
    if kind == "layer" and layer is None:
        raise LvlmlpError("--feature layer needs --layer L")
    if kind == MULTI_TOKEN and (tokens is None or tokens < 1):
        raise LvlmlpError(f"--feature multi-token needs --tokens K (1 or more), got {tokens}")
    if kind != MULTI_TOKEN and tokens is not None:
        raise LvlmlpError(f"--tokens applies to --feature multi-token only (not --feature {kind})")


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

    def __init__(self, run: Any, kind: str = "logits", token: int = 0, layer: int | None = None,
                 tokens: int | None = None) -> None:
        _check_kind(kind, layer, tokens)
        self.run, self.kind, self.token, self.layer, self.tokens = run, kind, int(token), layer, tokens
        if kind == MULTI_TOKEN:
            self._multi: MultiTokenLogits | None = MultiTokenLogits(run, int(tokens))  # type: ignore[arg-type]
            self._source = self._multi
            self._n_tokens = None
            return
        self._multi = None
        if kind in ("logits", "log_softmax", "softmax"):
            self._source = run.logits(self.token)
        elif kind == "hidden":
            self._source = run.hidden()
        elif kind == "vision":  # the mean-pooled vision features the projector reads (`extract --vision`)
            self._source = run.vision()
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
            tokens=self.tokens,
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
        if self._multi is not None:
            return self._multi[idx]
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
    """Boolean mask of rows that have features of that kind (logits of token t exist when n_tokens > t;
    `multi-token` needs one generated token at least: the tokens a row did not generate are zeros)."""
    if kind == MULTI_TOKEN:
        return np.asarray(run.n_tokens) > 0
    if kind in ("logits", "log_softmax", "softmax"):
        return np.asarray(run.n_tokens) > token
    return np.ones(len(run), dtype=bool)


def feature_matrix(
    run: Any, kind: str = "logits", token: int = 0, layer: int | None = None, rows: Any = None,
    tokens: int | None = None,
) -> np.ndarray:
    """(n, D) float32 features of `rows` (all rows by default), converted chunk by chunk.

    Raises LvlmlpError naming the row for NaN/inf features, and for logits of a token a row never generated.
    """
    view = FeatureView(run, kind=kind, token=token, layer=layer, tokens=tokens)
    idx = as_index(rows, len(view))
    out = np.empty((idx.size, view.shape[1]), dtype=np.float32)
    for start in range(0, idx.size, _CHUNK):
        out[start : start + _CHUNK] = view[idx[start : start + _CHUNK]]
    return out


class MultiTokenLogits:
    """`multi-token` features: the raw logits of generated tokens 0..K-1 side by side, (N, K * V) float32, token k in
    columns k*V .. (k+1)*V - 1. This is MTRE's input (lanl/MTRE stores each row's first ten tokens' logits as a
    (10, V) array whose tokens past the end of the answer are zero vectors, and its classifier skips zero vectors):
    a row that generated fewer than K tokens keeps its tokens and gets zeros for the others (`short_rows` counts
    such rows); a row without any generated token has no features (`valid_rows` leaves it out, and reading it is an
    error naming it)."""

    def __init__(self, run: Any, tokens: int) -> None:
        stored = int(run.n_logit_tokens)
        if tokens > stored:
            raise LvlmlpError(f"--tokens {tokens}: {run.path} keeps the logits of {stored} generated token(s); "
                              f"extract with --max-new-tokens {tokens} or more")
        self.run, self.tokens = run, tokens
        self.sources = [run.logits(t) for t in range(tokens)]
        self.vocab = int(self.sources[0].shape[1])
        self.n_tokens = np.asarray(run.n_tokens)
        self.shape = (int(self.sources[0].shape[0]), tokens * self.vocab)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        empty = idx[self.n_tokens[idx] < 1]
        if empty.size:
            raise LvlmlpError(f"row {self.run.ids[int(empty[0])]!r}: generated no token, so it has no multi-token "
                              "features; select rows with n_tokens > 0")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        block = np.zeros((idx.size, self.shape[1]), dtype=np.float32)
        for t, source in enumerate(self.sources):
            has = self.n_tokens[sorted_idx] > t  # tokens past the end of the answer stay zero, whatever is stored
            cols = slice(t * self.vocab, (t + 1) * self.vocab)
            part = np.zeros((idx.size, self.vocab), dtype=np.float32)
            part[has] = source[sorted_idx[has]]
            block[order, cols] = part
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = int(idx[np.argmax(bad)])
            raise LvlmlpError(f"{self.run.path}: row {self.run.ids[row]!r} has NaN or infinite multi-token features")
        return block


def short_rows(run: Any, idx: np.ndarray, tokens: int) -> int:
    """How many of rows `idx` generated fewer than `tokens` tokens (but at least one): their missing tokens are
    zeros in the `multi-token` features."""
    n = np.asarray(run.n_tokens)[np.asarray(idx, dtype=np.int64)]
    return int(np.sum((n > 0) & (n < tokens)))
