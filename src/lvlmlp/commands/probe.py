"""`lvlmlp probe train`, `eval` and `compare`: fit a probe on a run's features; score a run with it; compare two
evaluations of the same rows."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from lvlmlp.defaults import FEATURE_KINDS, N_BOOT
from lvlmlp.errors import LvlmlpError
from lvlmlp.ranges import COUNT, NONNEG, PROBE_PARAMS, Range

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    probe = subparsers.add_parser("probe", help="train or evaluate a linear probe on a run")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True, metavar="ACTION")

    train = probe_sub.add_parser("train", help="fit a probe on the labelled rows of a run")
    train.add_argument("--run", required=True, help="run folder (from extract or import-legacy)")
    train.add_argument("--split", help="train on rows whose 'split' is this (default: all rows)")
    train.add_argument("--token", type=NONNEG, default=0, help="generated token index (default 0: the first)")
    train.add_argument("--feature", choices=FEATURE_KINDS, default="logits", help="feature view (default logits)")
    train.add_argument("--layer", type=int, help="layer index for --feature layer (default: the only stored layer)")
    train.add_argument("--tokens", type=COUNT, metavar="K", help="for --feature multi-token: the first K generated "
                       "tokens' logits side by side (rows with fewer get zeros for the others, and are counted; "
                       "no default: required there)")
    train.add_argument("--probe", metavar="KIND", help="logistic, multinomial, lda, mlp or mtre (lvlmlp.probing.probes.PROBES; "
                       "default: logistic for 2 classes, multinomial for more)")
    # Hyper-parameters default to None: the probe class's own defaults apply, and a flag the chosen probe does not
    # have is refused instead of silently ignored.
    hp = train.add_argument_group("probe hyper-parameters (each applies to the probes named)")
    hp.add_argument("--C", type=PROBE_PARAMS["C"], help="logistic: inverse L2 strength (default 1.0)")
    hp.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                    help="logistic, multinomial: standardise features (default: off for logistic, as in the paper; "
                         "on for multinomial)")
    hp.add_argument("--class-weight", choices=("balanced",), help="logistic: reweight classes (default: none)")
    hp.add_argument("--max-iter", type=PROBE_PARAMS["max_iter"], help="logistic: solver iterations (default 100)")
    hp.add_argument("--epochs", type=PROBE_PARAMS["epochs"], help="multinomial: passes over the data (default 20)")
    hp.add_argument("--batch-size", type=PROBE_PARAMS["batch_size"], help="multinomial: rows per step (default 512)")
    hp.add_argument("--lr", type=PROBE_PARAMS["lr"], help="multinomial: Adam learning rate (default 0.01)")
    hp.add_argument("--weight-decay", type=PROBE_PARAMS["weight_decay"], help="multinomial: L2 strength (default 1e-4)")
    hp.add_argument("--device", help="multinomial, lda: cpu, cuda, cuda:N or auto (default cpu)")
    hp.add_argument("--seed", type=PROBE_PARAMS["seed"], help="multinomial, mlp: seed of the mini-batch order (default 0)")
    hp.add_argument("--threshold", type=PROBE_PARAMS["threshold"], help="all: flag rows with P(label 1) below this (default 0.5)")
    hp.add_argument("--hidden", type=_layer_sizes, help="mlp: hidden layer sizes, comma-separated (default "
                    "512,256,128); --epochs is its maximum (default 200), --lr 1e-3, --batch-size 256, "
                    "--weight-decay 1e-4 (AdamW), --standardize on; --device and --seed apply")
    hp.add_argument("--head", choices=("logistic", "mlp"), help="mtre: the per-token classifier (default logistic; "
                    "--C, --max-iter apply to it, or --hidden (default 128,128,128), --epochs to mlp)")
    hp.add_argument("--patience", type=COUNT, help="mlp: stop after this many epochs without a better validation "
                    "loss (default 10)")
    hp.add_argument("--val-fraction", type=Range(float, 0, 1, hi_open=True), help="mlp: share of the train rows "
                    "held out for early stopping, per class, in [0, 1) (default 0.1; 0: no early stopping)")
    train.add_argument("--out", required=True, help="probe folder to write")
    train.set_defaults(func=train_probe)

    ev = probe_sub.add_parser("eval", help="score a run with a probe and compute metrics")
    ev.add_argument("--probe", required=True, help="probe folder")
    ev.add_argument("--run", required=True, help="run folder")
    ev.add_argument("--split", help="evaluate rows whose 'split' is this (default: all rows)")
    ev.add_argument("--baseline", action="append", metavar="NAME",
                    help="add a baseline (repeatable): own-answer[:refusal|yes|keyword=W|paper], token-prob:STRING, "
                         "token-prob:!STRING, max-prob, entropy, seq-prob, mean-entropy, perplexity")
    ev.add_argument("--task", metavar="NAME", help="add the per-group metrics of this registered task (e.g. "
                    "mmsafety: attack success rate per scenario; pope: POPE metrics per category); with "
                    "--prompt-style, the rule of own-answer:paper (default: what the run's manifest recorded)")
    ev.add_argument("--prompt-style", metavar="STYLE", help="the prompt style the run was extracted with, for "
                    "own-answer:paper (default: the run's manifest, when extracted with --task)")
    ev.add_argument("--group-by", action="append", metavar="FIELD=METRIC",
                    help="add per-group metrics (repeatable): group rows by their metadata FIELD and compute METRIC "
                         "on each group (attack-success-rate or pope)")
    ev.add_argument("--threshold", type=PROBE_PARAMS["threshold"], help="accuracy/F1 of the probe at this "
                    "P(label 1) (default: the probe's own threshold, probe.json)")
    ev.add_argument("--n-boot", type=NONNEG, default=N_BOOT,
                    help=f"bootstrap resamples for the 95%% intervals (0: none; default {N_BOOT})")
    ev.add_argument("--seed", type=NONNEG, default=0, help="bootstrap seed (default 0)")
    ev.add_argument("--out", required=True, help="folder for metrics.json and scores.jsonl")
    ev.set_defaults(func=eval_probe)

    cmp = probe_sub.add_parser("compare", help="paired comparison of two evaluations of the same rows (AUROC "
                               "difference, paired bootstrap interval, DeLong's test)")
    cmp.add_argument("eval_a", metavar="EVAL_A", help="evaluation folder (from probe eval)")
    cmp.add_argument("eval_b", metavar="EVAL_B", help="evaluation folder of the same rows")
    cmp.add_argument("--baseline-a", metavar="NAME", help="compare this baseline column of EVAL_A, not its probe")
    cmp.add_argument("--baseline-b", metavar="NAME", help="compare this baseline column of EVAL_B, not its probe")
    cmp.add_argument("--n-boot", type=int, default=N_BOOT, help="paired bootstrap resamples (default %(default)s)")
    cmp.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    cmp.add_argument("--out", metavar="FILE", help="write the result as JSON to FILE")
    cmp.set_defaults(func=compare_command)


# Flags of `probe train` that set a probe hyper-parameter of the same name.
_HYPER_FLAGS = ("C", "standardize", "class_weight", "max_iter", "epochs", "batch_size", "lr", "weight_decay",
                "device", "seed", "threshold", "hidden", "patience", "val_fraction", "head")


def _layer_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected sizes such as 512,256,128") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: layer sizes must be positive")
    return sizes


def make_probe(args: argparse.Namespace, n_classes: int) -> Any:
    """The probe of `--probe` (default: logistic for 2 classes, else multinomial) with the hyper-parameters given
    (`probes.make_probe`: one the chosen probe does not have is an error naming the flag)."""
    from lvlmlp.probing.probes import make_probe as make

    kind = args.probe or ("logistic" if n_classes == 2 else "multinomial")
    return make(kind, {name: getattr(args, name) for name in _HYPER_FLAGS if getattr(args, name, None) is not None},
                cli=True)


def _task_of(run: Any) -> str | None:
    """The registered task a run's rows came from (`extract --task`), None for a manifest (--data)."""
    return (run.manifest.get("selection") or {}).get("task")


