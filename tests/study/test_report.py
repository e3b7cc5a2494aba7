"""`lvlmlp report`: Markdown table, PNG plots, a self-contained HTML page that renders in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp.cli import main
from lvlmlp.extraction.store import RunWriter
from tests.probing.test_probes import cli, write_run


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `probe train` + `probe eval` on a small synthetic run with a learnable signal."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    n, v = 200, 32
    y = np.arange(n) % 2
    logits = rng.normal(size=(n, 1, v)).astype(np.float32)
    logits[:, 0, 3] += 1.2 * y
    meta = [{"id": f"r{i}", "label": int(y[i]), "split": "train" if i < 120 else "val",
             "response": "unanswerable" if rng.random() < 0.3 else "a cat"} for i in range(n)]
    writer = RunWriter(root / "run", {"model": "tiny", "family": "test", "dtype": "float16", "vocab_size": v,
                                      "prompt_template": None, "max_new_tokens": 1, "hidden": False, "layers": []})
    writer.append(meta, {"logits": logits.astype(np.float16), "n_tokens": np.ones(n, dtype=np.int64),
                         "row_index": np.arange(n)})
    writer.close()
    assert main(["probe", "train", "--run", str(root / "run"), "--split", "train", "--out", str(root / "p")]) == 0
    assert main(["probe", "eval", "--probe", str(root / "p"), "--run", str(root / "run"), "--split", "val",
                 "--baseline", "own-answer", "--baseline", "entropy", "--n-boot", "100",
                 "--out", str(root / "vizwiz")]) == 0
    return root / "vizwiz"


def test_report_writes_tables_plots_and_self_contained_html(eval_dir: Path, tmp_path: Path):
    out = tmp_path / "rep"
    assert main(["report", str(eval_dir), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vizwiz"] == json.loads((eval_dir / "metrics.json").read_text())
    md = (out / "report.md").read_text()
    auroc = metrics["vizwiz"]["auroc"]
    lo, hi = metrics["vizwiz"]["auroc_ci"]
    assert f"| probe (LogisticProbe) | {auroc:.3f} [{lo:.3f}, {hi:.3f}] |" in md  # fractions, as every report
    assert "| own-answer |" in md and "| entropy |" in md and "![roc vizwiz](roc_vizwiz.png)" in md
    for png in ("roc_vizwiz.png", "scores_vizwiz.png"):
        with Image.open(out / png) as img:
            assert img.size[0] >= 400 and len(np.unique(np.asarray(img.convert("L")))) > 10
    html = (out / "report.html").read_text()
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(embedded) == 2 and base64.b64decode(embedded[0]) == (out / "roc_vizwiz.png").read_bytes()
    assert "src='http" not in html and "<table>" in html


def test_report_html_renders_in_headless_chromium(eval_dir: Path, tmp_path: Path, screenshot):
    out = tmp_path / "rep"
    assert main(["report", str(eval_dir), str(eval_dir), "--out", str(out)]) == 0  # the same eval twice
    assert (out / "roc_vizwiz-2.png").is_file()
    shot = screenshot(out / "report.html", 1200, 1600)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape[:2] == (1600, 1200)
    # Plot lines/bars are saturated colours (tab:blue, tab:red, ...); text and table borders are grey.
    saturation = img.max(axis=2) - img.min(axis=2)
    rows_with_colour = np.flatnonzero((saturation > 80).sum(axis=1) > 5)
    assert rows_with_colour.size > 200  # the plots were decoded and drawn
    dark = (img.max(axis=2) < 100).sum(axis=1)
    assert dark[: rows_with_colour.min()].sum() > 500  # text and table above the first plot


def test_report_html_references_only_data_uris_and_in_page_anchors(eval_dir: Path, tmp_path: Path):
    from html.parser import HTMLParser

    out = tmp_path / "rep"
    assert main(["report", str(eval_dir), "--out", str(out)]) == 0

    class Refs(HTMLParser):
        refs: list[tuple[str, str, str]] = []
        ids: set[str] = set()

        def handle_starttag(self, tag, attrs):
            for name, value in attrs:
                if name in ("src", "href", "srcset", "poster", "data") or (name == "style" and "url(" in value):
                    self.refs.append((tag, name, value or ""))
                if name in ("id", "name"):
                    self.ids.add(value or "")

    parser = Refs()
    parser.feed((out / "report.html").read_text())
    assert any(name == "src" for _, name, _ in parser.refs)  # the plots are there to check
    for tag, name, value in parser.refs:
        assert value.startswith("data:") or (value.startswith("#") and value[1:] in parser.ids), (tag, name, value)
    assert "url(http" not in (out / "report.html").read_text() and "@import" not in (out / "report.html").read_text()


def test_report_starts_with_a_summary_and_says_what_each_method_means(eval_dir: Path, tmp_path: Path):
    out = tmp_path / "rep"
    assert main(["report", str(eval_dir), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())["vizwiz"]
    md = (out / "report.md").read_text()
    assert md.index("## Summary") < md.index("## What the labels and methods mean") < md.index("## vizwiz")
    base = m["baselines"]
    best = max(base, key=lambda b: base[b]["auroc"])
    lo, hi = m["auroc_ci"]
    words = ("the probe is better (its 95% interval lies above)" if lo > base[best]["auroc"] else
             "the probe is higher, but its 95% interval includes the other value" if m["auroc"] > base[best]["auroc"]
             else "the probe does NOT beat it")
    cells = "; ".join(f"{b} {v['auroc']:.3f} [{v['auroc_ci'][0]:.3f}, {v['auroc_ci'][1]:.3f}]" for b, v in base.items())
    assert f"| vizwiz | {m['n']} | {m['auroc']:.3f} [{lo:.3f}, {hi:.3f}] | {cells} | vs {best}: {words} |" in md
    assert "- **own-answer**: the model's own generated answer, read as a label: 1 unless it refuses" in md
    assert "- **entropy**: minus the entropy of the first generated token's distribution" in md
    assert m["label_names"] is None and "- **vizwiz: labels**: 1 and 0 as the rows give them" in md
    assert "- **probe (LogisticProbe, logits)**: a linear probe on the logits of generated token 0 (0 = the first)" in md


def test_roc_legend_names_each_method_with_its_auroc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from matplotlib import pyplot as plt
    from sklearn.metrics import roc_auc_score

    from lvlmlp.study import report

    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    legends: list[list[str]] = []
    save = report.save_figure

    def keep_legend(fig, path):
        legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep_legend)
    report.plot_roc_curves([("probe", y, s), ("one token", y, 1 - s)], tmp_path / "roc.png", "ROC")
    assert legends == [[f"probe (AUROC {roc_auc_score(y, s):.3f})", f"one token (AUROC {roc_auc_score(y, 1 - s):.3f})",
                        "chance (AUROC 0.500)"]]
    assert (tmp_path / "roc.png").is_file() and not plt.get_fignums()  # saved and closed


def test_verdicts_name_the_own_answer_then_the_best_baseline():
    from lvlmlp.study.report import comparisons

    base = {"own-answer:refusal": 0.70, "token-prob:No": 0.95, "max-prob": None}
    assert comparisons(0.90, [0.85, 0.94], base, "own-answer:refusal") == (
        "vs own-answer:refusal: the probe is better (its 95% interval lies above); "
        "vs the best baseline, token-prob:No: the probe does NOT beat it")
    # The own answer is the best: one verdict; no own answer: the best alone; nothing measured: said so.
    assert comparisons(0.9, [0.8, 0.95], {"own-answer": 0.85, "entropy": 0.6}, "own-answer") == (
        "vs own-answer: the probe is higher, but its 95% interval includes the other value")
    assert comparisons(0.9, None, {"entropy": 0.6}, None) == (
        "vs the best baseline, entropy: the probe is higher, but its 95% interval includes the other value")
    assert comparisons(0.9, None, {"entropy": None}, None) == "no baseline"


def test_per_group_figures_are_written_where_the_glossary_promises_them():
    from lvlmlp.study.report import group_text

    asr = {"per_scenario": {"text": 0.0, "typo": 0.06}, "n_unsafe": {"text": 50, "typo": 50}, "average": 0.03}
    assert group_text("scenario", "attack-success-rate", asr) == (
        " Attack success rate of the probe per scenario (unsafe rows it lets through, of n unsafe): "
        "text 0.000 (n=50), typo 0.060 (n=50); average 0.030.")
    pope = {"random": {"accuracy": 0.75, "f1": 0.8, "n": 66}}
    assert group_text("category", "pope", pope) == " Per category (pope): random: accuracy 0.750, f1 0.800, n 66."
    assert group_text("scenario", "attack-success-rate", None) == ""


# Damaged result JSON (issue 27 item 6).

@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "invalid JSON ("),
    (lambda text: "[1, 2]", "expected a JSON object, got list"),
    (lambda text: json.dumps({**json.loads(text), "auroc": "high"}), "'auroc' must be a number or null, got 'high'"),
])
def test_report_on_a_damaged_metrics_json_is_one_line_naming_the_file(tmp_path, capsys, damage, message):
    """Catches: JSONDecodeError / AttributeError / format-code tracebacks of `report` (issue 27 item 6)."""
    run = write_run(tmp_path / "run", [0, 1] * 6)
    assert cli(capsys, "probe", "train", "--run", run, "--out", tmp_path / "p")[0] == 0
    assert cli(capsys, "probe", "eval", "--probe", tmp_path / "p", "--run", run, "--out", tmp_path / "e",
               "--n-boot", "10")[0] == 0
    path = tmp_path / "e" / "metrics.json"
    path.write_text(damage(path.read_text()))
    code, err = cli(capsys, "report", tmp_path / "e", "--out", tmp_path / "rep")
    assert code == 2 and err.startswith(f"{path}: {message}"), err
    assert not (tmp_path / "rep").exists()
