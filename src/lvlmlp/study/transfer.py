"""The transfer table (issue 30): the probe trained on one task, evaluated on another task of the same model.

Input: finished `lvlmlp run` folders of one model (one task each, train/test splits). For each pair (A, B), A's
fitted probe (`A/probes/PROMPT`, the config's probe on its feature, fitted on A's train split) scores the labelled
test rows of B (`B/runs/PROMPT-TEST`) that have the feature; rows = train task, columns = test task, the diagonal
is each folder's own evaluation. Every cell's per-row scores go to `OUT/scores/{A}__{B}.jsonl`, so each AUROC and
interval recomputes from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.defaults import N_BOOT
from lvlmlp.errors import LvlmlpError


@dataclass
class Study:
    """One finished `lvlmlp run` folder: its name, task, probe and test run of the chosen prompt."""

    name: str
    task: str
    folder: Path
    probe: Any
    spec: dict[str, Any]
    test_run: Any


def read_study(folder: str | Path, prompt: str | None = None) -> Study:
    """The probe and test run of one `lvlmlp run` folder (its only prompt, or `prompt`)."""
    from lvlmlp.extraction.store import open_run
    from lvlmlp.probing.probes import load_probe

    folder = Path(folder)
    report = folder / "report" / "metrics.json"
    if not report.is_file():
        raise LvlmlpError(f"{folder}: not a finished `lvlmlp run` folder (no report/metrics.json)")
    config = json.loads(report.read_text()).get("config") or {}
    evals = folder / "evals"
    prompts = sorted(p.name for p in evals.iterdir() if p.is_dir() and not p.name.startswith("clip-")) \
        if evals.is_dir() else []
    if prompt is None:
        if len(prompts) != 1:
            raise LvlmlpError(f"{folder}: {len(prompts)} prompts ({', '.join(prompts) or 'none'}); choose one "
                              "with --prompt")
        prompt = prompts[0]
    elif prompt not in prompts:
        raise LvlmlpError(f"{folder}: no evaluation of prompt {prompt!r} (prompts: {', '.join(prompts) or 'none'})")
    metrics = json.loads((evals / prompt / "metrics.json").read_text())
    if metrics.get("task") != "binary":
        raise LvlmlpError(f"{folder}: a {metrics.get('task')} evaluation; the transfer table compares binary tasks")
    probe_dir = folder / "probes" / prompt
    if not (probe_dir / "probe.json").is_file():
        raise LvlmlpError(f"{folder}: no fitted probe in probes/{prompt} (a cross-validation config fits none; "
                          "the transfer table needs splits {train, test})")
    spec = dict(metrics["probe"]["feature_spec"])
    return Study(str(config.get("name") or folder.name), str(config.get("task") or "?"), folder,
                 load_probe(probe_dir), spec, open_run(metrics["run"]))


def transfer_table(folders: list[str | Path], out: str | Path, prompt: str | list[str] | None = None,
                   n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The table as JSON (`OUT/transfer.json`), with every cell's scores in `OUT/scores/`. `prompt`: the prompt of
    every folder, or one per folder (a `tasks:` config's tasks may name their prompts differently)."""
    from lvlmlp.outputs import replaced_folder

    if len(folders) < 2:
        raise LvlmlpError("transfer: give two or more `lvlmlp run` folders")
    prompts = prompt if isinstance(prompt, list) else [prompt] * len(folders)
    studies = [read_study(f, p) for f, p in zip(folders, prompts)]
    names = [s.name for s in studies]
    if len(set(names)) != len(names):  # two configs of one name: their folders tell them apart
        names = [s.folder.name for s in studies]
    if len(set(names)) != len(names):
        raise LvlmlpError(f"transfer: two folders have the same name ({', '.join(names)})")
    first = studies[0].test_run.manifest
    for s in studies[1:]:
        m = s.test_run.manifest
        if (m.get("model"), m.get("weights_hash")) != (first.get("model"), first.get("weights_hash")):
            raise LvlmlpError(f"transfer: {s.folder} ran model {m.get('model')!r} and {studies[0].folder} "
                              f"{first.get('model')!r} (or other weights): the transfer table needs one model")
    # Built beside OUT and swapped in whole (`lvlmlp.outputs`): a failed or killed table never leaves a mixture.
    with replaced_folder(out, "transfer") as tmp:
        return _write_table(studies, names, tmp, n_boot, seed)


def _write_table(studies: list[Study], names: list[str], out: Path, n_boot: int, seed: int) -> dict[str, Any]:
    from lvlmlp.data import write_jsonl
    from lvlmlp.probing.features import feature_matrix, valid_rows
    from lvlmlp.probing.metrics import auroc, bootstrap_ci

    first = studies[0].test_run.manifest
    (out / "scores").mkdir(parents=True, exist_ok=True)
    cells: list[list[dict[str, Any]]] = []
    for a, name_a in zip(studies, names):
        row = []
        for b, name_b in zip(studies, names):
            run = b.test_run
            kind, token = a.spec.get("kind", "logits"), int(a.spec.get("token", 0))
            has = valid_rows(run, kind, token) & ~np.isnan(run.labels)
            idx = np.flatnonzero(has)
            X = feature_matrix(run, kind, token=token, layer=a.spec.get("layer"), rows=idx)
            score = a.probe.predict_proba(X)[:, 1]
            y = run.labels[idx].astype(np.int64)
            file = f"{name_a}__{name_b}.jsonl"
            write_jsonl(out / "scores" / file, [{"id": run.ids[int(i)], "label": int(lab), "score": float(v)}
                                                for i, lab, v in zip(idx, y, score)])
            ci = bootstrap_ci(y, score, "auroc", n_boot=n_boot, seed=seed)
            row.append({"train": name_a, "test": name_b, "auroc": auroc(y, score),
                        "auroc_ci": None if ci is None else [float(ci[0]), float(ci[1])], "n": int(idx.size),
                        "scores": f"scores/{file}"})
        cells.append(row)
    result = {"names": names, "tasks": [s.task for s in studies], "folders": [str(s.folder) for s in studies],
              "model": first.get("model"), "n_boot": n_boot, "seed": seed, "cells": cells}
    (out / "transfer.json").write_text(json.dumps(result, indent=2))
    (out / "transfer.md").write_text(markdown(result) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The table: rows = the task the probe was trained on, columns = the task it is tested on (AUROC [95% CI])."""
    from lvlmlp.study.report import fmt_ci

    names = result["names"]
    lines = ["| train \\ test | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for name, row in zip(names, result["cells"]):
        lines.append(f"| {name} | " + " | ".join(fmt_ci(c["auroc"], c["auroc_ci"]) for c in row) + " |")
    return "\n".join(lines)
