"""The report sections of `lvlmlp run` (each a `lvlmlp.study.report.Section`, its plot written beside the report):
the headline of an evaluation, the analyses (token-position decay, layer sweep, prompt comparison, guided decoding,
*Which signal?*, finetuning vs probing, the CLIP baseline). The demo's report shares the headline, the prompt
comparison and the guided-decoding counts. Each takes the finished result of its step (`study/experiment.py` runs
the steps); none computes one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lvlmlp.study.report import Section, fold_headline


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    metric = "auroc" if metrics.get("task") == "binary" else "accuracy"
    head = {"metric": metric, "value": metrics.get(metric), "ci": metrics.get(f"{metric}_ci"),
            "n": metrics.get("n", metrics.get("n_scored")),
            "baselines": {b: m.get("auroc") for b, m in (metrics.get("baselines") or {}).items()}}
    folds = fold_headline(metrics)
    if folds is not None:  # k-fold: the original's figure (mean of the folds) leads, the pooled one stays beside it
        head.update(value=folds["auroc"], ci=None, label=folds["label"], pooled={"value": head["value"],
                                                                                "ci": head["ci"]})
    return head


def histogram_text(histogram: dict[str, int]) -> str:
    """{"1": 5, "3": 11} -> "1 token: 5, 3 tokens: 11" (no Python reprs in a report)."""
    return ", ".join(f"{k} token{'' if k == '1' else 's'}: {n}" for k, n in histogram.items())


def prompt_section(main: dict[str, dict], report_dir: Path) -> Any:
    from lvlmlp.study import analyses as an
    from lvlmlp.study.report import fmt_value

    names = list(main)
    heads = [headline(main[n]) for n in names]
    baselines = sorted({b for h in heads for b in h["baselines"]})
    rows = [[n, an.fmt_result(h), *[fmt_value(h["baselines"].get(b)) for b in baselines], str(h["n"])]
            for n, h in zip(names, heads)]
    png = report_dir / "prompt_comparison.png"
    an.plot_bars(names, heads, png, "probe by prompt")
    return Section("Prompt comparison", "The same task and rows under each prompt: the first-token probe "
                      "and the baselines' AUROC.", ["prompt", "probe [95% CI]", *baselines, "n"], rows, [png])


STEERING_HEADER = ["prompt", "template", "flagged", "label-0 rows answered", "label-1 rows refused"]


def steering_row(name: str, s: dict[str, Any]) -> list[str]:
    """One row of guided-decoding counts: without the guard -> with it."""
    b, a = s["before"], s["after"]
    return [name, s["template"], str(s["flagged"]),
            f"{b['label0_answered']}/{b['n_label0']} -> {a['label0_answered']}/{a['n_label0']}",
            f"{b['label1_refused']}/{b['n_label1']} -> {a['label1_refused']}/{a['n_label1']}"]


def steering_section(name: str, s: dict[str, Any]) -> Any:
    return Section(f"Probe-guided decoding: {name}", f"At the first decoding step, a test row the probe flags (score "
                   f"< {s['threshold']}) is made to start with the template; counts without the guard -> with it.",
                   STEERING_HEADER, [steering_row(name, s)])


def pooled_note(cv: int | None) -> str:
    """What the analyses' figures are under k-fold cross-validation (appended to their sections' text)."""
    from lvlmlp.study.report import POOLED

    return (f" With {cv}-fold cross-validation the figures are {POOLED} AUROCs (the summary's headline is the mean "
            "of the folds)." if cv is not None else "")


def token_decay_section(name: str, res: dict[str, Any], report_dir: Path, pooled: str) -> Any:
    from lvlmlp.study import analyses as an

    png = report_dir / f"token_decay_{name}.png"
    an.plot_token_decay(res, png, f"token-position decay: {name}")
    return Section(
        f"Token-position decay: {name}",
        f"Probe on the logits of generated token k (1 = first) and of each row's last generated token. "
        f"{res['rule']}. Test rows per answer length: {histogram_text(res['n_tokens_histogram'])}.{pooled}",
        an.TOKEN_DECAY_HEADER, an.token_decay_rows(res), [png])


def layer_sweep_section(name: str, res: dict[str, Any], report_dir: Path, pooled: str) -> Any:
    from lvlmlp.study import analyses as an

    png = report_dir / f"layer_sweep_{name}.png"
    ref = res["entries"][0]["value"]
    an.plot_bars([e["feature"] for e in res["entries"]], res["entries"], png, f"layer sweep: {name}", ref)
    return Section(
        f"Layer sweep: {name}",
        "Probes on hidden states at the first generated position (layer 0 = embeddings) against the "
        "first-token logits, same rows and protocol." + pooled, an.LAYER_HEADER, an.layer_rows(res), [png])


def signals_section(name: str, res: dict[str, Any], report_dir: Path) -> Any:
    """*Which signal?* of one prompt: the table of `lvlmlp.study.signals.which_signal`'s result and its cost plot."""
    from lvlmlp.study import signals as sg

    pngs = []
    if res["signals"]:
        png = report_dir / f"signals_{name}.png"
        sg.plot_cost(res, png, f"which signal: {name}")
        pngs.append(png)
    text = res.get("note") or sg.section_text(res)
    return Section(f"Which signal?: {name}", text, sg.HEADER, sg.table_rows(res), pngs)


def finetune_section(name: str, res: dict[str, Any], settings: Any, n_train: int, answers: Any,
                     report_dir: Path) -> Any:
    """Finetuning vs probing: `lvlmlp.study.finetune.compare`'s result under prompt `name` (LoRA `settings`)."""
    from lvlmlp.study import finetune as ft

    png = report_dir / "finetune_epochs.png"
    ft.plot_epochs(res, png, f"finetuned vs probe: {name}")
    return Section("Finetuning vs probing",
                   f"LoRA on the language model ({settings.epochs} epochs, rank {settings.lora_rank}, lr "
                   f"{settings.lr}) on the {n_train} train rows, targets {answers or 'per row'}, prompt "
                   f"{name}; test split: the finetuned model's own answer and answer-token probability "
                   f"('{res['readout_token']}') against the probe on the base and on the finetuned model's "
                   "first-token logits. Plot: AUROC per epoch.", ft.COMPARISON_HEADER, ft.comparison_rows(res), [png])


def clip_section(first: dict[str, Any], clip: dict[str, dict[str, Any]], clip_model: str, report_dir: Path) -> Any:
    """The CLIP feature baseline: the first-token probe's evaluation (`first`: its metrics) against the headlines of
    the probes on each CLIP feature kind (`clip`: kind -> `headline`)."""
    from lvlmlp.study import analyses as an

    probe_class = first.get("probe", {}).get("class") or "probe"
    rows = [[f"first-token logits ({probe_class})", an.fmt_result(headline(first)),
             str(headline(first)["n"])]]
    entries, names = [headline(first)], ["first-token logits"]
    for kind, head in clip.items():
        entries.append(head)
        names.append(f"CLIP {kind}")
        rows.append([f"CLIP {kind} ({clip_model})", an.fmt_result(head), str(head["n"])])
    png = report_dir / "clip_baseline.png"
    an.plot_bars(names, entries, png, "first-token logits vs CLIP features", entries[0]["value"])
    return Section("CLIP feature baseline", "Probes of the same kind on CLIP/SigLIP image, question-text and "
                      "concatenated embeddings, same rows and protocol.", ["features", "probe [95% CI]", "n"],
                      rows, [png])
