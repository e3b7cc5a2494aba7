"""The linear algebra of `LDAProbe`'s default solver: scikit-learn's `LinearDiscriminantAnalysis(solver="svd")`
coefficients computed in torch (CPU or GPU) without its two SVDs (`lda_svd`; bench/probe_speed.py --lda)."""

from __future__ import annotations

from typing import Any

import numpy as np


def lda_svd(X: np.ndarray, y: np.ndarray, tol: float, device: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's `LinearDiscriminantAnalysis._solve_svd` (1.9) in torch: (coef_, intercept_, classes_) as its
    fitted model holds them (binary: one row, class 1 minus class 0).

    scikit-learn takes two SVDs: of the scaled within-class matrix Xw (n x d), giving the whitening
    W = V_r / std / S_r over the r singular values above `tol`, and of the between-class centres projected by W
    (k x r), whose leading right singular vectors V2 (relative threshold `tol`) give scalings_ = W V2. Its coef_
    and intercept_ depend on these only through the products computed here, which need no SVD of Xw:
      P = (means - xbar) W W^T = (means - xbar) / std @ pinv_tol(Xw^T Xw) / std    (`centres_times_pinv`)
      H = P (means - xbar)^T,  D = sqrt(priors),  D H D = U2 S2^2 U2^T  (k x k eigenproblem)
      (means - xbar) scalings_ = H D U2 / S2,   coef_ = that / S2 @ U2^T D P.
    The same rank rules apply (S > tol; S2 > tol * S2[0]); float64 throughout. scikit-learn's D is
    sqrt(n priors / (k - 1)): a constant factor on D scales every S2 alike, so it changes neither the relative rank
    rule nor coef_ (D U2 / S2 and U2^T D / S2 cancel it). Tests compare predictions and
    probabilities with scikit-learn's."""
    import torch

    classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    n, k = y.size, classes.size
    f64 = torch.float64
    xw = torch.from_numpy(X).to(device, f64)
    idx = torch.from_numpy(y_idx).to(device)
    counts_t = torch.from_numpy(counts).to(device)
    priors = torch.from_numpy(counts / n).to(device, f64)
    means = torch.zeros(k, xw.shape[1], dtype=f64, device=device).index_add_(0, idx, xw) / counts_t[:, None]
    for start in range(0, n, ROWS):  # within-class centred rows, in blocks: no second n x d matrix
        xw[start : start + ROWS] -= means[idx[start : start + ROWS]]
    std = xw.std(dim=0, correction=0)
    std[std == 0] = 1.0
    xw /= std
    xw *= (1.0 / n) ** 0.5
    if n <= xw.shape[1]:
        xw = reduced_rows(xw, idx, counts_t)
    xbar = priors @ means
    p = centres_times_pinv(xw, (means - xbar) / std, tol) / std
    del xw
    h = p @ (means - xbar).T
    d = torch.sqrt(priors)
    lam2, u2 = torch.linalg.eigh(d[:, None] * h * d[None, :])
    s2, u2 = lam2.flip(0).clamp_min(0).sqrt(), u2.flip(1)
    rank2 = int((s2 > tol * s2[0]).sum())
    s2, u2 = s2[:rank2], u2[:, :rank2]
    coef = (h @ (d[:, None] * u2)) / s2  # scikit-learn's (means - xbar) @ scalings_
    intercept = -0.5 * (coef**2).sum(dim=1) + torch.log(priors)
    coef = (coef / s2) @ (u2.T * d) @ p  # scikit-learn's coef @ scalings_.T
    intercept -= xbar @ coef.T
    if k == 2:
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    return coef.cpu().numpy(), intercept.cpu().numpy(), classes


ROWS = 4096  # row block of the in-place steps of `lda_svd`


def reduced_rows(xw: Any, idx: Any, counts: Any) -> Any:
    """Rows with the same Gram matrix xw^T xw as the within-class centred rows `xw`, one fewer per class.

    A class's m centred rows span only m - 1 directions: the Householder reflection that maps the class's
    all-ones vector to its first axis turns them into m - 1 rows x_i + x_first / (sqrt(m) - 1) (i = the class's
    other rows) and a zero row, dropped. Fewer rows than features then usually means full row rank, which the
    fast path of `centres_times_pinv` needs."""
    import torch

    order = torch.argsort(idx, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    first = xw[order[starts]]  # each class's first row
    keep = torch.ones(len(idx), dtype=torch.bool, device=xw.device)
    keep[starts] = False
    rest = order[keep]
    cls = idx[rest]
    scale = 1.0 / (counts[cls].to(xw.dtype).sqrt() - 1.0)
    z = xw[rest]
    for start in range(0, len(rest), ROWS):
        block = slice(start, start + ROWS)
        z[block].addcmul_(first[cls[block]], scale[block, None])
    return z


def centres_times_pinv(z: Any, centres: Any, tol: float) -> Any:
    """centres @ pinv_tol(z^T z): the pseudo-inverse over z's singular values above `tol` (scikit-learn's rank).

    Fast path (fewer rows than features, ImageNet's 16 rows per class): when every singular value of z is above
    `tol` (proved by a Cholesky factorisation of z z^T - (2 tol)^2 I succeeding: its smallest eigenvalue is then
    above (2 tol)^2, far beyond rounding), pinv(z^T z) = z^T (z z^T)^-2 z: a symmetric product and Cholesky
    solves, several times faster than an SVD or eigen-decomposition of the same size. Otherwise: the
    eigen-decomposition of the smaller Gram matrix, thresholded at `tol`."""
    import torch

    n, d = z.shape
    if n <= d:
        gram = _lower_gram(z)  # eigh and the factorisations read its lower triangle only
        shifted = gram.clone()
        shifted.diagonal().sub_((2.0 * tol) ** 2)
        full_rank = int(torch.linalg.cholesky_ex(shifted)[1]) == 0
        del shifted
        if full_rank:
            chol = torch.linalg.cholesky(gram)
            t = torch.cholesky_solve(torch.cholesky_solve((centres @ z.T).T, chol), chol)
            return t.T @ z
        lam, u = torch.linalg.eigh(gram)
        s = lam.flip(0).clamp_min(0).sqrt()
        rank = int((s > tol).sum())
        vt = (u.flip(1)[:, :rank].T @ z) / s[:rank, None]
    else:
        lam, v = torch.linalg.eigh(z.T @ z)
        s = lam.flip(0).clamp_min(0).sqrt()
        rank = int((s > tol).sum())
        vt = v.flip(1)[:, :rank].T
    return ((centres @ vt.T) / s[:rank] ** 2) @ vt


def _lower_gram(z: Any) -> Any:
    """z z^T with its lower triangle valid (what the Cholesky factorisations read): BLAS dsyrk on the CPU, which
    computes one triangle, about twice as fast as a full product; torch's product elsewhere."""
    import torch

    if z.device.type != "cpu":
        return z @ z.T
    from scipy.linalg import blas

    return torch.from_numpy(blas.dsyrk(1.0, z.contiguous().numpy(), trans=0, lower=1))
