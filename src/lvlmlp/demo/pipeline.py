"""`lvlmlp demo`: the whole method on the embedded default, on CPU, in minutes.

The embedded default is a seeded synthetic world (`lvlmlp.demo.world`) and a tiny LLaVA-format model trained on it
(`lvlmlp/demo/assets/demo_model`, made by `scripts/train_demo_model.py`). The demo is `lvlmlp run` on one demo
config per task analogue (`demo_config`: the registered task `world-ANALOGUE`, the probe, the baselines, token
decay and, on safety and answerability, probe-guided decoding), each in its own run folder `OUT/ANALOGUE/` (with
its `config.yaml`: `lvlmlp run OUT/safety/config.yaml` reuses every step), all served by one loaded model. Its
figures (`results.json`, the summary table, `report.html`) are read from those folders' evaluations and analyses,
so every number recomputes from `OUT/ANALOGUE/evals/default/scores.jsonl`. Then it compares LoRA finetuning with the
probe on four analogues. The numbers show the method working on a toy model; they are not the paper's numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.demo import world
from lvlmlp.errors import LvlmlpError
from lvlmlp.outputs import read_json, write_text_atomic
from lvlmlp.study.layout import RunLayout

log = logging.getLogger("lvlmlp")

# One answer token per analogue for the one-token-probability baseline, and whether its probability speaks for
# label 0 (then the score is 1 - p, so that higher always means label 1, like the probe's score).
TOKEN_BASELINE = {
    "answerability": ("Unanswerable", True),
    "safety": ("Sorry", True),
    "deception": ("There", True),
    "hallucination": ("Yes", False),
}
OWN_ANSWER = "own-answer:task"  # the model's answer read by the analogue's own rule (`world.task_label_of_response`)
# Probe-guided decoding: what a flagged row is made to start with (words the tiny model's tokenizer knows).
GUARD_TEMPLATES = {"safety": world.A_REFUSAL, "answerability": world.A_UNANSWERABLE}
# Finetuning vs probing (the paper's last comparison): LoRA on this many of each analogue's train rows, for a few
# epochs, so that it fits the demo's CPU budget; the probe it is compared with uses the whole train split.
FINETUNE_ROWS, FINETUNE_EPOCHS = 32, 2
DECAY_N_BOOT = 200  # bootstrap resamples of the token-decay intervals (the main intervals take the default 1000)
PROMPT = "default"  # the prompt name of every demo config (the world tasks' own question wording)


def demo_model_path() -> Path:
    path = Path(str(resources.files("lvlmlp.demo") / "assets" / "demo_model"))
    if not (path / "config.json").is_file():
        raise LvlmlpError(f"{path}: the demo checkpoint is missing; build it with scripts/train_demo_model.py")
    return path


def one_token_baseline(task: str) -> str:
    """The one-token baseline of an analogue as a baseline name (token-prob:!W reads 1 - P(W))."""
    text, negate = TOKEN_BASELINE[task]
    return f"token-prob:{'!' if negate else ''}{text}"


def demo_signals(task: str, max_new_tokens: int) -> dict[str, Any] | None:
    """The *Which signal?* study of a binary analogue (docs/signals.md): MTRE over the generated tokens, the
    final-norm state, the mean-pooled vision features, the sequence estimators and P(True). Left out to keep the demo
    short: the mlp probe (the slowest to fit) and a layer list (the demo model has 3 layers; `hidden` is the last)."""
    if task == "classification":  # multiclass: no AUROC to compare
        return None
    return {"probes": [{"feature": "multi-token", "tokens": max_new_tokens, "probe": "mtre"}, {"feature": "hidden"},
                       {"feature": "vision"}],
            "baselines": ["seq-prob", "mean-entropy", "perplexity", "p-true"]}


def demo_config(task: str, out: str | Path, *, n_train: int = 200, n_test: int = 200, max_new_tokens: int = 5,
                batch_size: int = 32, seed: int = 0, model: str | Path | None = None, device: str = "cpu",
                steer: bool = True) -> Any:
    """The `lvlmlp run` config of one analogue: run folder `out/TASK`, images under `out/images/TASK`."""
    from lvlmlp.study.config import ExperimentConfig, build, validate

    out = Path(out).resolve()
    if task == "classification":  # the paper's many-class probe; the own answer is the class it names
        probe: dict[str, Any] = {"kind": "multinomial", "epochs": 60, "batch_size": 64, "lr": 0.05, "seed": seed}
        baselines = [OWN_ANSWER]
    else:
        probe = {"kind": "logistic", "max_iter": 1000}
        baselines = [OWN_ANSWER] if task != "uncertainty" else []  # uncertainty: the own answer *is* the label
        baselines.append(one_token_baseline(task) if task in TOKEN_BASELINE else "max-prob")
    cfg = build(ExperimentConfig, {
        "name": f"lvlmlp demo: {task}", "model": str(model or demo_model_path()), "device": device,
        "dtype": "float32", "task": f"world-{task}",
        # the world's images (written by its task) beside the runs, not around them: an `lvlmlp run` output may not
        # lie inside its data_root
        "data_root": str(out / "images"), "image_root": str(out / "images" / task),
        "task_options": {"n_train": n_train, "n_test": n_test, "world_seed": seed}, "seed": seed,
        "batch_size": batch_size, "extract": {"max_new_tokens": max_new_tokens, "store_dtype": "float32",
                                              "hidden": task != "classification",
                                              "vision": task != "classification"},
        "probe": probe, "baselines": baselines, "signals": demo_signals(task, max_new_tokens),
        "analyses": {"token_decay": task != "classification", "layer_sweep": False, "n_boot": DECAY_N_BOOT},
        "steering": {"template": GUARD_TEMPLATES[task]} if steer and task in GUARD_TEMPLATES else None,
        "out": str(out / task)})
    validate(cfg)
    return cfg


def run_demo(out: str | Path, *, n_train: int = 200, n_test: int = 200, max_new_tokens: int = 5,
             batch_size: int = 32, seed: int = 0, model: str | Path | None = None, device: str = "cpu",
             progress: bool = True, steer: bool = True, finetune_rows: int = FINETUNE_ROWS) -> dict:
    """Run every analogue's config (`run_experiment`, one model for all); write `out/results.json` and
    `out/report.html` from their outputs; return the results."""
    from tqdm.auto import tqdm

    from lvlmlp.outputs import claim_folder
    from lvlmlp.study.experiment import LazyBackend

    out = claim_folder(out, "demo")  # new, empty or a demo folder: the user's results.json is never overwritten
    t0 = time.perf_counter()
    configs = {task: demo_config(task, out, n_train=n_train, n_test=n_test, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, seed=seed, model=model, device=device, steer=steer)
               for task in world.TASKS}
    shared = LazyBackend(configs[world.TASKS[0]])  # loaded by the first step that needs the model, if any
    # One bar for the whole demo (a step per analogue and per finetuned analogue), not one per extraction.
    bar = tqdm(total=len(configs) + (len(TOKEN_BASELINE) if finetune_rows else 0), desc="lvlmlp demo",
               unit="step", disable=not progress, dynamic_ncols=True)
    # With the bar, the steps' own log lines (a dozen per analogue) stay quiet; warnings still show.
    level = log.level
    if progress:
        log.setLevel(max(logging.WARNING, level))
    try:
        results = _run_analogues(out, configs, shared, bar, finetune_rows, batch_size, seed)
    finally:
        log.setLevel(level)
        bar.close()
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    write_report(results, out)
    return results


def _run_analogues(out: Path, configs: dict[str, Any], shared: Any, bar: Any, finetune_rows: int,
                   batch_size: int, seed: int) -> dict:
    import yaml

    from lvlmlp.study.experiment import run_experiment

    for task, cfg in configs.items():
        bar.set_postfix_str(f"{task}: extract, probe, analyses")
        log.info("demo: %s (%d + %d rows)", task, cfg.task_options["n_train"], cfg.task_options["n_test"])
        run_experiment(cfg, progress=False, backend=shared)
        (out / task / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        bar.update()
    results = collect_results(out, configs)
    if finetune_rows:
        results["finetune"] = finetune_vs_probe(out, results["model"], finetune_rows, batch_size, seed, bar)
    return results


# ------------------------------------------------------------------------------------------------ results
def _eval(out: Path, task: str) -> tuple[dict, list[dict]]:
    """An analogue's main evaluation: metrics.json and scores.jsonl of `OUT/TASK/evals/default`."""
    from lvlmlp.study.report import load_eval

    return load_eval(RunLayout(out / task).eval(PROMPT))


