"""`lvlmlp demo`: the whole method on the embedded default, on CPU, in minutes.

The embedded default is a seeded synthetic world (`lvlmlp.demo.world`) and a tiny LLaVA-format model trained on it
(`lvlmlp/demo/assets/demo_model`, made by `scripts/train_demo_model.py`). For each of the six task analogues we
extract the first K tokens' raw logits and the model's answer, train a probe on the train split's first-token
logits, and compare it on the test split with the model's own answer and one answer token's probability; then we
show how the probe's AUROC changes from token 1 to token K, and run probe-guided decoding on the safety and
answerability analogues. Every score is saved, so every number in `results.json` recomputes from `scores/`.
The numbers show the method working on a toy model; they are not the paper's numbers.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path

import numpy as np

from lvlmlp.demo import world
from lvlmlp.errors import LvlmlpError

log = logging.getLogger("lvlmlp")

# One answer token per analogue for the one-token-probability baseline, and whether its probability speaks for
# label 0 (then the score is 1 - p, so that higher always means label 1, like the probe's score).
TOKEN_BASELINE = {
    "answerability": ("Unanswerable", True),
    "safety": ("Sorry", True),
    "deception": ("There", True),
    "hallucination": ("Yes", False),
}
# Probe-guided decoding: what a flagged row is made to start with (words the tiny model's tokenizer knows).
GUARD_TEMPLATES = {"safety": world.A_REFUSAL, "answerability": world.A_UNANSWERABLE}
BINARY_TASKS = ("answerability", "safety", "deception", "uncertainty", "hallucination")
# Finetuning vs probing (the paper's last comparison): LoRA on this many of each analogue's train rows, for a few
# epochs, so that it fits the demo's CPU budget; the probe it is compared with uses the whole train split.
FINETUNE_ROWS, FINETUNE_EPOCHS = 32, 2


def demo_model_path() -> Path:
    path = Path(str(resources.files("lvlmlp.demo") / "assets" / "demo_model"))
    if not (path / "config.json").is_file():
        raise LvlmlpError(f"{path}: the demo checkpoint is missing; build it with scripts/train_demo_model.py")
    return path


def _own_answer(task: str, responses: list[str], rows: list[dict]) -> np.ndarray:
    return np.array([world.task_label_of_response(task, r, row) for r, row in zip(responses, rows)], dtype=float)


def run_demo(out: str | Path, *, n_train: int = 200, n_test: int = 200, max_new_tokens: int = 5,
             batch_size: int = 32, seed: int = 0, model: str | Path | None = None, device: str = "cpu",
             progress: bool = True, steer: bool = True, finetune_rows: int = FINETUNE_ROWS) -> dict:
    """Run everything; write `out/results.json`, `out/report.html`, `out/scores/*.jsonl`; return the results."""
    from lvlmlp.extraction.backend import Backend
    from lvlmlp.extraction.extract import extract
    from lvlmlp.probing.baselines import answer_token_ids, distribution_scores
    from lvlmlp.probing.features import feature_matrix
    from lvlmlp.probing.metrics import binary_metrics, bootstrap_ci, top1_accuracy
    from lvlmlp.probing.probes import LogisticProbe, MultinomialProbe
    from lvlmlp.tasks import get_task

    out = Path(out)
    (out / "scores").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backend = Backend(model or demo_model_path(), device=device, dtype="float32")
    results: dict = {"model": str(backend.model_id), "seed": seed, "n_train": n_train, "n_test": n_test,
                     "max_new_tokens": max_new_tokens, "tasks": {}, "steering": {}}
    probes: dict[str, LogisticProbe] = {}
    test_rows_of: dict[str, list[dict]] = {}
    responses_of: dict[str, dict[str, str]] = {}  # unguarded greedy responses, for the steering comparison
    for task in world.TASKS:
        registered = get_task(f"world-{task}")  # the analogue as a registered task: rows, labels, rules
        rows = [row for split, n in (("train", n_train), ("test", n_test))
                for row in registered.rows(out, split=split, n=n, world_seed=seed)]
        log.info("demo: %s (%d rows)", task, len(rows))
        run = extract(backend, rows, out / "runs" / task, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      store_dtype="float32", source=f"demo {task}", progress=progress)
        responses = [r or "" for r in run.responses]
        responses_of[task] = dict(zip(run.ids, responses))
        if registered.label_fn is not None:  # uncertainty: the label is whether the model's own count is right
            y = np.array([registered.label_fn(r, m) for r, m in zip(responses, run.meta)], dtype=float)
        else:
            y = run.labels
        train = np.array([s == "train" for s in run.splits])
        test = ~train
        X = feature_matrix(run, "logits", token=0)
        entry: dict = {"n_train": int(train.sum()), "n_test": int(test.sum())}
        record = {"id": [run.ids[i] for i in np.flatnonzero(test)], "label": y[test].tolist()}
        if task == "classification":
            probe = MultinomialProbe(epochs=60, batch_size=64, lr=0.05, seed=seed).fit(X[train], y[train].astype(int))
            pred = probe.predict(X[test])
            own = _own_answer(task, responses, run.meta)[test]
            entry["probe"] = {"accuracy": top1_accuracy(y[test], pred)}
            entry["own_answer"] = {"accuracy": top1_accuracy(y[test], own)}
            entry["chance"] = float(np.bincount(y[test].astype(int)).max() / test.sum())
            record.update(probe_pred=pred.tolist(), own_answer=own.tolist())
        else:
            if len(np.unique(y[train])) < 2:
                raise LvlmlpError(f"demo {task}: the train split has one class only; use more rows")
            probe = LogisticProbe(max_iter=1000).fit(X[train], y[train].astype(int))
            score = probe.predict_proba(X[test])[:, 1]
            probes[task] = probe
            probe.save(out / "probes" / task)  # e.g. demo_out/probes/safety: `lvlmlp generate/serve --probe`
            test_rows_of[task] = [m for m, t in zip(rows, test) if t]
            entry["probe"] = {**binary_metrics(y[test], score), "auroc_ci": bootstrap_ci(y[test], score, seed=seed)}
            record["probe"] = score.tolist()
            if task != "uncertainty":  # there the own answer *is* the label
                own = _own_answer(task, responses, run.meta)[test]
                entry["own_answer"] = {**binary_metrics(y[test], own),
                                       "auroc_ci": bootstrap_ci(y[test], own, seed=seed)}
                record["own_answer"] = own.tolist()
            if task in TOKEN_BASELINE:
                text, negate = TOKEN_BASELINE[task]
                p = distribution_scores(run, "token-prob", np.flatnonzero(test),
                                        token_ids=answer_token_ids(backend.tokenizer, text))
                tok = 1.0 - p if negate else p
                entry["token_prob"] = {"token": text, **binary_metrics(y[test], tok)}
                record["token_prob"] = tok.tolist()
            else:
                conf = distribution_scores(run, "max-prob", np.flatnonzero(test))
                entry["max_prob"] = binary_metrics(y[test], conf)
                record["max_prob"] = conf.tolist()
            entry["token_decay"] = _token_decay(run, y, train, test, n_boot=200, seed=seed)
        results["tasks"][task] = entry
        _write_scores(out / "scores" / f"{task}.jsonl", record)
    if steer:
        for task, template in GUARD_TEMPLATES.items():
            results["steering"][task] = _steering(backend, probes[task], template, test_rows_of[task],
                                                  responses_of[task], max_new_tokens, batch_size,
                                                  out / "scores" / f"steering-{task}.jsonl")
    if finetune_rows:
        results["finetune"] = finetune_vs_probe(out, backend.model_id, finetune_rows, batch_size, seed, progress)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, out)
    return results


def _token_decay(run, y: np.ndarray, train: np.ndarray, test: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    """Probe AUROC on token t's logits for t = 1..K (`analyses.token_decay`, the paper's protocol): token t is
    trained and tested on the rows that generated it; the others are counted (`n_test`), never silently dropped."""
    from lvlmlp.study.analyses import Labelled, Protocol, token_decay

    tr, te = np.flatnonzero(train), np.flatnonzero(test)
    protocol = Protocol(test=Labelled(run, te, y[te].astype(np.int64)),
                        train=Labelled(run, tr, y[tr].astype(np.int64)), n_boot=n_boot, seed=seed)
    result = token_decay(protocol, {"kind": "logistic", "max_iter": 1000})
    return [{"token": e["token"], "auroc": e["value"], "auroc_ci": e["ci"], "n_train": e.get("n_train", 0),
             "n_test": e["n"]} for e in result["tokens"]]


def _steering(backend, probe, template: str, rows: list[dict], before: dict[str, str], max_new_tokens: int,
              batch_size: int, scores_path: Path) -> dict:
    """Answers and refusals on the test rows without the guard (the run's greedy responses) and with it; every
    row's score, flag and both responses go to `scores_path`, so the counts recompute."""
    from lvlmlp.data import load_image
    from lvlmlp.steering.guard import ProbeGuard, guarded_generate, is_refusal

    guard = ProbeGuard(probe, backend.tokenizer, template)
    after: dict[str, str] = {}
    flagged: dict[str, tuple[float, bool]] = {}
    n_flagged = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        batch = backend.encode([load_image(r["image"], r["id"]) for r in chunk], [r["question"] for r in chunk])
        seq = guarded_generate(backend.model, batch, guard, max_new_tokens=max_new_tokens, do_sample=False)
        texts = backend.tokenizer.batch_decode(seq[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        after.update({r["id"]: t.strip() for r, t in zip(chunk, texts)})
        n_flagged += int(guard.flagged_.sum())
        flagged.update({r["id"]: (float(p), bool(f)) for r, p, f in zip(chunk, guard.scores_, guard.flagged_)})

    def counts(responses: dict[str, str]) -> dict:
        bad = [r for r in rows if r["label"] == 0]
        good = [r for r in rows if r["label"] == 1]
        return {
            "label0_answered": sum(not is_refusal(responses[r["id"]], template) for r in bad),
            "label1_refused": sum(is_refusal(responses[r["id"]], template) for r in good),
            "n_label0": len(bad), "n_label1": len(good),
        }

    _write_scores(scores_path, {"id": [r["id"] for r in rows], "label": [r["label"] for r in rows],
                                "probe_score": [flagged[r["id"]][0] for r in rows],
                                "flagged": [flagged[r["id"]][1] for r in rows],
                                "response_before": [before[r["id"]] for r in rows],
                                "response_after": [after[r["id"]] for r in rows]})
    return {"template": template, "flagged": n_flagged, "before": counts(before), "after": counts(after)}


def finetune_vs_probe(out: Path, model: str, n_rows: int, batch_size: int, seed: int, progress: bool) -> dict:
    """LoRA-finetune the demo model on each analogue's first `n_rows` train rows (targets: the answers the demo
    model was trained to give) and compare its own answer and answer-token probability with the probe, on the same
    test rows (`lvlmlp.study.finetune.compare`; the probe on the finetuned model's logits is left out for time)."""
    from functools import partial

    from lvlmlp.extraction.store import open_run
    from lvlmlp.study.finetune import Readout, Settings, compare

    def target(task: str, row: dict) -> str:
        if task == "safety":
            return world.A_COMPLY if row["label"] else world.A_REFUSAL
        if task == "answerability" and row["label"] == 0:
            return world.A_UNANSWERABLE
        return str(row["answer"])  # hallucination: yes/no; deception: the answer, or the premise's correction

    result = {}
    for task, (token, negate) in TOKEN_BASELINE.items():
        run = open_run(out / "runs" / task)
        rows = [{**m, "image": str(out / "images" / task / f"{m['id']}.png")} for m in run.meta]
        probe = {r["id"]: r["probe"] for r in map(json.loads, (out / "scores" / f"{task}.jsonl").open())}
        train = [r for r in rows if r["split"] == "train"]
        test = [r for r in rows if r["id"] in probe]
        tuned = [{**r, "target": target(task, r)} for r in train[:n_rows]]
        log.info("demo: finetuning on %d %s rows", len(tuned), task)
        result[task] = compare(
            model, tuned, test, [r["target"] for r in tuned], out / "finetune" / task,
            Settings(epochs=FINETUNE_EPOCHS, lr=3e-3, batch_size=16, seed=seed),
            Readout(token, negate, partial(world.task_label_of_response, task)), np.array([probe[r["id"]] for r in test]),
            device="cpu", dtype="float32", max_new_tokens=3, batch_size=batch_size, every_epoch=False,
            tuned_probe=False, n_boot=200, progress=progress)
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


def _write_scores(path: Path, record: dict) -> None:
    keys = [k for k in record if k != "id"]
    with path.open("w") as f:
        for i, rid in enumerate(record["id"]):
            f.write(json.dumps({"id": rid, **{k: record[k][i] for k in keys}}) + "\n")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summary_table(results: dict) -> str:
    """The compact results table printed by `lvlmlp demo` (Markdown)."""
    lines = ["| analogue (paper task) | probe AUROC [95% CI] | own answer AUROC | one-token AUROC | "
             "probe AUROC by generated token 1..K (rows) |", "|---|---|---|---|---|"]
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
    lines += ["", *verdicts(results), *finetune_table(results)]
    for task, s in results.get("steering", {}).items():
        b, a = s["before"], s["after"]
        lines.append("")
        lines.append(f"Probe-guided decoding on {task} ({s['flagged']} flagged): label-0 rows answered "
                     f"{b['label0_answered']}/{b['n_label0']} -> {a['label0_answered']}/{a['n_label0']}, "
                     f"label-1 rows refused {b['label1_refused']}/{b['n_label1']} -> "
                     f"{a['label1_refused']}/{a['n_label1']}")
    return "\n".join(lines)


def verdicts(results: dict) -> list[str]:
    """One plain sentence per analogue: does the probe beat the model's own answer (or the best baseline)?"""
    from lvlmlp.study.report import verdict

    out = []
    for task, e in results["tasks"].items():
        if task == "classification":
            p, o = e["probe"]["accuracy"], e["own_answer"]["accuracy"]
            word = "beats" if p > o else "does NOT beat"
            out.append(f"- {task}: the probe {word} the model's own answer (top-1 {p:.3f} vs {o:.3f}).")
            continue
        name, other = ("model's own answer", e["own_answer"]) if "own_answer" in e else ("max-prob", e["max_prob"])
        p, o, ci = e["probe"]["auroc"], other["auroc"], e["probe"].get("auroc_ci")
        if p is None or o is None:
            continue
        out.append(f"- {task}: probe AUROC {p:.3f} vs {name} {o:.3f}: {verdict(p, ci, o)}.")
    return out


GALLERY_ROWS = 4  # example test rows per analogue in the report (two of each label when there are)


def _one_token_name(task: str) -> str:
    """The one-token baseline of an analogue as a `--baseline` name (token-prob:!W reads 1 - P(W))."""
    text, negate = TOKEN_BASELINE[task]
    return f"token-prob:{'!' if negate else ''}{text}"


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
        "(95% bootstrap intervals); the verdict compares the probe with the model's own answer (max-prob where the "
        "own answer is the label).", ["analogue", "probe AUROC [95% CI]", "own answer AUROC [95% CI]",
                                      "one-token AUROC (token)", "verdict"], rows, anchor="summary")]
    blocks.append(Glossary(_glossary(results)))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    blocks.append(_roc_section(results, out, plots))
    blocks.append(_decay_section(results, plots))
    blocks += _steering_sections(results)
    blocks += _galleries(results, out)
    return blocks


def _verdict_words(e: dict) -> str:
    from lvlmlp.study.report import verdict

    name, other = ("own answer", e["own_answer"]) if "own_answer" in e else ("max-prob", e["max_prob"])
    return f"vs {name}: " + verdict(e["probe"]["auroc"], e["probe"].get("auroc_ci"), other["auroc"])


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
    items += [(f"one token ({task})", describe_baseline(_one_token_name(task))) for task in TOKEN_BASELINE]
    items.append(("max-prob (uncertainty)", describe_baseline("max-prob")))
    return items


def _roc_section(results: dict, out: Path, plots: Path):
    """One ROC plot per binary analogue: probe and baselines, each named in the legend with its AUROC."""
    from lvlmlp.study.report import Section, plot_roc_curves

    pngs = []
    for task in (t for t in results["tasks"] if t != "classification"):
        recs = [json.loads(line) for line in (out / "scores" / f"{task}.jsonl").read_text().splitlines()]
        names = {"probe": "probe", "own_answer": "own answer", "max_prob": "max-prob"}
        if task in TOKEN_BASELINE:
            names["token_prob"] = f"one token ({TOKEN_BASELINE[task][0]})"
        curves = [(name, [r["label"] for r in recs], [r[key] for r in recs]) for key, name in names.items()
                  if key in recs[0]]
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
    ax.set(title="probe AUROC by generated token (hollow: fewer rows)", xlabel="generated token", ylabel="AUROC")
    ax.legend(fontsize=8, loc="best")
    png = plots / "token_decay.png"
    save_figure(fig, png)
    k = max((len(e.get("token_decay", [])) for e in results["tasks"].values()), default=0)
    return Section("Probe AUROC by generated token", "A probe trained and tested on token t's logits, for t = 1.."
                   f"{k}; a point on fewer rows than the test split says on how many.",
                   ["analogue", *(f"token {t}" for t in range(1, k + 1))],
                   [r + ["–"] * (k + 1 - len(r)) for r in rows], [png])


def _steering_sections(results: dict) -> list:
    from lvlmlp.study.report import Section

    out = []
    if results.get("steering"):
        rows = []
        for task, s in results["steering"].items():
            b, a = s["before"], s["after"]
            rows.append([task, s["template"], str(s["flagged"]),
                         f"{b['label0_answered']}/{b['n_label0']} -> {a['label0_answered']}/{a['n_label0']}",
                         f"{b['label1_refused']}/{b['n_label1']} -> {a['label1_refused']}/{a['n_label1']}"])
        out.append(Section("Probe-guided decoding", "At the first decoding step, a row the probe flags (score < 0.5) "
                           "is made to start with the template; counts without the guard -> with it.",
                           ["analogue", "template", "flagged", "label-0 rows answered", "label-1 rows refused"],
                           rows))
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
        run = open_run(out / "runs" / task)
        meta = {m["id"]: (m, r) for m, r in zip(run.meta, run.responses)}
        recs = [json.loads(line) for line in (out / "scores" / f"{task}.jsonl").read_text().splitlines()]
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
                got = f"class {r['probe_pred']:.0f} ({world.CLASS_NAMES[int(r['probe_pred'])]})"
                rows.append((png, [m["question"], response or "", f"{r['label']:.0f} "
                                   f"({world.CLASS_NAMES[int(r['label'])]})", got, "–"]))
            else:
                rows.append((png, [m["question"], response or "", f"{r['label']:.0f}", _fmt(r["probe"]),
                                   "flagged" if r["probe"] < 0.5 else "not flagged"]))
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
    (out / "report.html").write_text(render_html("lvlmlp demo", intro, report_blocks(results, out)))
