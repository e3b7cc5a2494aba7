"""Commands `probe train`, `probe eval`, `report` and `import-legacy`: flag parsing plus the glue between a run,
its feature views, the probes, the metrics and the baselines."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.errors import LvlmlpError
from lvlmlp.features import FEATURE_KINDS, FeatureView, RowSubset, valid_rows
from lvlmlp.metrics import binary_report, group_metrics

log = logging.getLogger(__name__)

N_BOOT = 1000


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


def _where(run: Any, split: str | None) -> str:
    return f"{run.path}" + (f" split {split!r}" if split else "")


# ---------------------------------------------------------------- probe train
def make_probe(args: argparse.Namespace, n_classes: int) -> Any:
    from lvlmlp.probes import LDAProbe, LogisticProbe, MultinomialProbe

    kind = args.probe or ("logistic" if n_classes == 2 else "multinomial")
    if kind == "logistic":
        return LogisticProbe(C=args.C, standardize=bool(args.standardize), class_weight=args.class_weight,
                             max_iter=args.max_iter, threshold=args.threshold)
    if kind == "lda":
        return LDAProbe(device=args.device, threshold=args.threshold)
    return MultinomialProbe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, standardize=True if args.standardize is None
                            else args.standardize, device=args.device, seed=args.seed, threshold=args.threshold)


def train_probe(args: argparse.Namespace) -> int:
    from lvlmlp.store import open_run

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
    probe = make_probe(args, classes.size)
    view = FeatureView(run, kind=args.feature, token=args.token, layer=args.layer)
    # Every probe reads the rows chunk by chunk (the scikit-learn ones copy them into RAM as they go).
    probe.fit(RowSubset(view, idx), y.astype(np.int64), spec=view.spec, label_names=run.manifest.get("label_names"))
    probe.fit_info_.update(run=str(run.path), split=args.split)
    probe.save(args.out)
    print(f"{type(probe).__name__} trained on {idx.size} rows ({view.spec.describe()}) -> {args.out}")
    return 0


# ---------------------------------------------------------------- probe eval




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
) -> dict[str, Any]:
    """Write a `probe eval` folder: `scores.jsonl` (one record per scored row) and `metrics.json` (probe and
    baselines on the labelled rows). `score` is P(classes[-1]) (n,) for a binary probe, (n, C) for multiclass;
    `labels` has NaN for unlabelled rows (scored, not measured). `lvlmlp run` writes its evaluations here too."""
    from lvlmlp.baselines import baseline_scores
    from lvlmlp.data import write_jsonl
    from lvlmlp.metrics import top1_accuracy

    labelled = ~np.isnan(labels)
    meta = [run.meta[i] for i in idx]
    metrics: dict[str, Any] = {"task": "binary" if score.ndim == 1 else "multiclass", **header}
    records = [{"id": run.ids[i], "label": None if np.isnan(lab) else int(lab)} for i, lab in zip(idx, labels)]
    for rec, m in zip(records, meta):
        rec.update({k: m[k] for k in ("scenario", "category") if m.get(k) is not None})
    if score.ndim == 1:
        for rec, v in zip(records, score):
            rec["score"] = float(v)
        base = {name: baseline_scores(run, name, idx, token=token) for name in baselines}
        for name, b in base.items():
            for rec, v in zip(records, b):
                rec.setdefault("baselines", {})[name] = float(v)
        if labelled.any():
            # Labels are 0/1 in the contract; map the probe's own two classes in case they were others.
            y = (labels[labelled] == classes[-1]).astype(np.int64)
            lab_meta = [m for m, keep in zip(meta, labelled) if keep]
            metrics.update(binary_report(y, score[labelled], threshold, n_boot, seed))
            metrics.update(group_metrics(lab_meta, y, score[labelled], threshold))
            metrics["baselines"] = {}
            for name, b in base.items():
                block = binary_report(y, b[labelled], 0.5, n_boot, seed)
                if _has_threshold(name):
                    block.update(group_metrics(lab_meta, y, b[labelled], 0.5))
                else:
                    block = {k: block[k] for k in ("auroc", "auprc", "auroc_ci", "n")}
                metrics["baselines"][name] = block
    else:
        if baselines:
            raise LvlmlpError("baselines are defined for binary probes only")
        pred = classes[np.argmax(score, axis=1)]
        for rec, p, row in zip(records, pred, score):
            rec.update(pred=int(p), score=float(row.max()))
        if labelled.any():
            metrics.update(accuracy=top1_accuracy(labels[labelled].astype(np.int64), pred[labelled]),
                           n=int(labelled.sum()))
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "scores.jsonl", records)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def eval_probe(args: argparse.Namespace) -> int:
    from lvlmlp.probes import load_probe
    from lvlmlp.store import open_run

    probe = load_probe(args.probe)
    run = open_run(args.run)
    spec = probe.spec_
    if spec is None:
        raise LvlmlpError(f"{args.probe}: probe.json has no feature spec")
    view = FeatureView(run, kind=spec.kind, token=spec.token, layer=spec.layer)
    probe.check_compatible(view.spec)
    idx, skipped = select_rows(run, args.split, spec.kind, spec.token)
    if idx.size == 0:
        raise LvlmlpError(f"{_where(run, args.split)}: no rows to score")
    labels = run.labels[idx]
    proba = probe.predict_proba(RowSubset(view, idx))
    header = {
        "run": str(run.path),
        "split": args.split,
        "probe": {"dir": str(args.probe), "class": type(probe).__name__, "feature_spec": spec.to_dict(),
                  "threshold": probe.threshold},
        "n_scored": int(idx.size),
        "n_skipped": skipped,
    }
    metrics = write_eval(Path(args.out), run, idx, labels, proba[:, 1] if len(probe.classes_) == 2 else proba,
                         probe.classes_, probe.threshold, args.baseline or [], header, args.n_boot, args.seed,
                         token=spec.token)
    if np.isnan(labels).all():
        log.warning("%s has no labelled rows: scores written, no metrics", _where(run, args.split))
    summary = {k: metrics[k] for k in ("auroc", "auprc", "accuracy", "f1", "n") if k in metrics}
    print(json.dumps(summary))
    return 0


# ---------------------------------------------------------------- report / import-legacy
def report_cmd(args: argparse.Namespace) -> int:
    from lvlmlp.report import write_report

    write_report(args.eval_dirs, args.out)
    print(f"report -> {Path(args.out) / 'report.html'}")
    return 0


def import_legacy_cmd(args: argparse.Namespace) -> int:
    from lvlmlp.legacy import import_legacy

    run = import_legacy(args.file, args.out, vocab_size=args.vocab_size, max_tokens=args.max_tokens, judged=args.judged,
                        dtype=args.dtype, model=args.model)
    print(f"imported {len(run)} rows -> {run.path}")
    return 0


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def register_cli(subparsers: Any) -> None:
    probe = subparsers.add_parser("probe", help="train or evaluate a linear probe on a run")
    probe_sub = probe.add_subparsers(dest="probe_command", required=True, metavar="ACTION")

    train = probe_sub.add_parser("train", help="fit a probe on the labelled rows of a run")
    train.add_argument("--run", required=True, help="run folder (from extract or import-legacy)")
    train.add_argument("--split", help="train on rows whose 'split' is this (default: all rows)")
    train.add_argument("--token", type=_nonneg_int, default=0, help="generated token index (default 0: the first)")
    train.add_argument("--feature", choices=FEATURE_KINDS, default="logits", help="feature view (default logits)")
    train.add_argument("--layer", type=int, help="layer index for --feature layer")
    train.add_argument("--probe", choices=("logistic", "multinomial", "lda"),
                       help="default: logistic for 2 classes, multinomial for more")
    train.add_argument("--C", type=float, default=1.0, help="logistic: inverse L2 strength (default 1.0)")
    train.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                       help="standardise features (default: off for logistic, as in the paper; on for multinomial)")
    train.add_argument("--class-weight", choices=("balanced",), help="logistic: reweight classes")
    train.add_argument("--max-iter", type=int, default=100, help="logistic: solver iterations (default 100)")
    train.add_argument("--threshold", type=float, default=0.5, help="flag rows with P(label 1) below this")
    train.add_argument("--epochs", type=int, default=20, help="multinomial: passes over the data")
    train.add_argument("--batch-size", type=int, default=512, help="multinomial: rows per step")
    train.add_argument("--lr", type=float, default=1e-2, help="multinomial: Adam learning rate")
    train.add_argument("--weight-decay", type=float, default=1e-4, help="multinomial: L2 strength")
    train.add_argument("--device", default="cpu", help="multinomial and lda: cpu, cuda, cuda:N or auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="probe folder to write")
    train.set_defaults(func=train_probe)

    ev = probe_sub.add_parser("eval", help="score a run with a probe and compute metrics")
    ev.add_argument("--probe", required=True, help="probe folder")
    ev.add_argument("--run", required=True, help="run folder")
    ev.add_argument("--split", help="evaluate rows whose 'split' is this (default: all rows)")
    ev.add_argument("--baseline", action="append", metavar="NAME",
                    help="add a baseline (repeatable): own-answer[:refusal|yes|keyword=W], token-prob:STRING, "
                         "token-prob:!STRING, max-prob, entropy")
    ev.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ev.add_argument("--out", required=True, help="folder for metrics.json and scores.jsonl")
    ev.set_defaults(func=eval_probe)

    rep = subparsers.add_parser("report", help="Markdown/HTML report with plots from probe eval folders")
    rep.add_argument("eval_dirs", nargs="+", help="folders written by `probe eval`")
    rep.add_argument("--out", required=True, help="report folder")
    rep.set_defaults(func=report_cmd)

    imp = subparsers.add_parser("import-legacy", help="convert the paper's output JSON lines into a run folder")
    imp.add_argument("file", help="the paper's JSON lines (image, question, label, response, output_ids, logits)")
    imp.add_argument("--out", required=True, help="run folder to write")
    imp.add_argument("--vocab-size", type=int, help="expected logits per token (default: the first line's)")
    imp.add_argument("--max-tokens", type=int, help="keep at most this many tokens' logits per row")
    imp.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored logits dtype")
    imp.add_argument("--model", help="model path or hub id to record (default: the file's model_name)")
    imp.add_argument("--judged", metavar="MathV_output.json",
                     help="MathVista: the scored output file whose true_false labels a MathV.jsonl import")
    imp.set_defaults(func=import_legacy_cmd)