def _where(run: Any, split: str | None) -> str:
    return f"{run.path}" + (f" split {split!r}" if split else "")


def train_probe(args: argparse.Namespace) -> int:
    import numpy as np

    from lvlmlp.extraction.store import open_run
    from lvlmlp.outputs import check_output
    from lvlmlp.probing.evaluate import select_rows
    from lvlmlp.probing.features import FeatureView, RowSubset

    check_output(args.out, "probe", {"--run": args.run})
    run = open_run(args.run)
    idx, _ = select_rows(run, args.split, args.feature, args.token)
    labels = run.labels[idx]
    idx, y = idx[~np.isnan(labels)], labels[~np.isnan(labels)]
    if idx.size == 0:
        raise LvlmlpError(f"{_where(run, args.split)}: no labelled rows to train on")
    classes = np.unique(y)
    if classes.size < 2:
        raise LvlmlpError(
            f"{_where(run, args.split)}: every labelled row has label {int(classes[0])}; a probe needs 2+ classes"
        )
    if args.probe == "logistic" and classes.size > 2:
        raise LvlmlpError(f"--probe logistic is binary but {_where(run, args.split)} has {classes.size} classes; "
                          "use --probe multinomial or lda")
    if classes.size == 2 and classes.tolist() != [0, 1]:
        # label 1 is the class a binary probe scores: {-1, 1} or {1, 2} would be a probe `probe eval` refuses
        raise LvlmlpError(f"{_where(run, args.split)}: a binary probe needs labels 0 and 1, the rows have "
                          f"{', '.join(f'{c:g}' for c in classes)}; relabel them 0/1 (1: the class to score)")
    if args.layer is not None and args.feature != "layer":
        raise LvlmlpError(f"--layer applies to --feature layer only (not --feature {args.feature})")
    if args.feature == "multi-token" and args.token != 0:
        raise LvlmlpError(f"--token {args.token} does not apply to --feature multi-token (it reads tokens 0..K-1 of "
                          "--tokens K)")
    probe = make_probe(args, classes.size)
    view = FeatureView(run, kind=args.feature, token=args.token, layer=args.layer, tokens=args.tokens)
    # Every probe reads the rows chunk by chunk (the scikit-learn ones copy them into RAM as they go).
    probe.fit(RowSubset(view, idx), y.astype(np.int64), spec=view.spec, label_names=run.manifest.get("label_names"))
    # the model's weights (hash) the features came from: probe eval refuses a run of other weights
    probe.fit_info_.update(run=str(run.path), split=args.split, weights_hash=run.manifest.get("weights_hash"),
                           task=_task_of(run), **_short_rows(run, idx, view.spec))
    probe.save(args.out)
    print(f"{type(probe).__name__} trained on {idx.size} rows ({view.spec.describe()}) -> {args.out}")
    return 0


