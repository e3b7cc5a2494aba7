"""The paper's analyses on finished runs: the main probe-vs-baselines evaluation, token-position decay, the layer
sweep and the prompt comparison; each returns plain JSON-able results, a plot and a report section.

Everything works under one of two protocols (`Protocol`): a probe fitted on a train run and scored on a test run,
or stratified k-fold cross-validation on one run (MathVista's protocol), where every row gets an out-of-fold score.
Binary tasks are summarised by AUROC (with a percentile-bootstrap 95% interval), multiclass ones by top-1 accuracy.

A *feature* is a function `(run, idx) -> (keep, X)`: `keep` marks the rows of `idx` that have the feature (later
tokens exist only for rows that generated them) and `X` holds the features of the kept rows. Rows without the
feature are counted in every result (`n_*_short`), never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.defaults import N_BOOT
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import Run
from lvlmlp.probing.features import feature_matrix, valid_rows

Feature = Callable[[Run, np.ndarray], tuple[np.ndarray, np.ndarray]]


# ------------------------------------------------------------------------------------------------ rows and probes
@dataclass
class Labelled:
    """The labelled rows of a run that enter an analysis: positions `idx` in the run and their integer labels."""

    run: Run
    idx: np.ndarray
    y: np.ndarray

    @classmethod
    def of(cls, run: Run, labels: Any = None) -> Labelled:
        """Rows with a label; `labels` (one per run row, NaN = none) replaces the run's own (MathVista)."""
        lab = run.labels if labels is None else np.asarray(labels, dtype=float)
        keep = ~np.isnan(lab)
        if not keep.any():
            raise LvlmlpError(f"{run.path}: no labelled rows")
        return cls(run, np.flatnonzero(keep), lab[keep].astype(np.int64))


def make_probe_factory(cfg: dict[str, Any]) -> Callable[[], Any]:
    """`cfg` = {"kind": a `PROBES` name, "feature": ..., hyper-parameters...} -> a fresh-probe factory
    (`probes.make_probe`, checked once here)."""
    from lvlmlp.probing.probes import make_probe

    params = {k: v for k, v in cfg.items() if k not in ("kind", "feature")}
    kind = cfg["kind"]  # the typed config and the signals always name it
    make_probe(kind, params)  # an unknown kind or parameter, or one out of range: the error before any fit

    def make() -> Any:
        return make_probe(kind, params)

    make.key = json.dumps([kind, params], sort_keys=True, default=str)  # type: ignore[attr-defined]
    return make


def _keyed(feature: Feature, *key: Any) -> Feature:
    """Name a feature, so that a protocol fits each (feature, probe) pair once however many analyses ask."""
    feature.key = key  # type: ignore[attr-defined]
    return feature


