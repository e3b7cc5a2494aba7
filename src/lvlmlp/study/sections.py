"""The report sections of `lvlmlp run` that the demo's report shares: the headline of an evaluation, the prompt
comparison and the guided-decoding counts (each a `lvlmlp.study.report.Section`)."""

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