_FIGURES = ("auroc", "auprc", "accuracy", "f1", "threshold", "n", "n_positive", "auroc_ci", "accuracy_ci")


def _figures(metrics: dict) -> dict:
    return {k: metrics[k] for k in _FIGURES if k in metrics}


def collect_results(out: Path, configs: dict[str, Any]) -> dict:
    """results.json's figures, read from each analogue's run folder (evaluation metrics and analyses)."""
    first = next(iter(configs.values()))
    opts = first.task_options
    results: dict = {"model": str(first.model), "seed": first.seed, "n_train": opts["n_train"],
                     "n_test": opts["n_test"], "max_new_tokens": first.extract.max_new_tokens, "tasks": {},
                     "steering": {}}
    for task in configs:
        metrics, records = _eval(out, task)
        base = metrics.get("baselines") or {}
        entry: dict = {"n_train": metrics["n_train"], "n_test": metrics["n"]}
        if task == "classification":
            y = np.array([r["label"] for r in records])
            entry["probe"] = {"accuracy": metrics["accuracy"]}
            entry["own_answer"] = {"accuracy": base[OWN_ANSWER]["accuracy"]}
            entry["chance"] = float(np.bincount(y).max() / y.size)
            results["tasks"][task] = entry
            continue
        entry["probe"] = _figures(metrics)
        if OWN_ANSWER in base:
            entry["own_answer"] = _figures(base[OWN_ANSWER])
        if task in TOKEN_BASELINE:
            entry["token_prob"] = {"token": TOKEN_BASELINE[task][0], **_figures(base[one_token_baseline(task)])}
        else:
            entry["max_prob"] = _figures(base["max-prob"])
        decay = read_json(RunLayout(out / task).analysis("token_decay", PROMPT))
        entry["token_decay"] = [{"token": e["token"], "auroc": e["value"], "auroc_ci": e["ci"],
                                 "n_train": e.get("n_train", 0), "n_test": e["n"]} for e in decay["tokens"]]
        results["tasks"][task] = entry
    for task in GUARD_TEMPLATES:  # in the order the summary has always printed them
        path = RunLayout(out / task).analysis("steering", PROMPT)
        if configs[task].steering is not None and path.is_file():
            results["steering"][task] = read_json(path)
    return results


