"""`tasks:` in an `lvlmlp run` config: several tasks of one model in one run, and their transfer table.

Each entry of `tasks:` is the config with the entry's keys changed (`config.task_configs`), run as a config of its
own in `OUT/tasks/NAME` (its own steps, report and re-run rules) with one shared `LazyBackend`, so the model loads
once, and only if some task has model work left. Then, unless `transfer: false`, the transfer table of those folders
(`study.transfer.transfer_table`: each task's fitted probe on every task's test rows) goes to `OUT/transfer/`, and
`OUT/report/` holds every task's evaluation and the table (docs/signals.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from lvlmlp.study.config import ExperimentConfig, prompts_of, task_configs
from lvlmlp.study.layout import RunLayout
from lvlmlp.study.report import Section, write_report
from lvlmlp.study.steps import Steps, step_key

log = logging.getLogger("lvlmlp")


def run_tasks(cfg: ExperimentConfig, progress: bool, backend: Any) -> dict[str, Any]:
    """Every task of `cfg.tasks` (`run_experiment` on each), the transfer table, the combined report."""
    from lvlmlp.study.experiment import LazyBackend, run_experiment

    children = task_configs(cfg)
    lazy = backend or LazyBackend(children[0])
    for child in children:
        run_experiment(child, progress, lazy)
    out = Path(cfg.out)
    # Each task's first prompt is its evaluation in the table (a config of several prompts has one per prompt).
    firsts = [prompts_of(child)[0][0] for child in children]
    eval_dirs = [RunLayout(Path(child.out)).eval(p) for child, p in zip(children, firsts)]
    names = [f"{child.name}: {p}" for child, p in zip(children, firsts)]
    results: dict[str, Any] = {"config": cfg.to_dict(), "tasks": {c.name: str(c.out) for c in children}}
    sections = []
    table = _transfer(cfg, children, firsts, eval_dirs, out)
    if table is not None:
        results["transfer"] = table
        sections.append(transfer_section(table))
    for child in children:  # each task's own report keeps its analyses
        log.info("run: task %s: report %s", child.name, RunLayout(Path(child.out)).report / "report.html")
    return write_report(eval_dirs, RunLayout(out).report, sections, results, names=names)


def transfer_wanted(cfg: ExperimentConfig, children: list[ExperimentConfig], eval_dirs: list[Path]) -> str | None:
    """Why there is no transfer table (None: there is one): `transfer: false`, one task, k-fold, multiclass."""
    if cfg.transfer is False:
        return "transfer: false"
    if len(children) < 2:
        return "one task"
    if any(c.splits.cv is not None for c in children):
        return "k-fold cross-validation fits no probe to transfer"
    kinds = [json.loads((d / "metrics.json").read_text()).get("task") for d in eval_dirs]
    if any(k != "binary" for k in kinds):
        return "a task is not binary"
    return None


def _transfer(cfg: ExperimentConfig, children: list[ExperimentConfig], prompts: list[str], eval_dirs: list[Path],
              out: Path) -> dict[str, Any] | None:
    """The transfer table of the tasks' folders, rebuilt only when a task's evaluation or probe changed (its stamp
    in `OUT/steps/transfer.json`); None when it is not wanted (`transfer_wanted`, said in the log)."""
    from lvlmlp.errors import LvlmlpError
    from lvlmlp.study.transfer import transfer_table

    why_not = transfer_wanted(cfg, children, eval_dirs)
    if why_not is not None:
        if cfg.transfer:  # asked for explicitly: the config check let it through, the results did not
            raise LvlmlpError(f"config: transfer: no table ({why_not})")
        log.info("run: no transfer table (%s)", why_not)
        return None
    folders = [Path(c.out) for c in children]
    inputs = [hashlib.sha256((d / "metrics.json").read_bytes()
                             + (RunLayout(f).probe(p) / "probe.json").read_bytes()).hexdigest()
              for d, f, p in zip(eval_dirs, folders, prompts)]
    key = step_key([inputs, [str(f) for f in folders], cfg.n_boot, cfg.seed])
    steps, path = Steps(out), out / "transfer" / "transfer.json"
    if steps.done("transfer", key) and path.is_file():
        return json.loads(path.read_text())
    table = transfer_table(folders, out / "transfer", prompts, n_boot=cfg.n_boot, seed=cfg.seed)
    steps.mark("transfer", key)
    return table


def transfer_section(table: dict[str, Any]) -> Section:
    """The report's table: rows = the task the probe was trained on, columns = the task it is tested on."""
    from lvlmlp.study.report import fmt_ci

    names = table["names"]
    rows = [[name, *(fmt_ci(c["auroc"], c["auroc_ci"]) for c in row)] for name, row in zip(names, table["cells"])]
    n = ", ".join(f"{name} {cell['n']}" for name, cell in zip(names, table["cells"][0]))  # a column's rows
    return Section(
        "Transfer between tasks",
        "AUROC [95% CI] of the probe fitted on one task's train split (row) scoring another task's labelled test "
        f"rows (column); the diagonal is each task's own evaluation. Test rows per task: {n}. Every cell's "
        "per-row scores are in transfer/scores/TRAIN__TEST.jsonl, from which it recomputes.",
        ["train \\ test", *names], rows)
