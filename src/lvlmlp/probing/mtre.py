"""MTRE's multi-token aggregation (Zollicoffer, Vu & Bhattarai, arXiv 2505.11741; code lanl/MTRE), the part of
`probes.MTREProbe` that handles tokens: MTRE trains ONE per-token classifier on every generated token of the train
rows (each token labelled with its row's label; the zero vectors of tokens a row did not generate are left out:
`train_model`'s `filter_non_zero`), and scores a row by the sum over its generated tokens of that classifier's
log-odds, log p - log(1 - p) (`eval_model`'s `forward_with_mask`: a multi-token log-likelihood ratio).

The input is the `multi-token` feature view: (n, K * V), token k in columns k*V .. (k+1)*V - 1, zeros for tokens a
row did not generate (features.MultiTokenLogits).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lvlmlp.errors import LvlmlpError

_CHUNK = 512  # rows per step: bounds the temporaries to ~ chunk * K * V * 4 bytes


def token_rows(X: Any, y: np.ndarray, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token features (m, V), their rows' labels (m,), their rows (m,)): every generated token of every row,
    in row order then token order; tokens that are zero vectors (not generated) are left out."""
    n, d = int(X.shape[0]), int(X.shape[1])
    if d % tokens:
        raise LvlmlpError(f"features have {d} columns, not a multiple of {tokens} tokens")
    vocab = d // tokens
    feats, rows = [], []
    for start in range(0, n, _CHUNK):
        block = np.asarray(X[start : start + _CHUNK], dtype=np.float32).reshape(-1, tokens, vocab)
        present = np.any(block != 0, axis=2)
        feats.append(block[present])
        rows.append(start + np.nonzero(present)[0])
    row_of = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
    return (np.concatenate(feats) if feats else np.empty((0, vocab), np.float32)), np.asarray(y)[row_of], row_of


def summed_log_odds(X: Any, tokens: int, log_odds: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(n,) per row: the sum over its generated (non-zero) tokens of `log_odds(token features)`; 0.0 for a row
    without any (no evidence either way)."""
    n, d = int(X.shape[0]), int(X.shape[1])
    vocab = d // tokens
    out = np.zeros(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        block = np.asarray(X[start : start + _CHUNK], dtype=np.float32).reshape(-1, tokens, vocab)
        present = np.any(block != 0, axis=2)
        scores = np.zeros(present.shape, dtype=np.float64)
        if present.any():
            scores[present] = log_odds(block[present])
        out[start : start + block.shape[0]] = scores.sum(axis=1)
    return out
