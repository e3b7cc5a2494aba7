"""Uncertainty estimators of the generated answer, from the stored tokens' logits (lm-polygraph's usual baselines),
each a score oriented like the probe (higher = more confident = label 1):

- `seq-prob`: maximum sequence probability, as its log: the sum over the generated tokens of log p(token).
- `mean-entropy`: minus the mean over the generated tokens of the entropy of the token's distribution.
- `perplexity`: minus the log-perplexity, i.e. the mean over the generated tokens of log p(token).

"Generated tokens" are the row's first min(n_tokens, K) tokens, K the tokens whose logits the run keeps
(`--max-new-tokens`): over a longer answer these are estimators of its first K tokens, not of the whole answer.
The run stores raw logits (before any logits processor) of greedy decoding, which picks the most probable token,
so p(token) is the largest probability of each step's distribution; the generated ids are not stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax

from lvlmlp.errors import LvlmlpError

SEQUENCE_BASELINES: dict[str, str] = {
    "seq-prob": "the log-probability of the generated answer (its first K stored tokens; each greedy token's "
                "largest probability): maximum sequence probability",
    "mean-entropy": "minus the mean entropy of the generated tokens' distributions (the first K stored tokens)",
    "perplexity": "minus the log-perplexity of the generated answer: the mean log-probability of its first K "
                  "stored tokens",
}
_CHUNK = 256


def sequence_scores(run: Any, name: str, idx: np.ndarray) -> np.ndarray:
    """Scores of estimator `name` (see `SEQUENCE_BASELINES`) for rows `idx` of `run`; a row that generated no
    token is an error naming it."""
    if name not in SEQUENCE_BASELINES:
        raise LvlmlpError(f"unknown sequence baseline {name!r} (choose from {', '.join(SEQUENCE_BASELINES)})")
    idx = np.asarray(idx, dtype=np.int64)
    k = int(run.n_logit_tokens)
    lengths = np.minimum(np.asarray(run.n_tokens)[idx], k)
    if idx.size and lengths.min() < 1:
        row = run.ids[int(idx[np.argmin(lengths)])]
        raise LvlmlpError(f"row {row!r} generated no token: the {name} baseline needs at least one")
    log_p = np.zeros(idx.size)  # sum over the generated tokens of log p(token)
    entropy = np.zeros(idx.size)  # sum over the generated tokens of the entropy
    order = np.argsort(idx, kind="stable")  # sorted reads walk the memory map forwards
    for t in range(k):
        has = np.flatnonzero(lengths[order] > t)
        if has.size == 0:
            break
        for start in range(0, has.size, _CHUNK):
            pos = order[has[start : start + _CHUNK]]
            logp = log_softmax(np.asarray(run.logits(t)[idx[pos]], dtype=np.float64), axis=1)
            if not np.isfinite(logp).all():
                row = run.ids[int(idx[pos[int(np.argmax(~np.isfinite(logp).all(axis=1)))]])]
                raise LvlmlpError(f"{run.path}: row {row!r} has NaN or infinite logits at token {t}")
            log_p[pos] += logp.max(axis=1)
            entropy[pos] -= np.sum(np.exp(logp) * logp, axis=1)
    if name == "seq-prob":
        return log_p
    if name == "perplexity":
        return log_p / lengths
    return -entropy / lengths