def finetune_vs_probe(out: Path, model: str, n_rows: int, batch_size: int, seed: int, bar: Any = None) -> dict:
    """LoRA-finetune the demo model on each analogue's first `n_rows` train rows (targets: the answers the demo
    model was trained to give) and compare its own answer and answer-token probability with the probe, on the same
    test rows (`lvlmlp.study.finetune.compare`; the probe on the finetuned model's logits is left out for time).
    `lvlmlp run`'s `finetune:` section finetunes on the whole train split with fixed answer words, so the demo calls
    `compare` itself; like a run's step, a comparison whose settings and inputs are unchanged is reused. `bar`: the
    demo's tqdm bar, advanced once per analogue."""
    from functools import partial

    from lvlmlp.extraction.store import open_run
    from lvlmlp.study.finetune import Readout, Settings, compare
    from lvlmlp.study.steps import Steps, cached
    from lvlmlp.tasks import get_task

    def target(task: str, row: dict) -> str:
        if task == "safety":
            return world.A_COMPLY if row["label"] else world.A_REFUSAL
        if task == "answerability" and row["label"] == 0:
            return world.A_UNANSWERABLE
        return str(row["answer"])  # hallucination: yes/no; deception: the answer, or the premise's correction

    result = {}
    settings = Settings(epochs=FINETUNE_EPOCHS, lr=3e-3, batch_size=16, seed=seed)
    for task, (token, negate) in TOKEN_BASELINE.items():
        runs = {s: open_run(RunLayout(out / task).run(PROMPT, s)) for s in ("train", "test")}
        images = out / "images" / task
        _, records = _eval(out, task)
        probe = {r["id"]: r["score"] for r in records}
        tuned = [{**m, "image": str(images / f"{m['id']}.png")} for m in runs["train"].meta[:n_rows]]
        tuned = [{**r, "target": target(task, r)} for r in tuned]
        test = [{**m, "image": str(images / f"{m['id']}.png")} for m in runs["test"].meta if m["id"] in probe]
        folder = RunLayout(out).finetune / task  # the demo's own comparisons, beside the analogues
        base = np.array([probe[r["id"]] for r in test])
        key = hashlib.sha256(json.dumps([model, n_rows, str(settings), batch_size, base.tolist(),
                                         [r.manifest.get("created_at") for r in runs.values()]]).encode())
        compute = partial(compare, model, tuned, test, [r["target"] for r in tuned], folder, settings,
                          Readout(token, negate, get_task(f"world-{task}").answer_fn), base, device="cpu",
                          dtype="float32", max_new_tokens=3, batch_size=batch_size, every_epoch=False,
                          tuned_probe=False, n_boot=200, progress=False)
        log.info("demo: finetuning vs probing on %s (%d train rows)", task, len(tuned))
        if bar is not None:
            bar.set_postfix_str(f"{task}: LoRA finetuning")
        result[task] = cached(Steps(folder), "comparison", key.hexdigest()[:20], folder / "comparison.json", compute)
        if bar is not None:
            bar.update()
    return result


