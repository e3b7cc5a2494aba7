"""`lvlmlp run CONFIG.yaml`: a whole experiment (extract, probes, analyses, report) from a YAML config."""

from __future__ import annotations

import argparse
from pathlib import Path

from lvlmlp.ranges import COUNT, NONNEG


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a whole experiment from a YAML config (extract, probes, report)")
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, repeatable: --set extract.max_new_tokens=5")
    p.add_argument("--model", help="override `model`")
    p.add_argument("--out", help="override `out`")
    p.add_argument("--device", help="override `device` (auto, cpu, cuda, cuda:N)")
    p.add_argument("--limit", type=COUNT, help="override `limit` (seeded random N rows per split)")
    p.add_argument("--batch-size", type=COUNT, help="override `batch_size` (rows per forward)")
    p.add_argument("--n-boot", type=NONNEG, help="override `n_boot` (bootstrap resamples)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (ours and transformers')")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lvlmlp.commands._args import silence_progress_bars
    from lvlmlp.outputs import check_output
    from lvlmlp.study.experiment import load_config, run_experiment
    from lvlmlp.study.report import POOLED, fmt_value
    from lvlmlp.study.sections import headline

    cfg = load_config(args.config, args.set or [], model=args.model, out=args.out, device=args.device,
                      limit=args.limit, batch_size=args.batch_size, n_boot=args.n_boot)
    inputs = {"model": cfg["model"], "data_root": cfg["data_root"], "image_root": cfg["image_root"]}
    for i, task in enumerate(cfg.tasks):  # `tasks:` entries name their own data
        inputs.update({f"tasks[{i}].{k}": task.get(k) for k in ("data_root", "image_root")})
    # A config kept in its own run folder (the demo's OUT/TASK/config.yaml) is fine: `lvlmlp run` writes only its
    # own entries there (runs/, evals/, ...), never a config file.
    if Path(cfg["out"]).resolve() not in Path(args.config).resolve().parents:
        inputs["the config"] = args.config
    check_output(cfg["out"], "experiment", inputs, "out")
    if args.no_progress:
        silence_progress_bars()
    doc = run_experiment(cfg, progress=not args.no_progress)
    for name, metrics in doc["evaluations"].items():
        head = headline(metrics)
        # k-fold: the mean of the folds, then the pooled out-of-fold figure
        label = f" ({head['label']}; {POOLED} {fmt_value(head['pooled']['value'])})" if "pooled" in head else ""
        print(f"{name}: {head['metric']} {fmt_value(head['value'])}{label} (n={head['n']})")
    print(f"report -> {Path(cfg['out']) / 'report' / 'report.html'}")
    return 0