def _short_rows(run: Any, idx: Any, spec: Any) -> dict[str, int]:
    """`multi-token` features: {"n_short": rows that generated fewer than K tokens} (kept, their missing tokens
    zeros), logged; nothing for the other kinds."""
    from lvlmlp.probing.features import MULTI_TOKEN, short_rows

    if spec.kind != MULTI_TOKEN:
        return {}
    n_short = short_rows(run, idx, spec.tokens)
    if n_short:
        log.warning("%d of %d row(s) of %s generated fewer than %d tokens: their missing tokens are zeros (as in "
                    "MTRE)", n_short, len(idx), run.path, spec.tokens)
    return {"n_short": n_short}


def eval_groups(args: argparse.Namespace) -> dict[str, str]:
    """Per-group metrics asked for: the task's `groups` (--task), then each --group-by FIELD=METRIC."""
    from lvlmlp.probing.metrics import check_groups

    groups: dict[str, str] = {}
    if args.task:
        from lvlmlp.tasks import get_task

        groups.update(get_task(args.task).groups)
    for item in args.group_by or []:
        key, sep, metric = item.partition("=")
        if not sep or not key.strip():
            raise LvlmlpError(f"--group-by {item!r}: expected FIELD=METRIC, e.g. scenario=attack-success-rate")
        groups[key.strip()] = metric.strip()
    return check_groups(groups, "--group-by")


