"""Evaluating a probe on a run: the glue between a run, its feature views, the probes, the metrics and the baselines
(the commands `probe train` and `probe eval` are in lvlmlp/commands/probe.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.defaults import N_BOOT
from lvlmlp.errors import LvlmlpError
from lvlmlp.probing.features import valid_rows
from lvlmlp.probing.metrics import binary_report, check_groups, group_metrics

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- row selection
def select_rows(run: Any, split: str | None, kind: str = "logits", token: int = 0) -> tuple[np.ndarray, int]:
    """Positions of the rows of `split` (all rows when None) that have features; and how many lacked them."""
    splits = run.splits
    if split is not None:
        present = sorted({s for s in splits if s is not None})
        if split not in present:
            have = ", ".join(present) if present else "none: rows have no 'split' field"
            raise LvlmlpError(f"--split {split}: no such split in {run.path} (splits present: {have})")
        in_split = np.array([s == split for s in splits], dtype=bool)
    else:
        in_split = np.ones(len(run), dtype=bool)
    has = valid_rows(run, kind, token)
    skipped = int(np.sum(in_split & ~has))
    if skipped:
        log.warning("%d row(s) of %s stopped before token %d and are left out", skipped, run.path, token)
    return np.flatnonzero(in_split & has), skipped


# Baselines whose score is a 0..1 probability-like value with a natural 0.5 cut get threshold metrics too.
def _has_threshold(name: str) -> bool:
    return name.startswith("own-answer") or name.startswith("token-prob:")


def write_eval(
    out: Path,
    run: Any,
    idx: np.ndarray,
    labels: np.ndarray,
    score: np.ndarray,
    classes: np.ndarray,
    threshold: float,
    baselines: list[str],
    header: dict[str, Any],
    n_boot: int = N_BOOT,
    seed: int = 0,
    token: int = 0,
    task: str | None = None,
    style: str | None = None,
) -> dict[str, Any]:
    """Write a `probe eval` folder: `scores.jsonl` (one record per scored row) and `metrics.json` (probe and
    baselines on the labelled rows). `score` is P(classes[-1]) (n,) for a binary probe, (n, C) for multiclass;
    `labels` has NaN for unlabelled rows (scored, not measured). `header["groups"]` (row field -> metric of
    `metrics.GROUP_METRICS`, from the task) adds per-group metrics and keeps those fields in `scores.jsonl`.
    `task`: the registered task of the rows (the `own-answer:task` baseline reads answers with its rule; for a
    multiclass probe it is the one baseline, the class the answer names, measured by top-1 accuracy); `style`: the
    prompt style the run was extracted with (with `task`, the `own-answer:paper` rule; recorded in the header).
    `lvlmlp run` writes its evaluations here too."""
    from lvlmlp.data import write_jsonl
    from lvlmlp.probing.baselines import PAPER_ANSWER, TASK_ANSWER, baseline_scores
    from lvlmlp.probing.metrics import top1_accuracy

    labelled = ~np.isnan(labels)
    meta = [run.meta[i] for i in idx]
    metrics: dict[str, Any] = {"task": "binary" if score.ndim == 1 else "multiclass", **header}
    if PAPER_ANSWER in baselines:  # which of the notebooks' rules read the answers
        metrics["own_answer_paper"] = {"task": task, "prompt_style": style}
    groups = check_groups(header.get("groups") or {}, "evaluation")
    records = [{"id": run.ids[i], "label": None if np.isnan(lab) else int(lab)} for i, lab in zip(idx, labels)]
    for rec, m in zip(records, meta):
        rec.update({k: m[k] for k in groups if m.get(k) is not None})
    if score.ndim == 1:
        for rec, v in zip(records, score):
            rec["score"] = float(v)
        base = {name: baseline_scores(run, name, idx, token=token, task=task, style=style) for name in baselines}
        for name, b in base.items():
            for rec, v in zip(records, b):
                rec.setdefault("baselines", {})[name] = float(v)
        if labelled.any():
            # Labels are 0/1 (label 1 = the class the probe scores); map the probe's own two classes in case they were others.
            y = (labels[labelled] == classes[-1]).astype(np.int64)
            lab_meta = [m for m, keep in zip(meta, labelled) if keep]
            metrics.update(binary_report(y, score[labelled], threshold, n_boot, seed))
            metrics.update(group_metrics(lab_meta, y, score[labelled], groups, threshold))
            metrics["baselines"] = {}
            for name, b in base.items():
                block = binary_report(y, b[labelled], 0.5, n_boot, seed)
                if _has_threshold(name):
                    block.update(group_metrics(lab_meta, y, b[labelled], groups, 0.5))
                else:
                    block = {k: block[k] for k in ("auroc", "auprc", "auroc_ci", "n")}
                metrics["baselines"][name] = block
    else:
        if set(baselines) - {TASK_ANSWER}:
            raise LvlmlpError(f"baselines are defined for binary probes only ({TASK_ANSWER} also for multiclass)")
        pred = classes[np.argmax(score, axis=1)]
        for rec, p, row in zip(records, pred, score):
            rec.update(pred=int(p), score=float(row.max()))
        named = {name: baseline_scores(run, name, idx, task=task) for name in baselines}  # the class each names
        for name, b in named.items():
            for rec, v in zip(records, b):
                rec.setdefault("baselines", {})[name] = int(v)
        if labelled.any():
            y = labels[labelled].astype(np.int64)
            metrics.update(accuracy=top1_accuracy(y, pred[labelled]), n=int(labelled.sum()))
            if named:
                metrics["baselines"] = {name: {"accuracy": top1_accuracy(y, b[labelled]), "n": int(labelled.sum())}
                                        for name, b in named.items()}
    from lvlmlp.outputs import replaced_folder

    with replaced_folder(out, "eval") as tmp:  # scores and metrics as one unit, replacing an earlier evaluation
        write_jsonl(tmp / "scores.jsonl", records)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