def finetune_table(results: dict) -> list[str]:
    """The demo's finetuned-vs-probe table (Markdown lines; none when the demo ran without finetuning)."""
    if not results.get("finetune"):
        return []
    first = next(iter(results["finetune"].values()))
    names = list(first["methods"])
    lines = ["", f"Finetuning (LoRA, {first['n_finetune_rows']} train rows, {first['epochs']} epochs) vs probing, "
             "test AUROC:", "", "| analogue | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task, r in results["finetune"].items():
        lines.append(f"| {task} | " + " | ".join(_fmt(r["methods"][n]["auroc"]) for n in names) + " |")
    return lines


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summary_table(results: dict) -> str:
    """The compact results table printed by `lvlmlp demo` (Markdown)."""
    lines = ["| analogue (paper task) | probe AUROC [95% CI] | own answer AUROC | one-token AUROC | "
             "probe AUROC by token 0..K-1 (rows) |", "|---|---|---|---|---|"]
    paper = {"answerability": "VizWiz", "safety": "MM-SafetyBench", "deception": "MAD-Bench",
             "uncertainty": "MathVista", "hallucination": "POPE", "classification": "ImageNet"}
    for task, e in results["tasks"].items():
        if task == "classification":
            lines.append(f"| {task} ({paper[task]}) | top-1 acc {_fmt(e['probe']['accuracy'])} | "
                         f"top-1 acc {_fmt(e['own_answer']['accuracy'])} | chance {_fmt(e['chance'])} | - |")
            continue
        ci = e["probe"].get("auroc_ci")
        ci_s = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        own = _fmt(e["own_answer"]["auroc"]) if "own_answer" in e else "(is the label)"
        one = e.get("token_prob") or e.get("max_prob") or {}
        one_s = f"{_fmt(one.get('auroc'))} ({one.get('token', 'max-prob')})"
        # A point on fewer rows than the test split (answers that ended earlier) says on how many.
        decay = " / ".join(_fmt(p["auroc"]) + (f" (n={p['n_test']})" if p["n_test"] < e["n_test"] else "")
                           for p in e["token_decay"])
        lines.append(f"| {task} ({paper[task]}) | {_fmt(e['probe']['auroc'])}{ci_s} | {own} | {one_s} | {decay} |")
    lines += ["", "Token 0 is the first generated token. A decay cell on fewer rows than the test split gives their count "
              "(n=K: answers that ended earlier); - means no AUROC (those rows hold one class only, or none).",
              *finetune_table(results)]
    for task, s in results.get("steering", {}).items():
        b, a = s["before"], s["after"]
        lines.append("")
        lines.append(f"Probe-guided decoding on {task} ({s['flagged']} flagged): label-0 rows answered "
                     f"{b['label0_answered']}/{b['n_label0']} -> {a['label0_answered']}/{a['n_label0']}, "
                     f"label-1 rows refused {b['label1_refused']}/{b['n_label1']} -> "
                     f"{a['label1_refused']}/{a['n_label1']}")
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """One plain sentence per analogue: the probe against the model's own answer and the best baseline (printed by
    `lvlmlp demo` after the summary, not in summary.md: a verdict's words can flip on another CPU where two AUROCs
    are within a rounding of each other, and the README's copy of summary.md is checked on any CPU)."""

    out = []
    for task, e in results["tasks"].items():
        if task == "classification":
            p, o = e["probe"]["accuracy"], e["own_answer"]["accuracy"]
            word = "beats" if p > o else "does NOT beat"
            out.append(f"- {task}: the probe {word} the model's own answer (top-1 {p:.3f} vs {o:.3f}).")
            continue
        if e["probe"]["auroc"] is not None:
            out.append(f"- {task}: probe AUROC {e['probe']['auroc']:.3f} {_verdict_words(e)}.")
    return out


def _baselines(e: dict) -> dict[str, float | None]:
    """An analogue's baselines by the names the summary uses (the own answer first, as the paper compares)."""
    names = {"own_answer": "model's own answer", "max_prob": "max-prob"}
    out = {names[k]: e[k]["auroc"] for k in names if k in e}
    if "token_prob" in e:
        out[f"one-token ({e['token_prob']['token']})"] = e["token_prob"]["auroc"]
    return out


GALLERY_ROWS = 4  # example test rows per analogue in the report (two of each label when there are)


def report_blocks(results: dict, out: Path) -> list:
    """The demo's report, in the blocks of `lvlmlp.study.report` (the renderer of every report)."""
    from lvlmlp.study.report import Glossary, Section, fmt_ci

    tasks = results["tasks"]
    rows = []
    for task, e in tasks.items():
        if task == "classification":
            rows.append([task, f"top-1 accuracy {_fmt(e['probe']['accuracy'])}",
                         f"top-1 accuracy {_fmt(e['own_answer']['accuracy'])}", f"chance {_fmt(e['chance'])}", "–"])
            continue
        own = fmt_ci(e["own_answer"]["auroc"], e["own_answer"].get("auroc_ci")) if "own_answer" in e else "(is the label)"
        one = e.get("token_prob") or e.get("max_prob") or {}
        rows.append([task, fmt_ci(e["probe"]["auroc"], e["probe"].get("auroc_ci")), own,
                     f"{_fmt(one.get('auroc'))} ({one.get('token', 'max-prob')})", _verdict_words(e)])
    blocks: list = [Section(
        "Summary", "Test AUROC of the first-token probe, the model's own answer and one token's probability "
        "(95% bootstrap intervals); the verdict compares the probe with the model's own answer (the paper's "
        "comparison; none where the own answer is the label) and with the best baseline.", ["analogue", "probe AUROC [95% CI]", "own answer AUROC [95% CI]",
                                      "one-token AUROC (token)", "verdict"], rows, anchor="summary")]
    blocks.append(Glossary(_glossary(results)))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    blocks.append(_roc_section(results, out, plots))
    blocks.append(_decay_section(results, plots))
    blocks += _steering_sections(results)
    blocks += _signals_section(results, out)
    blocks += _galleries(results, out)
    return blocks


def _signals_section(results: dict, out: Path) -> list:
    """*Which signal?*: every binary analogue's signals (its `lvlmlp run` folder's analyses/signals-default.json,
    computed by the `signals:` step) in one table, and each analogue's AUROC-against-cost plot."""
    from lvlmlp.study import signals as sg
    from lvlmlp.study.report import Section

    rows, pngs = [], []
    for task in results["tasks"]:
        path = RunLayout(out / task).analysis("signals", PROMPT)
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        rows += [[task, *row[:-1]] for row in sg.table_rows(res)]
        png = RunLayout(out / task).report / f"signals_{PROMPT}.png"
        if png.is_file():
            pngs.append(png)
    if not rows:
        return []
    return [Section("Which signal?", "Each binary analogue's test rows scored by several signals, against the "
                    "paper's first-token logistic probe (delta and DeLong's paired p), with what each costs per row: "
                    "forward passes before the signal is known, seconds (model timed in this run + reading and "
                    "scoring the stored features) and bytes stored. MTRE reads the generated tokens' logits; "
                    "P(True) asks the model whether its answer is right (a second pass). The mlp probe is left "
                    "out of the demo to keep it short. Plots: AUROC against seconds per row.",
                    ["analogue", *sg.HEADER[:-1]], rows, pngs, anchor="which-signal")]


def _verdict_words(e: dict) -> str:
    """The words of `study.report.comparisons`, with each baseline's AUROC (the report's and the summary's verdict)."""
    from lvlmlp.study.report import comparisons

    base = _baselines(e)
    named = {f"{b} {_fmt(v)}": v for b, v in base.items()}
    own = next((k for k in named if k.startswith("model's own answer")), None)
    return comparisons(e["probe"]["auroc"], e["probe"].get("auroc_ci"), named, own)


def _glossary(results: dict) -> list[tuple[str, str]]:
    from lvlmlp.probing.baselines import describe_baseline
    from lvlmlp.tasks import get_task

    items = []
    for task in results["tasks"]:
        if task == "classification":
            items.append(("classification: labels", "the index of the object's class (shape and colour) among "
                          f"{len(world.CLASS_NAMES)}; the probe is multinomial, its prediction the most probable class"))
            continue
        zero, one = get_task(f"world-{task}").label_names
        items.append((f"{task}: labels", f"1 = {one}, 0 = {zero}; the probe's score is P(label 1)"))
    items.append(("probe", "logistic regression on the first generated token's logits (all vocabulary entries), "
                  "trained on the train split"))
    items.append(("own answer", "the model's generated answer read as a label (e.g. a refusal or "
                  '"Unanswerable." reads as 0)'))
    items += [(f"one token ({task})", describe_baseline(one_token_baseline(task))) for task in TOKEN_BASELINE]
    items.append(("max-prob (uncertainty)", describe_baseline("max-prob")))
    return items


def _roc_section(results: dict, out: Path, plots: Path):
    """One ROC plot per binary analogue: probe and baselines, each named in the legend with its AUROC."""
    from lvlmlp.study.report import Section, plot_roc_curves

    pngs = []
    for task in (t for t in results["tasks"] if t != "classification"):
        _, recs = _eval(out, task)
        names = {OWN_ANSWER: "own answer", "max-prob": "max-prob"}
        if task in TOKEN_BASELINE:
            names[one_token_baseline(task)] = f"one token ({TOKEN_BASELINE[task][0]})"
        labels = [r["label"] for r in recs]
        curves = [("probe", labels, [r["score"] for r in recs])]
        curves += [(name, labels, [r["baselines"][key] for r in recs]) for key, name in names.items()
                   if key in recs[0].get("baselines", {})]
        pngs.append(plots / f"roc_{task}.png")
        plot_roc_curves(curves, pngs[-1], f"{task}: ROC on the test split")
    return Section("ROC curves", f"{results['n_test']} test rows per analogue; the legend gives each method's AUROC.",
                   [], [], pngs)


def _decay_section(results: dict, plots: Path):
    from matplotlib.ticker import MaxNLocator

    from lvlmlp.study.report import Section, pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=100)
    rows = []
    for task, e in results["tasks"].items():
        pts = [p for p in e.get("token_decay", []) if p["auroc"] is not None]
        if not pts:
            continue
        line, = ax.plot([p["token"] for p in pts], [p["auroc"] for p in pts], label=task)
        for p in pts:  # hollow: a point computed on fewer rows (answers that ended before that token)
            full = p["n_test"] == e["n_test"]
            ax.plot(p["token"], p["auroc"], "o", color=line.get_color(), fillstyle="full" if full else "none")
        rows.append([task, *(_fmt(p["auroc"]) + (f" (n={p['n_test']})" if p["n_test"] < e["n_test"] else "")
                             for p in e["token_decay"])])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # The y-axis spans chance to 1, so that a drop looks as large as it is (an autoscaled axis from 0.78 did not).
    low = min([0.5] + [p["auroc"] for e in results["tasks"].values() for p in e.get("token_decay", [])
                       if p["auroc"] is not None])
    ax.set(title="probe AUROC by generated token (hollow: fewer rows)", xlabel="generated token (0 = the first)",
           ylabel="AUROC", ylim=(max(0.0, low - 0.05), 1.02))
    ax.legend(fontsize=8, loc="best")
    png = plots / "token_decay.png"
    save_figure(fig, png)
    k = max((len(e.get("token_decay", [])) for e in results["tasks"].values()), default=0)
    return Section("Probe AUROC by generated token", "A probe trained and tested on token t's logits, for t = 0.."
                   f"{k - 1} (0 = the first generated token); a point on fewer rows than the test split says on "
                   "how many, and - means no AUROC: those rows hold one class only, or no train row reached the token.",
                   ["analogue", *(f"token {t}" for t in range(k))],
                   [r + ["–"] * (k + 1 - len(r)) for r in rows], [png])