def eval_probe(args: argparse.Namespace) -> int:
    import numpy as np

    from lvlmlp.extraction.store import open_run
    from lvlmlp.outputs import check_output
    from lvlmlp.probing.baselines import resolve_task_style
    from lvlmlp.probing.evaluate import select_rows, write_eval
    from lvlmlp.probing.features import FeatureView, RowSubset
    from lvlmlp.probing.probes import load_probe

    check_output(args.out, "eval", {"--probe": args.probe, "--run": args.run})
    probe = load_probe(args.probe)
    run = open_run(args.run)
    # own-answer:paper reads the task and prompt style: the flags', else the manifest's (a contradiction is refused)
    task, style = resolve_task_style(run, args.task, args.prompt_style)
    if args.prompt_style is not None:
        from lvlmlp.tasks import prompt_template

        if task is None:
            raise LvlmlpError("--prompt-style needs --task (or a run extracted with --task)")
        prompt_template(task, style)  # an unknown style is an error naming the task's styles
    spec = probe.spec_
    if spec is None:
        raise LvlmlpError(f"{args.probe}: probe.json has no feature spec")
    view = FeatureView(run, kind=spec.kind, token=spec.token, layer=spec.layer, tokens=spec.tokens)
    probe.check_compatible(view.spec)
    probe_task, run_task = (probe.fit_info_ or {}).get("task"), _task_of(run)
    if probe_task and run_task and probe_task != run_task:
        log.warning("%s was trained on task %s but %s holds rows of task %s: its scores may mean nothing there",
                    args.probe, probe_task, run.path, run_task)
    trained, scored = (probe.fit_info_ or {}).get("weights_hash"), run.manifest.get("weights_hash")
    if trained and scored and trained != scored:
        raise LvlmlpError(f"{args.probe}: trained on features of other model weights (weights hash {trained[:12]}) "
                          f"than {run.path} ({scored[:12]}): the model folder changed; extract and train again")
    idx, skipped = select_rows(run, args.split, spec.kind, spec.token)
    if idx.size == 0:
        raise LvlmlpError(f"{_where(run, args.split)}: no rows to score")
    labels = run.labels[idx]
    known = ~np.isnan(labels)
    foreign = known & ~np.isin(labels, probe.classes_)
    if foreign.any():
        first = int(np.flatnonzero(foreign)[0])
        raise LvlmlpError(f"{_where(run, args.split)}: row {run.ids[idx[first]]!r} has label {labels[first]:g}, which "
                          f"the probe cannot score (its classes: {', '.join(map(str, probe.classes_.tolist()))}; "
                          f"{int(foreign.sum())} such row(s))")
    proba = probe.predict_proba(RowSubset(view, idx))
    threshold = probe.threshold if args.threshold is None else args.threshold  # one threshold, the probe's by default
    header = {
        "run": str(run.path),
        "split": args.split,
        "probe": {"dir": str(args.probe), "class": type(probe).__name__, "feature_spec": spec.to_dict(),
                  "threshold": threshold},
        "n_scored": int(idx.size),
        "n_skipped": skipped,
        **_short_rows(run, idx, spec),
        "groups": eval_groups(args),
        "label_names": probe.label_names_,
    }
    metrics = write_eval(Path(args.out), run, idx, labels, proba[:, 1] if len(probe.classes_) == 2 else proba,
                         probe.classes_, threshold, args.baseline or [], header, args.n_boot, args.seed,
                         token=spec.token, task=task, style=style)
    if np.isnan(labels).all():
        log.warning("%s has no labelled rows: scores written, no metrics", _where(run, args.split))
    print(eval_table(metrics, type(probe).__name__))
    return 0


def eval_table(metrics: dict, probe_name: str) -> str:
    """What `probe eval` prints: the probe and each baseline, AUROC [95% CI] (accuracy for many classes), and n."""
    from lvlmlp.study.report import fmt_ci

    if "auroc" not in metrics:  # many classes, or no labelled rows
        acc = metrics.get("accuracy")
        return f"{probe_name}: " + ("no labelled rows" if acc is None else f"accuracy {fmt_ci(acc, None)}") + \
            f" (n={metrics.get('n', 0)}); metrics.json has the rest"
    rows = [(f"probe ({probe_name})", fmt_ci(metrics["auroc"], metrics.get("auroc_ci")))]
    rows += [(name, fmt_ci(b.get("auroc"), b.get("auroc_ci"))) for name, b in (metrics.get("baselines") or {}).items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  AUROC [95% CI]  (n={metrics['n']} rows)"]
    return "\n".join(lines + [f"{name:<{width}}  {value}" for name, value in rows])


def compare_command(args: argparse.Namespace) -> int:
    import json
    import os

    from lvlmlp.probing.compare import compare_evals, describe

    if args.n_boot < 1:
        raise LvlmlpError(f"--n-boot {args.n_boot}: must be 1 or more")
    result = compare_evals(args.eval_a, args.eval_b, args.baseline_a, args.baseline_b, args.n_boot, args.seed)
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise LvlmlpError(f"--out {out}: is a folder; give a file name, e.g. {out / 'compare.json'}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")  # renamed into place: an interrupted write leaves the old file
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        os.replace(tmp, out)
    print(describe(result))
    return 0
