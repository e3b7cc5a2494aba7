"""The network of `probes.MLPProbe`: a ReLU multi-layer perceptron trained in torch with early stopping.

Kept apart from probes.py (which holds the scikit-learn-style class, its saving and the registry) because this is
the only non-linear probe: its parameters are stored as one flat float32 vector (`pack` / `unpack`), so that the
probe folder stays safetensors + JSON with a fixed set of array names, whatever the hidden sizes.

Training (`train_mlp`): the train rows are split once into a fitting part and a stratified validation part
(`val_fraction`, seeded); Adam with decoupled weight decay (AdamW) on mini-batches read from the feature matrix
(a memory map or a lazy view, batch by batch, so that large runs are never loaded whole); after each epoch the
validation loss is measured and the weights of the best epoch are kept; training stops after `patience` epochs
without improvement, or after `epochs`. Weights are initialised from a CPU generator seeded with `seed` (as
torch.nn.Linear initialises them: uniform in +-1/sqrt(fan_in)), so the same seed gives the same start on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lvlmlp.errors import LvlmlpError


def layer_shapes(n_features: int, hidden: tuple[int, ...], n_out: int) -> list[tuple[int, int]]:
    """(out, in) of each linear layer: the hidden layers, then the output layer (1 logit binary, else C)."""
    sizes = [n_features, *hidden, n_out]
    return [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]


def n_params(shapes: list[tuple[int, int]]) -> int:
    return sum(o * i + o for o, i in shapes)


def unpack(flat: Any, shapes: list[tuple[int, int]]) -> list[tuple[Any, Any]]:
    """[(weight (out, in), bias (out,)), ...] views of the flat parameter vector (numpy or torch)."""
    layers, pos = [], 0
    for o, i in shapes:
        w = flat[pos : pos + o * i].reshape(o, i)
        pos += o * i
        layers.append((w, flat[pos : pos + o]))
        pos += o
    return layers


def pack(layers: list[tuple[Any, Any]]) -> np.ndarray:
    return np.concatenate([np.concatenate([w.reshape(-1), b.reshape(-1)]) for w, b in layers]).astype(np.float32)


def forward(layers: list[tuple[Any, Any]], x: Any) -> Any:
    """Logits of rows `x` (numpy or torch, already standardised): ReLU after every layer but the last."""
    for k, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if k < len(layers) - 1:
            x = x.clip(min=0) if isinstance(x, np.ndarray) else x.clamp_min(0)
    return x


@dataclass
class TrainResult:
    params: np.ndarray  # the flat parameters of the best epoch
    info: dict[str, Any]


def validation_split(y_idx: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows), stratified: each class gives round(val_fraction * its rows) rows (at least 1)
    to validation and keeps at least 1 for fitting; sorted positions, seeded."""
    if val_fraction == 0:
        return np.arange(y_idx.size), np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(y_idx):
        rows = rng.permutation(np.flatnonzero(y_idx == c))
        if rows.size < 2:
            raise LvlmlpError(f"mlp probe: class index {int(c)} has {rows.size} row; early stopping needs 2+ rows of "
                              "each class (one for validation), or --val-fraction 0")
        k = min(max(1, round(val_fraction * rows.size)), rows.size - 1)
        val.append(rows[:k])
        fit.append(rows[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def train_mlp(X: Any, y_idx: np.ndarray, n_out: int, hidden: tuple[int, ...], *, epochs: int, batch_size: int,
              lr: float, weight_decay: float, patience: int, val_fraction: float,
              mean: np.ndarray | None, scale: np.ndarray | None, device: Any, seed: int) -> TrainResult:
    """Fit the network on rows of `X` (indexable by sorted row arrays) with class indices `y_idx`."""
    import torch

    n, d = int(X.shape[0]), int(X.shape[1])
    shapes = layer_shapes(d, hidden, n_out)
    gen = torch.Generator().manual_seed(seed)
    init = []
    for o, i in shapes:
        bound = 1.0 / math.sqrt(i)
        init.append(((torch.rand(o, i, generator=gen) * 2 - 1) * bound, (torch.rand(o, generator=gen) * 2 - 1) * bound))
    params = [t.to(device).requires_grad_() for layer in init for t in layer]
    layers = [(params[2 * k], params[2 * k + 1]) for k in range(len(shapes))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    mean_t = torch.from_numpy(mean).to(device) if mean is not None else None
    scale_t = torch.from_numpy(scale).to(device) if scale is not None else None
    targets = torch.from_numpy(y_idx.astype(np.int64))

    def batch(idx: np.ndarray) -> Any:
        xb = torch.from_numpy(np.asarray(X[idx], dtype=np.float32)).to(device)
        if not torch.isfinite(xb).all():
            row = int(idx[int((~torch.isfinite(xb).all(1)).nonzero()[0])])
            raise LvlmlpError(f"feature row {row} has NaN or infinite values")
        return (xb - mean_t) / scale_t if mean_t is not None else xb

    def loss_of(logits: Any, idx: np.ndarray, reduction: str = "mean") -> Any:
        t = targets[idx].to(device)
        if n_out == 1:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], t.float(), reduction=reduction)
        return torch.nn.functional.cross_entropy(logits, t, reduction=reduction)

    fit_rows, val_rows = validation_split(y_idx, val_fraction, seed)
    rng = np.random.default_rng(seed)
    best = (math.inf, 0, pack([(w.detach().cpu().numpy(), b.detach().cpu().numpy()) for w, b in layers]))
    history: list[float] = []
    since_best = 0
    for epoch in range(1, epochs + 1):
        perm = rng.permutation(fit_rows)
        for start in range(0, perm.size, batch_size):
            idx = np.sort(perm[start : start + batch_size])
            loss = loss_of(forward(layers, batch(idx)), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if val_rows.size == 0:
            continue
        with torch.no_grad():
            total = sum(float(loss_of(forward(layers, batch(val_rows[s : s + 4096])), val_rows[s : s + 4096], "sum"))
                        for s in range(0, val_rows.size, 4096))
        history.append(total / val_rows.size)
        if history[-1] < best[0]:
            best = (history[-1], epoch, pack([(w.detach().cpu().numpy(), b.detach().cpu().numpy())
                                              for w, b in layers]))
            since_best = 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    if val_rows.size == 0:  # no validation rows: the last epoch's weights
        best = (math.nan, epochs, pack([(w.detach().cpu().numpy(), b.detach().cpu().numpy()) for w, b in layers]))
    info = {"n_rows": n, "n_fit": int(fit_rows.size), "n_val": int(val_rows.size),
            "epochs_run": epoch if epochs else 0, "best_epoch": best[1],
            "best_val_loss": None if math.isnan(best[0]) or math.isinf(best[0]) else best[0]}
    return TrainResult(best[2], info)