def _steering_sections(results: dict) -> list:
    from lvlmlp.study.report import Section
    from lvlmlp.study.sections import STEERING_HEADER, steering_row

    out = []
    if results.get("steering"):
        out.append(Section("Probe-guided decoding", "At the first decoding step, a row the probe flags (score < 0.5) "
                           "is made to start with the template; counts without the guard -> with it.",
                           ["analogue", *STEERING_HEADER[1:]],
                           [steering_row(task, s) for task, s in results["steering"].items()]))
    if results.get("finetune"):
        first = next(iter(results["finetune"].values()))
        names = list(first["methods"])
        out.append(Section("Finetuning vs probing", f"LoRA on {first['n_finetune_rows']} train rows, "
                           f"{first['epochs']} epochs, against the probe; test AUROC.", ["analogue", *names],
                           [[task, *(_fmt(r["methods"][n]["auroc"]) for n in names)]
                            for task, r in results["finetune"].items()]))
    return out


def _galleries(results: dict, out: Path) -> list:
    """A few test rows of each analogue: image, question, the model's answer, label, probe score, flagged."""
    from lvlmlp.extraction.store import open_run
    from lvlmlp.study.report import Gallery

    galleries = []
    for task in results["tasks"]:
        run = open_run(RunLayout(out / task).run(PROMPT, "test"))
        meta = {m["id"]: (m, r) for m, r in zip(run.meta, run.responses)}
        _, recs = _eval(out, task)
        by_label: dict = {}
        for r in recs:
            by_label.setdefault(r["label"], []).append(r)
        per = max(1, GALLERY_ROWS // max(1, min(2, len(by_label))))
        picked = [r for lab in sorted(by_label)[:2] for r in by_label[lab][:per]][:GALLERY_ROWS]
        rows = []
        for r in picked:
            m, response = meta[r["id"]]
            png = (out / "images" / task / f"{r['id']}.png").read_bytes()
            if task == "classification":
                got = f"class {r['pred']} ({world.CLASS_NAMES[r['pred']]})"
                rows.append((png, [m["question"], response or "", f"{r['label']} "
                                   f"({world.CLASS_NAMES[r['label']]})", got, "–"]))
            else:
                rows.append((png, [m["question"], response or "", f"{r['label']}", _fmt(r["score"]),
                                   "flagged" if r["score"] < 0.5 else "not flagged"]))
        galleries.append(Gallery(f"Examples: {task}", "Test rows; a row is flagged when the probe's score "
                                 "P(label 1) is below 0.5.", ["question", "model answer", "label",
                                                               "probe score" if task != "classification"
                                                               else "probe prediction", "flagged"], rows))
    return galleries


def write_report(results: dict, out: Path) -> None:
    """`out/report.html`: the demo's report through the renderer of every report (`lvlmlp.study.report`)."""
    from lvlmlp.study.report import render_html

    intro = (f"Synthetic world + tiny LLaVA-format model ({results['model']}); {results['n_train']} train / "
             f"{results['n_test']} test rows per analogue; {results['seconds']} s. These numbers show the method "
             "working on a toy model, not the paper's numbers.")
    write_text_atomic(out / "report.html", render_html("lvlmlp demo", intro, report_blocks(results, out)))
