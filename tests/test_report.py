"""`lvlmlp report`: Markdown table, PNG plots, a self-contained HTML page that renders in headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp.cli import main
from lvlmlp.store import RunWriter


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


def _chromium() -> str:
    """Headless Chromium when installed (`make chromium` installs it); tests never install software."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("headless Chromium is not installed (`make chromium` installs it)")
    return found


def test_report_html_renders_in_headless_chromium(eval_dir: Path, tmp_path: Path):
    chromium = _chromium()
    out = tmp_path / "rep"
    assert main(["report", str(eval_dir), str(eval_dir), "--out", str(out)]) == 0  # the same eval twice
    assert (out / "roc_vizwiz-2.png").is_file()
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           (out / "report.html").resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    # Installed but writing nothing is a failure, not a skip: the page must render where Chromium exists.
    assert shot.is_file(), f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
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
