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
from lvlmlp.outputs import read_json


def load_eval(directory: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, score records) of a `probe eval` folder."""
    folder = Path(directory)
    metrics_path, scores_path = folder / "metrics.json", folder / "scores.jsonl"
    for path in (metrics_path, scores_path):
        if not path.is_file():
            raise LvlmlpError(f"{folder}: not a probe eval folder (missing {path.name})")
    metrics = read_json(metrics_path)
    for key in _NUMBERS:  # a string where a number belongs would fail in a format code, far from the file
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LvlmlpError(f"{metrics_path}: {key!r} must be a number or null, got {value!r}")
    records = []
    with scores_path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                record = read_json(scores_path, line, f" line {n}")
                if not isinstance(record.get("score", 0.0), (int, float)):
                    raise LvlmlpError(f"{scores_path} line {n}: 'score' must be a number, got {record['score']!r}")
                records.append(record)
    return metrics, records


_NUMBERS = ("auroc", "auprc", "accuracy", "f1", "n")


def _unique_names(dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for d in dirs:
        base, name, k = d.resolve().name or "eval", d.resolve().name or "eval", 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def fmt_value(value: Any) -> str:
    """Every number of every report (demo, report, run): a fraction with 3 decimals."""
    return "–" if value is None else f"{value:.3f}"


def fmt_ci(value: Any, ci: Any) -> str:
    if value is None:
        return "–"
    return fmt_value(value) + (f" [{fmt_value(ci[0])}, {fmt_value(ci[1])}]" if ci else "")


POOLED = "pooled out-of-fold"


def fold_headline(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """A k-fold evaluation's headline: the mean of its per-fold AUROC, accuracy and F1 (`cv.mean_of_folds` of
    metrics.json, the figure the original reports for MathVista) with its label "mean of K folds"; None for a
    train/test evaluation. Its other metrics pool all out-of-fold scores (`POOLED`) and are shown beside it."""
    cv = metrics.get("cv") or {}
    if not cv.get("mean_of_folds"):
        return None
    return {"label": f"mean of {cv.get('n_folds')} folds", **cv["mean_of_folds"]}


def table_rows(metrics: dict[str, Any]) -> list[list[str]]:
    """Rows (method, AUROC [CI], AUPRC, accuracy [CI], F1, n) of one binary evaluation, probe first (k-fold: the
    mean of the folds first, then the pooled out-of-fold figures)."""
    rows = []
    probe = "probe (" + metrics.get("probe", {}).get("class", "probe") + ")"
    folds = fold_headline(metrics)
    if folds is not None:
        rows.append([f"{probe}, {folds['label']}", fmt_value(folds.get("auroc")), "–",
                     fmt_value(folds.get("accuracy")), fmt_value(folds.get("f1")), str(metrics.get("n", "–"))])
        probe += f", {POOLED}"
    methods = [(probe, metrics)]
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


def _cell(value: str) -> str:
    # Figures align right (decimals line up); words (names, verdicts, answers) align left and wrap.
    numeric = value[:1].isdigit() or value[:1] in ("–", "-")
    return f"<td>{html.escape(value)}</td>" if numeric else f"<td class='text'>{html.escape(value)}</td>"


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _labelled(records: list[dict[str, Any]], key: str | None) -> tuple[np.ndarray, np.ndarray]:
    keep = [r for r in records if r.get("label") is not None]
    y = np.array([r["label"] for r in keep], dtype=np.int64)
    s = np.array([r["score"] if key is None else r["baselines"][key] for r in keep], dtype=np.float64)
    return y, s


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend: the one plotting set-up of every report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save with every label, title and legend inside the image (nothing clipped), then free the figure."""
    fig.savefig(path, bbox_inches="tight", pad_inches=0.1)
    pyplot().close(fig)