def logits_feature(token: int, kind: str = "logits") -> Feature:
    """Logits-derived features of generated token `token`; rows that stopped before it are not kept."""

    def get(run: Run, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = valid_rows(run, kind, token)[idx]
        return keep, feature_matrix(run, kind, token=token, rows=idx[keep])

    return _keyed(get, "logits", kind, token)


def last_token_feature(kind: str = "logits") -> Feature:
    """The logits of each row's LAST generated token: the run's `last_logits` when it kept them (the original's
    `--token_id -1`, the last token of an answer of up to `max_new_tokens`), else the last STORED token, index
    min(n_tokens, K) - 1 (K = stored tokens)."""

    def get(run: Run, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if run.has_last_logits:
            from lvlmlp.probing.features import transform

            keep = run.n_tokens[idx] >= 1
            return keep, transform(np.asarray(run.last_logits()[idx[keep]], dtype=np.float32), kind)
        last = np.minimum(run.n_tokens[idx], run.n_logit_tokens) - 1
        keep = last >= 0
        X = np.empty((int(keep.sum()), run.logits(0).shape[1]), dtype=np.float32)
        rows, where = idx[keep], last[keep]
        for t in np.unique(where):
            X[where == t] = feature_matrix(run, kind, token=int(t), rows=rows[where == t])
        return keep, X

    return _keyed(get, "last", kind)


def state_feature(kind: str, layer: int | None = None) -> Feature:
    """`hidden` (final-norm state) or `layer` L at the first generated position: every row has it."""

    def get(run: Run, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.ones(idx.size, dtype=bool), feature_matrix(run, kind, layer=layer, rows=idx)

    return _keyed(get, "state", kind, layer)


class Unprobeable(LvlmlpError):
    """A feature whose kept train rows cannot fit a probe; `n_test` still says how many test rows have it."""

    def __init__(self, message: str, n_test: int = 0) -> None:
        super().__init__(message)
        self.n_test = n_test


@dataclass
class Scored:
    """Scores of the evaluated rows: `rows` (positions in the evaluated run), labels, and the probe's score
    (P(label 1), or (n, n_classes) probabilities with `classes`); counts of rows left out for lack of features."""

    rows: np.ndarray
    y: np.ndarray
    score: np.ndarray
    classes: np.ndarray
    n_train: int
    n_train_short: int
    n_short: int
    probe: Any = None
    fold_of: np.ndarray | None = None  # cross-validation: each scored row's fold


@dataclass
class Protocol:
    """Train on `train`, score `test`; or, with `cv=k`, k-fold out-of-fold scores of `test` alone (unshuffled
    StratifiedKFold as the original's MathVista notebook; `cv_shuffle=True` shuffles with `seed`)."""

    test: Labelled
    train: Labelled | None = None
    cv: int | None = None
    cv_shuffle: bool = False
    seed: int = 0
    n_boot: int = N_BOOT
    _scored: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (feature, probe) -> Scored

    def __post_init__(self) -> None:
        if (self.train is None) == (self.cv is None):
            raise LvlmlpError("splits: give either a train and a test split, or cv: K")

    def with_n_boot(self, n_boot: int) -> Protocol:
        """The same protocol with another number of bootstrap resamples, sharing the fitted probes (a fit does not
        depend on n_boot): the analyses may take fewer resamples than the main evaluation."""
        other = replace(self, n_boot=n_boot)
        other._scored = self._scored
        return other

    def score(self, feature: Feature, make_probe: Callable[[], Any]) -> Scored:
        """Fit and score one feature; raises LvlmlpError when the kept rows cannot train a probe. A named feature
        and probe (`logits_feature`, ..., `make_probe_factory`) are fitted once: the main evaluation, the token
        decay and the layer sweep all start from the first-token probe."""
        key = (getattr(feature, "key", None), getattr(make_probe, "key", None))
        if None in key:
            return self._score(feature, make_probe)
        if key not in self._scored:
            self._scored[key] = self._score(feature, make_probe)
        return self._scored[key]

    def _score(self, feature: Feature, make_probe: Callable[[], Any]) -> Scored:
        from lvlmlp.probing.metrics import cross_val_folds

        keep, X = feature(self.test.run, self.test.idx)
        y = self.test.y[keep]
        classes = np.unique(self.test.y)
        if self.cv is not None:
            score, fold_of = cross_val_folds(make_probe, X, y, n_splits=self.cv, seed=self.seed,
                                             shuffle=self.cv_shuffle)
            n = int(keep.sum())
            return Scored(self.test.idx[keep], y, score, np.unique(y), n, int((~keep).sum()), int((~keep).sum()),
                          fold_of=fold_of)
        assert self.train is not None
        keep_tr, X_tr = feature(self.train.run, self.train.idx)
        y_tr = self.train.y[keep_tr]
        if np.unique(y_tr).size < 2:
            raise Unprobeable(f"{int(keep_tr.sum())} train rows have this feature, with labels "
                              f"{np.unique(y_tr).tolist()}: a probe needs 2 classes", n_test=int(keep.sum()))
        probe = make_probe().fit(X_tr, y_tr)
        proba = probe.predict_proba(X)
        classes = np.asarray(probe.classes_)
        score = proba[:, 1] if classes.size == 2 else proba
        return Scored(self.test.idx[keep], y, score, classes, int(keep_tr.sum()), int((~keep_tr).sum()),
                      int((~keep).sum()), probe)


# ------------------------------------------------------------------------------------------------ summaries
def summarize(y: np.ndarray, score: np.ndarray, classes: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Binary: AUROC and its bootstrap interval. Multiclass: top-1 accuracy and its bootstrap interval."""
    from lvlmlp.probing.metrics import auroc, bootstrap_ci

    if score.ndim == 1:
        return {"metric": "auroc", "value": auroc(y, score), "ci": _ci(bootstrap_ci(y, score, "auroc",
                n_boot=n_boot, seed=seed)), "n": int(y.size), "n_positive": int(np.sum(y == 1))}
    correct = (classes[np.argmax(score, axis=1)] == y).astype(float)
    rng = np.random.default_rng(seed)
    boots = [correct[rng.integers(0, y.size, y.size)].mean() for _ in range(n_boot)] if y.size else []
    ci = [float(v) for v in np.percentile(boots, [2.5, 97.5])] if boots else None
    return {"metric": "accuracy", "value": float(correct.mean()) if y.size else None, "ci": ci, "n": int(y.size)}


def _ci(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def evaluate_feature(protocol: Protocol, feature: Feature, make_probe: Callable[[], Any]) -> tuple[dict, Scored | None]:
    """Summary of one feature, with the row counts; a feature that cannot be probed gives value None + a note."""
    try:
        s = protocol.score(feature, make_probe)
    except LvlmlpError as err:
        return {"metric": None, "value": None, "ci": None, "n": getattr(err, "n_test", 0), "note": str(err)}, None
    out = summarize(s.y, s.score, s.classes, protocol.n_boot, protocol.seed)
    out.update(n_train=s.n_train, n_train_short=s.n_train_short, n_short=s.n_short)
    return out, s


# ------------------------------------------------------------------------------------------------ main evaluation
def main_evaluation(
    protocol: Protocol,
    feature: Feature,
    feature_spec: dict[str, Any],
    probe_cfg: dict[str, Any],
    baselines: list[str],
    out: Path,
    probe_dir: Path | None = None,
    split: str | None = None,
    task: dict[str, Any] | None = None,
    task_name: str | None = None,
    prompt_style: str | None = None,
) -> dict[str, Any]:
    """Probe + baselines on the evaluated rows, written as a `probe eval` folder (metrics.json, scores.jsonl) so
    that `lvlmlp report` and `report.write_report` read it; the fitted probe is saved to `probe_dir`. `task`:
    what the header records of the task (`groups`: its per-group metrics, `label_names`); `task_name`: the
    registered task (its answer rule for the `own-answer:task` baseline); `prompt_style`: the task's prompt style
    of the run (with `task_name`, the `own-answer:paper` rule; None for a template of one's own)."""
    from lvlmlp.probing.evaluate import write_eval

    make = make_probe_factory(probe_cfg)
    s = protocol.score(feature, make)
    # One threshold: the probe's own (probe.json; `probe: {threshold: T}` of the config sets it), for the
    # evaluation's accuracy/F1 and the folds' alike (steering reads it from the saved probe).
    threshold = float((s.probe or make()).threshold)
    header = {
        "run": str(protocol.test.run.path),
        "split": split,
        "protocol": f"{protocol.cv}-fold cross-validation" if protocol.cv else "train/test",
        "probe": {"dir": str(probe_dir) if probe_dir and s.probe is not None else None,
                  "class": type(s.probe or make()).__name__, "feature_spec": feature_spec,
                  "threshold": threshold},
        "n_scored": int(s.rows.size), "n_skipped": s.n_short, "n_train": s.n_train, **(task or {}),
    }
    if s.fold_of is not None and s.score.ndim == 1:
        from lvlmlp.probing.metrics import fold_metrics

        # The original reports the mean of the per-fold metrics; the file's other metrics pool the out-of-fold
        # scores of all folds (one AUROC over every row), reported beside it and labelled as such.
        header["cv"] = {"folds": f"StratifiedKFold({protocol.cv}, shuffle={protocol.cv_shuffle})",
                        **fold_metrics(s.y, s.score, s.fold_of, threshold),
                        "pooled": "the probe metrics of this file are pooled over the out-of-fold scores"}
    if probe_dir is not None and s.probe is not None:
        s.probe.save(probe_dir)
    return write_eval(out, protocol.test.run, s.rows, s.y.astype(float), s.score, s.classes, threshold, baselines,
                      header, protocol.n_boot, protocol.seed, task=task_name, style=prompt_style)


# ------------------------------------------------------------------------------------------------ analyses
def token_decay(protocol: Protocol, probe_cfg: dict[str, Any]) -> dict[str, Any]:
    """Probe quality on generated tokens 0..K-1 (0 = the first, as everywhere in lvlmlp) and on each row's last one.

    Token k is probed on the rows that generated more than k tokens (n_tokens > k), in train and test
    alike; `n_short` counts the evaluated rows left out because their answer ended earlier, and
    `first_token_same_rows` gives the first-token probe's result on exactly the rows of token k, so that a drop
    is not confused with a change of rows. "last" is each row's last generated token (up to max_new_tokens) when the
    run kept it (`logits_tokens` < `max_new_tokens`), else token min(n_tokens, K): rows that hit the K-token limit
    contribute their K-th token (`n_truncated` counts rows that hit max_new_tokens).
    """
    make = make_probe_factory(probe_cfg)
    kind = probe_cfg["feature"]
    runs = [protocol.test.run] + ([protocol.train.run] if protocol.train else [])
    k_max = min(r.n_logit_tokens for r in runs)
    first, first_scored = evaluate_feature(protocol, logits_feature(0, kind), make)
    tokens = []
    for k in range(k_max):
        entry, _ = (first, first_scored) if k == 0 else evaluate_feature(protocol, logits_feature(k, kind), make)
        entry = {"token": k, **entry}
        if first_scored is not None:
            same = protocol.test.run.n_tokens[first_scored.rows] > k
            entry["first_token_same_rows"] = summarize(first_scored.y[same], first_scored.score[same],
                                                       first_scored.classes, protocol.n_boot, protocol.seed)
        tokens.append(entry)
    last, _ = evaluate_feature(protocol, last_token_feature(kind), make)
    test = protocol.test
    max_new = int(test.run.manifest.get("max_new_tokens") or 0)
    last["n_truncated"] = int(np.sum(test.run.n_tokens[test.idx] >= max(max_new, 1))) if max_new else 0
    counts = np.bincount(np.minimum(test.run.n_tokens[test.idx], k_max), minlength=k_max + 1)
    return {"k_max": k_max, "feature": kind, "tokens": tokens, "last": {"token": "last", **last},
            "n_tokens_histogram": {str(i): int(c) for i, c in enumerate(counts) if i},
            "rule": "token k (0 = the first generated) is probed on rows with n_tokens > k (others counted in n_short / n_train_short)"}


def layer_sweep(protocol: Protocol, probe_cfg: dict[str, Any]) -> dict[str, Any]:
    """First-token logits against the final hidden state and every extracted layer, at the same position."""
    make = make_probe_factory(probe_cfg)
    run = protocol.test.run
    entries = []
    candidates: list[tuple[str, Feature, int | None]] = [("logits (token 0)", logits_feature(0), None)]
    if run.manifest.get("hidden"):
        candidates.append(("hidden (final norm)", state_feature("hidden"), None))
    candidates += [(f"layer {L}", state_feature("layer", L), L) for L in run.manifest.get("layers") or []]
    for name, feat, layer in candidates:
        result, _ = evaluate_feature(protocol, feat, make)
        dim = run.logits(0).shape[1] if name.startswith("logits") else (
            run.hidden().shape[1] if layer is None else run.layer(layer).shape[1])
        entries.append({"feature": name, "layer": layer, "dim": int(dim), **result})
    return {"entries": entries}


# ------------------------------------------------------------------------------------------------ plots
def _errs(entries: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    vals = np.array([np.nan if e["value"] is None else e["value"] for e in entries], dtype=float)
    lo = np.array([v - e["ci"][0] if e.get("ci") else 0.0 for v, e in zip(vals, entries)])
    hi = np.array([e["ci"][1] - v if e.get("ci") else 0.0 for v, e in zip(vals, entries)])
    return vals, np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)])


def plot_token_decay(result: dict[str, Any], path: Path, title: str) -> None:
    from lvlmlp.study.report import pyplot, save_figure

    plt = pyplot()
    entries = [*result["tokens"], result["last"]]
    labels = [str(e["token"]) for e in entries]
    vals, err = _errs(entries)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    x = np.arange(len(entries))
    ax.errorbar(x, vals, yerr=err, marker="o", capsize=3, label="probe on token k")
    same = [e.get("first_token_same_rows", {}).get("value") for e in result["tokens"]]
    if any(v is not None for v in same):
        ax.plot(x[:-1], [np.nan if v is None else v for v in same], ls="--", color="grey",
                label="first-token probe, same rows")
    for xi, e in zip(x, entries):
        ax.annotate(f"n={e['n']}", (xi, 0.02), ha="center", fontsize=7, xycoords=("data", "axes fraction"))
    ax.set_xticks(x, labels)
    metric = next((e["metric"] for e in entries if e.get("metric")), "auroc")
    ax.set(xlabel="generated token (0 = the first)", ylabel=metric.upper() if metric == "auroc" else metric, title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_bars(names: list[str], entries: list[dict], path: Path, title: str, reference: float | None = None) -> None:
    """One bar per feature/prompt with its 95% interval; `reference` draws the first-token logits level."""
    from lvlmlp.study.report import pyplot, save_figure

    plt = pyplot()
    vals, err = _errs(entries)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 4), dpi=100)
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(vals), yerr=err, capsize=3, color="tab:blue", alpha=0.8)
    if reference is not None:
        ax.axhline(reference, ls="--", color="tab:red", lw=1, label="first-token logits")
        ax.legend(fontsize=8)
    ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
    metric = next((e["metric"] for e in entries if e.get("metric")), "auroc")
    ax.set(ylabel=metric.upper() if metric == "auroc" else metric, title=title, ylim=(0, 1.05))
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ report sections
def fmt_result(e: dict[str, Any]) -> str:
    """"0.812 [0.774, 0.850]"; a k-fold headline: "0.815 (mean of 10 folds); pooled out-of-fold 0.812 [...]"."""
    from lvlmlp.study.report import POOLED, fmt_ci

    if e.get("pooled"):
        pooled = fmt_ci(e["pooled"]["value"], e["pooled"]["ci"])
        return f"{fmt_ci(e.get('value'), None)} ({e['label']}); {POOLED} {pooled}"
    return fmt_ci(e.get("value"), e.get("ci"))


def token_decay_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for e in [*result["tokens"], result["last"]]:
        same = e.get("first_token_same_rows")
        rows.append([str(e["token"]), fmt_result(e), "–" if not same else fmt_result(same), str(e["n"]),
                     str(e.get("n_short", "–")), str(e.get("n_train", "–")), e.get("note", "")])
    return rows


TOKEN_DECAY_HEADER = ["token", "probe [95% CI]", "first-token probe, same rows", "n test", "n test short",
                      "n train", "note"]
LAYER_HEADER = ["feature", "dim", "probe [95% CI]", "n test", "note"]


def layer_rows(result: dict[str, Any]) -> list[list[str]]:
    return [[e["feature"], str(e["dim"]), fmt_result(e), str(e["n"]), e.get("note", "")] for e in result["entries"]]
