"""`lvlmlp report`: tables and plots of one or more `probe eval` folders.

Writes `metrics.json` (every evaluation's metrics, keyed by its folder name), `report.md` (probe vs baselines with
95% bootstrap intervals), PNG plots (ROC curves; probe score distributions per label) and `report.html`, a single
self-contained file with the plots embedded as base64 PNGs (it can be mailed or archived on its own). The ROC
curves are recomputed from `scores.jsonl`, so the plots show exactly the saved scores.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lvlmlp.errors import LvlmlpError


def load_eval(directory: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, score records) of a `probe eval` folder."""
    folder = Path(directory)
    metrics_path, scores_path = folder / "metrics.json", folder / "scores.jsonl"
    for path in (metrics_path, scores_path):
        if not path.is_file():
            raise LvlmlpError(f"{folder}: not a probe eval folder (missing {path.name})")
    metrics = json.loads(metrics_path.read_text())
    with scores_path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return metrics, records


def _unique_names(dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for d in dirs:
        base, name, k = d.resolve().name or "eval", d.resolve().name or "eval", 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def fmt_value(value: Any) -> str:
    """Every number of every report (demo, report, run): a fraction with 3 decimals, as the paper's AUROCs."""
    return "–" if value is None else f"{value:.3f}"


def fmt_ci(value: Any, ci: Any) -> str:
    if value is None:
        return "–"
    return fmt_value(value) + (f" [{fmt_value(ci[0])}, {fmt_value(ci[1])}]" if ci else "")


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows (method, AUROC [CI], AUPRC, accuracy [CI], F1, n) of one binary evaluation, probe first."""
    rows = []
    methods = [("probe (" + metrics.get("probe", {}).get("class", "probe") + ")", metrics)]
    methods += list((metrics.get("baselines") or {}).items())
    for name, m in methods:
        rows.append([
            name,
            fmt_ci(m.get("auroc"), m.get("auroc_ci")),
            fmt_value(m.get("auprc")),
            fmt_ci(m.get("accuracy"), m.get("accuracy_ci")),
            fmt_value(m.get("f1")),
            str(m.get("n", "–")),
        ])
    return rows


HEADER = ["method", "AUROC [95% CI]", "AUPRC", "accuracy [95% CI]", "F1", "n"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _labelled(records: list[dict[str, Any]], key: str | None) -> tuple[np.ndarray, np.ndarray]:
    keep = [r for r in records if r.get("label") is not None]
    y = np.array([r["label"] for r in keep], dtype=np.int64)
    s = np.array([r["score"] if key is None else r["baselines"][key] for r in keep], dtype=np.float64)
    return y, s


def plot_roc(metrics: dict[str, Any], records: list[dict[str, Any]], path: Path, title: str) -> None:
    """ROC curves of the probe and every baseline, recomputed from the saved scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for key, label in [(None, "probe"), *[(b, b) for b in metrics.get("baselines") or {}]]:
        y, s = _labelled(records, key)
        if np.unique(y).size < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        m = metrics if key is None else metrics["baselines"][key]
        ax.plot(fpr, tpr, label=f"{label} (AUROC {fmt_value(m.get('auroc'))})", lw=2 if key is None else 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_scores(records: list[dict[str, Any]], path: Path, title: str, threshold: float) -> None:
    """Histogram of the probe's score for each label, with the decision threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, s = _labelled(records, None)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    bins = np.linspace(0, 1, 41)
    for label, color in ((0, "tab:red"), (1, "tab:blue")):
        if np.any(y == label):
            ax.hist(s[y == label], bins=bins, alpha=0.6, color=color, label=f"label {label} (n={np.sum(y == label)})")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set(xlabel="probe score P(label 1)", ylabel="rows", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #999;padding:4px 10px;text-align:right}th:first-child,td:first-child{text-align:left}"
    "th{background:#eee}img{margin:0.5em;border:1px solid #ddd;vertical-align:top}"
)


@dataclass
class Section:
    """A titled report section: a paragraph, one table and PNG plots (embedded as base64 in the HTML)."""

    title: str
    text: str
    header: list[str]
    rows: list[list[str]]
    pngs: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.text, "", markdown_table(self.header, self.rows), ""]
        lines += [f"![{p.stem}]({p.name})" for p in self.pngs]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        parts = [f"<h2>{html.escape(self.title)}</h2><p>{html.escape(self.text)}</p>",
                 html_table(self.header, self.rows)]
        for p in self.pngs:
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>")
        return "".join(parts)


def write_report(
    eval_dirs: list[str | Path], out: str | Path, sections: Sequence[Section] = (), analyses: dict | None = None
) -> dict[str, Any]:
    """Write metrics.json, report.md, PNG plots and a self-contained report.html into `out`; returns metrics.json.

    It holds {eval name: metrics}; with `analyses` (`lvlmlp run`), {"evaluations": {name: metrics}, **analyses},
    and `sections` follow the evaluations in the report."""
    if not eval_dirs:
        raise LvlmlpError("report: give at least one probe eval folder")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = [Path(d) for d in eval_dirs]
    names = _unique_names(dirs)
    combined: dict[str, Any] = {}
    md = ["# lvlmlp report", ""]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lvlmlp report</title>"
             f"<style>{_CSS}</style></head><body><h1>lvlmlp report</h1>"]
    for name, folder in zip(names, dirs):
        metrics, records = load_eval(folder)
        combined[name] = metrics
        heading = f"{name}: {metrics.get('task', 'binary')}, run {metrics.get('run')}"
        md += [f"## {name}", "", f"Run `{metrics.get('run')}`, split `{metrics.get('split')}`, "
               f"probe `{metrics.get('probe', {}).get('dir')}`.", ""]
        parts.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(heading)}</p>")
        if metrics.get("task") == "multiclass":
            rows = [["probe (" + metrics.get("probe", {}).get("class", "probe") + ")",
                     fmt_value(metrics.get("accuracy")), str(metrics.get("n", "–"))]]
            md += [markdown_table(["method", "top-1 accuracy", "n"], rows), ""]
            parts.append(html_table(["method", "top-1 accuracy", "n"], rows))
            continue
        rows = table_rows(metrics)
        md += [markdown_table(HEADER, rows), ""]
        parts.append(html_table(HEADER, rows))
        asr = (metrics.get("per_scenario") or {}).get("average")
        if asr is not None:
            md += [f"Average attack success rate (probe): {fmt_value(asr)}", ""]
            parts.append(f"<p>Average attack success rate (probe): {fmt_value(asr)}</p>")
        if any(r.get("label") is not None for r in records):
            threshold = float(metrics.get("probe", {}).get("threshold", 0.5))
            for kind in ("roc", "scores"):
                png = out_dir / f"{kind}_{name}.png"
                if kind == "roc":
                    plot_roc(metrics, records, png, f"ROC: {name}")
                else:
                    plot_scores(records, png, f"probe scores: {name}", threshold)
                md.append(f"![{kind} {name}]({png.name})")
                data = base64.b64encode(png.read_bytes()).decode("ascii")
                parts.append(f"<img alt='{kind} {html.escape(name)}' src='data:image/png;base64,{data}'>")
            md.append("")
    md += [section.markdown() for section in sections]
    parts += [section.html() for section in sections]
    parts.append("</body></html>")
    doc = combined if analyses is None else {"evaluations": combined, **analyses}
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2))
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.html").write_text("".join(parts))
    return doc