def plot_roc_curves(curves: Sequence[tuple[str, Any, Any]], path: Path, title: str) -> None:
    """ROC curves of (name, labels, scores), each named in the legend with its AUROC; the first drawn thicker."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for i, (name, y, s) in enumerate(curves):
        y, s = np.asarray(y), np.asarray(s, dtype=np.float64)
        if np.unique(y).size < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        # Above the spines (clip_on off): a perfect curve runs along the axes and was hidden by them.
        ax.plot(fpr, tpr, label=f"{name} (AUROC {fmt_value(float(roc_auc_score(y, s)))})", lw=2.5 if i == 0 else 1.5,
                zorder=3 + (i == 0), clip_on=False)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance (AUROC 0.500)")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.03))
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)


def plot_roc(metrics: dict[str, Any], records: list[dict[str, Any]], path: Path, title: str) -> None:
    """ROC curves of the probe and every baseline of an evaluation, recomputed from the saved scores."""
    curves = [("probe", *_labelled(records, None))]
    curves += [(b, *_labelled(records, b)) for b in metrics.get("baselines") or {}]
    plot_roc_curves(curves, path, title)


def plot_scores(records: list[dict[str, Any]], path: Path, title: str, threshold: float) -> None:
    """Histogram of the probe's score for each label, with the decision threshold."""
    plt = pyplot()
    y, s = _labelled(records, None)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    bins = np.linspace(0, 1, 41)
    for label, color in ((0, "tab:red"), (1, "tab:blue")):
        if np.any(y == label):
            ax.hist(s[y == label], bins=bins, alpha=0.6, color=color, label=f"label {label} (n={np.sum(y == label)})")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set(xlabel="probe score P(label 1)", ylabel="rows", title=title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot: it covered a bar inside
    save_figure(fig, path)


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #999;padding:4px 10px;text-align:right;vertical-align:top}th{text-align:left}"
    "th:first-child,td:first-child{text-align:left}th{background:#eee}.wide{overflow-x:auto}"
    "img{margin:0.5em;border:1px solid #ddd;vertical-align:top;max-width:100%;height:auto}"
    "td.text{text-align:left;max-width:32em}figure{display:inline-block;margin:0.5em}"
    "dt{font-weight:bold}dd{margin:0 0 0.5em 1.5em}.gallery img{width:96px;image-rendering:pixelated}"
)


def data_uri(png: bytes) -> str:
    """A PNG as a data URI: every image of a report lives in the page itself."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def verdict(probe: float | None, ci: Sequence[float] | None, other: float | None) -> str:
    """The probe against another method's AUROC, in words (every report uses these words)."""
    if probe is None or other is None:
        return "not measured (one class only)"
    if ci and ci[0] > other:
        return "the probe is better (its 95% interval lies above)"
    if probe > other:
        return "the probe is higher, but its 95% interval includes the other value"
    return "the probe does NOT beat it"


def comparisons(probe: float | None, ci: Sequence[float] | None, baselines: dict[str, float | None],
                own: str | None, on: str = "") -> str:
    """The verdicts every report gives (`report`, `run`, the demo): the probe against the model's own answer `own`
    (the paper's headline), then against the best baseline when that is another one."""
    known = {b: v for b, v in baselines.items() if v is not None}
    if not known:
        return "no baseline"
    parts = [f"vs {own}{on}: {verdict(probe, ci, known[own])}"] if own in known else []
    best = max(known, key=lambda b: known[b])
    if best != own:
        parts.append(f"vs the best baseline, {best}{on}: {verdict(probe, ci, known[best])}")
    return "; ".join(parts)


@dataclass
class Section:
    """A titled report section: a paragraph, one table (none when `header` is empty) and PNG plots (embedded as
    data URIs in the HTML)."""

    title: str
    text: str
    header: list[str]
    rows: list[list[str]]
    pngs: list[Path] = field(default_factory=list)
    anchor: str = ""
    alts: list[str] = field(default_factory=list)  # the images' alternative texts (default: the file stems)

    def _alts(self) -> list[str]:
        return self.alts or [p.stem for p in self.pngs]

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.text, ""]
        if self.header:
            lines += [markdown_table(self.header, self.rows), ""]
        lines += [f"![{alt}]({p.name})" for alt, p in zip(self._alts(), self.pngs)]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        anchor = f" id='{html.escape(self.anchor)}'" if self.anchor else ""
        parts = [f"<h2{anchor}>{html.escape(self.title)}</h2><p>{html.escape(self.text)}</p>"]
        if self.header:
            parts.append(f"<div class='wide'>{html_table(self.header, self.rows)}</div>")
        parts += [f"<img class='plot' alt='{html.escape(alt)}' src='{data_uri(p.read_bytes())}'>"
                  for alt, p in zip(self._alts(), self.pngs)]
        return "".join(parts)


@dataclass
class Glossary:
    """What each label and method of the report means (term, meaning)."""

    items: list[tuple[str, str]]
    title: str = "What the labels and methods mean"

    def markdown(self) -> str:
        return "\n".join([f"## {self.title}", "", *(f"- **{t}**: {m}" for t, m in self.items)]) + "\n"

    def html(self) -> str:
        body = "".join(f"<dt>{html.escape(t)}</dt><dd>{html.escape(m)}</dd>" for t, m in self.items)
        return f"<h2>{html.escape(self.title)}</h2><dl>{body}</dl>"


@dataclass
class Gallery:
    """Example rows: each an image (PNG bytes, embedded) with its fields (question, answer, score, ...)."""

    title: str
    text: str
    header: list[str]
    rows: list[tuple[bytes, list[str]]]

    def markdown(self) -> str:
        rows = [["(image)", *cells] for _, cells in self.rows]
        return "\n".join([f"## {self.title}", "", self.text, "", markdown_table(["image", *self.header], rows)]) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ["image", *self.header])
        body = "".join(
            f"<tr><td><img alt='example row' src='{data_uri(png)}'></td>"
            + "".join(f"<td class='text'>{html.escape(c)}</td>" for c in cells) + "</tr>"
            for png, cells in self.rows)
        return (f"<h2>{html.escape(self.title)}</h2><p>{html.escape(self.text)}</p>"
                f"<div class='wide gallery'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


Block = Section | Glossary | Gallery


def render_html(title: str, intro: str, blocks: Sequence[Block]) -> str:
    """The one HTML page of every report (demo, `lvlmlp report`, `lvlmlp run`): self-contained, no external
    reference (images are data URIs)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"]
    parts += [b.html() for b in blocks]
    parts.append("</body></html>")
    return "".join(parts)


def render_markdown(title: str, intro: str, blocks: Sequence[Block]) -> str:
    return "\n".join([f"# {title}", "", intro, "", *(b.markdown() for b in blocks)])


def _title(name: str, task: str | None) -> str:
    return name if task is None else f"{task}, prompt {name}"


def summary_section(evals: dict[str, dict[str, Any]], task: str | None = None) -> Section:
    """The table at the top of `lvlmlp report`/`run`: every evaluation, the probe against its baselines with
    intervals, and the verdict against the best baseline in words."""
    rows = []
    for name, m in evals.items():
        if m.get("task") == "multiclass":
            base = m.get("baselines") or {}
            rows.append([_title(name, task), str(m.get("n", "–")), "top-1 accuracy " + fmt_value(m.get("accuracy")),
                         "; ".join(f"{b} top-1 accuracy {fmt_value(v.get('accuracy'))}" for b, v in base.items())
                         or "–", "–"])
            continue
        base = m.get("baselines") or {}
        probe = fmt_ci(m.get("auroc"), m.get("auroc_ci"))
        folds = fold_headline(m)
        if folds is not None:  # the original's figure first; the verdict uses the pooled one and its interval
            probe = f"{fmt_value(folds.get('auroc'))} ({folds['label']}); {POOLED} {probe}"
        on = f", on the {POOLED} AUROC" if folds is not None else ""
        own = next((b for b in base if b.startswith("own-answer")), None)
        words = comparisons(m.get("auroc"), m.get("auroc_ci"), {b: v.get("auroc") for b, v in base.items()}, own, on)
        rows.append([_title(name, task), str(m.get("n", "–")), probe,
                     "; ".join(f"{b} {fmt_ci(v.get('auroc'), v.get('auroc_ci'))}" for b, v in base.items()) or "–",
                     words])
    return Section("Summary", "Test AUROC of the probe and of each baseline (95% bootstrap intervals); the verdict "
                   "compares the probe with the model's own answer (the paper's comparison) and with the best "
                   "baseline. A k-fold evaluation shows the mean of its per-fold "
                   f"AUROCs first (the original's figure), then the {POOLED} AUROC.",
                   ["evaluation", "n", "probe AUROC [95% CI]", "baselines: AUROC [95% CI]", "verdict"], rows,
                   anchor="summary")


def glossary(evals: dict[str, dict[str, Any]]) -> Glossary:
    """The labels of each evaluation and every method named in the report, in words."""
    from lvlmlp.probing.baselines import describe_baseline

    labels: dict[str, list[str]] = {}  # meaning -> the evaluations it applies to (said once)
    for name, m in evals.items():
        names = m.get("label_names")
        if m.get("task") == "multiclass":
            text = "class indices; the probe predicts the most probable class"
        elif names and len(names) == 2:
            text = f"1 = {names[1]}, 0 = {names[0]}; scores are P(label 1 = {names[1]})"
        else:
            text = "1 and 0 as the rows give them; scores are P(label 1)"
        labels.setdefault(text, []).append(name)
    items = [(", ".join(names) + ": labels", text) for text, names in labels.items()]
    for cls, kind, token in dict.fromkeys(
            (m.get("probe", {}).get("class", "probe"), (m.get("probe", {}).get("feature_spec") or {}).get("kind"),
             (m.get("probe", {}).get("feature_spec") or {}).get("token", 0)) for m in evals.values()):
        what = (f"{kind} of generated token {int(token or 0)} (0 = the first)" if kind in ("logits", "logprobs")
                else f"{kind} features" if kind else "features")
        items.append((f"probe ({cls}, {kind or 'features'})", f"a linear probe on the {what}, trained on the train "
                      "rows; its score is P(label 1)"))
    for b in dict.fromkeys(b for m in evals.values() for b in (m.get("baselines") or {})):
        items.append((b, describe_baseline(b)))
    if any(fold_headline(m) is not None for m in evals.values()):
        items.append(("mean of K folds", "k-fold cross-validation on the test rows: the probe is trained on K-1 "
                      "folds and scored on the remaining one, and each fold's AUROC, accuracy and F1 are averaged "
                      "over the K folds (what the original reports)"))
        items.append((POOLED, "the same out-of-fold scores of all K folds taken together as one test set "
                      "(one AUROC over every row, with a bootstrap interval)"))
    for key in dict.fromkeys(k for m in evals.values() for k in (m.get("groups") or {})):
        items.append((f"per {key}", f"metrics computed separately on the rows of each {key}"))
    return Glossary(items)


def group_text(key: str, metric: str, per: Any) -> str:
    """The per-group figures of an evaluation in words (the glossary's "per KEY" entry promises them)."""
    if not isinstance(per, dict) or not per:
        return ""
    if metric == "attack-success-rate":
        rates, n_unsafe = per.get("per_scenario") or {}, per.get("n_unsafe") or {}
        parts = ", ".join(f"{g} {fmt_value(v)} (n={n_unsafe.get(g, '–')})" for g, v in rates.items())
        return (f" Attack success rate of the probe per {key} (unsafe rows it lets through, of n unsafe): {parts}; "
                f"average {fmt_value(per.get('average'))}.")
    parts = "; ".join(f"{g}: " + ", ".join(f"{k} {v if isinstance(v, int) else fmt_value(v)}" for k, v in m.items()
                                          if isinstance(v, (int, float)))
                      for g, m in per.items() if isinstance(m, dict))
    return f" Per {key} ({metric}): {parts}." if parts else ""


def eval_section(name: str, metrics: dict[str, Any], records: list[dict[str, Any]], out_dir: Path,
                 title: str | None = None) -> Section:
    """One evaluation: its table (probe and baselines), the attack success rate when the task groups by it,
    its ROC curves and the probe's score histogram."""
    text = (f"Run {metrics.get('run')}, split {metrics.get('split')}, probe {metrics.get('probe', {}).get('dir')}.")
    if metrics.get("task") == "multiclass":
        rows = [["probe (" + metrics.get("probe", {}).get("class", "probe") + ")",
                 fmt_value(metrics.get("accuracy")), str(metrics.get("n", "–"))]]
        rows += [[b, fmt_value(m.get("accuracy")), str(m.get("n", "–"))] for b, m in (metrics.get("baselines") or {}).items()]
        return Section(title or name, text, ["method", "top-1 accuracy", "n"], rows)
    for key, metric in (metrics.get("groups") or {}).items():
        text += group_text(key, metric, metrics.get(f"per_{key}"))
    folds = fold_headline(metrics)
    if folds is not None:
        text += (f" {(metrics.get('cv') or {}).get('folds')}: the headline is the {folds['label']} (each fold's "
                 f"AUROC, accuracy and F1, averaged), the {POOLED} row scores all out-of-fold scores together.")
    paper = metrics.get("own_answer_paper")
    if paper:  # which of the original notebooks' rules read the answers
        text += (f" own-answer:paper reads the answers with the original notebooks' rule for {paper.get('task')} "
                 f"{paper.get('prompt_style')}.")
    threshold = (metrics.get("probe") or {}).get("threshold")
    if threshold is not None:  # which threshold each accuracy and F1 used
        text += (f" Accuracy and F1 of the probe{' (pooled and per fold)' if folds is not None else ''} at "
                 f"threshold {threshold:g}, of the baselines at 0.5.")
    pngs = []
    if any(r.get("label") is not None for r in records):
        threshold = float(metrics.get("probe", {}).get("threshold", 0.5))
        pngs = [out_dir / f"roc_{name}.png", out_dir / f"scores_{name}.png"]
        plot_roc(metrics, records, pngs[0], f"ROC: {name}")
        plot_scores(records, pngs[1], f"probe scores: {name}", threshold)
    return Section(title or name, text, HEADER, table_rows(metrics), pngs,
                   alts=[f"{k} {name}" for k in ("roc", "scores")])


def write_report(
    eval_dirs: list[str | Path], out: str | Path, sections: Sequence[Section] = (), analyses: dict | None = None,
    task: str | None = None, names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write metrics.json, report.md, PNG plots and a self-contained report.html into `out`; returns metrics.json.

    It holds {eval name: metrics}; with `analyses` (`lvlmlp run`), {"evaluations": {name: metrics}, **analyses},
    and `sections` follow the evaluations in the report. `task`: what every evaluation is of (`lvlmlp run`'s task),
    shown with each evaluation's name (a run's evaluations are named by prompt, e.g. "default"). `names`: the
    evaluations' names (default: their folders' names, made unique)."""
    if not eval_dirs:
        raise LvlmlpError("report: give at least one probe eval folder")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dirs = [Path(d) for d in eval_dirs]
    combined: dict[str, Any] = {}
    blocks: list[Block] = []
    for name, folder in zip(_unique_names(dirs) if names is None else names, dirs):
        metrics, records = load_eval(folder)
        combined[name] = metrics
        blocks.append(eval_section(name, metrics, records, out_dir, _title(name, task)))
    blocks = [summary_section(combined, task), glossary(combined), *blocks, *sections]
    intro = "Probe versus baselines on each evaluation; every figure recomputes from the saved scores."
    doc = combined if analyses is None else {"evaluations": combined, **analyses}
    (out_dir / "metrics.json").write_text(json.dumps(doc, indent=2))
    (out_dir / "report.md").write_text(render_markdown("lvlmlp report", intro, blocks) + "\n")
    (out_dir / "report.html").write_text(render_html("lvlmlp report", intro, blocks))
    return doc
