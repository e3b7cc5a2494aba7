"""The whole pipeline through the CLI: tiny checkpoint -> extract -> probe train -> probe eval -> report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.probing.probes import load_probe


def bright_dark_manifest(root: Path, n: int) -> Path:
    """Label 1 = bright image, 0 = dark: visible to the vision tower, so the first-token logits carry it."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        label = i % 2
        base = rng.integers(150, 256) if label else rng.integers(0, 90)
        pixels = np.clip(base + rng.normal(0, 20, size=(40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        lines.append({"id": f"x{i}", "image": f"{i}.png", "question": "Is the picture bright?", "label": label,
                      "split": "train" if i < n // 2 else "test"})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_extract_train_eval_report(tiny_ckpt, tmp_path):
    manifest = bright_dark_manifest(tmp_path, 80)
    run_dir, probe_dir, eval_dir, report_dir = (tmp_path / x for x in ("run", "probe", "eval", "report"))
    assert main(["extract", "--model", str(tiny_ckpt("llava")), "--data", str(manifest), "--out", str(run_dir),
                 "--max-new-tokens", "2", "--batch-size", "8", "--no-progress"]) == 0
    assert main(["probe", "train", "--run", str(run_dir), "--split", "train", "--out", str(probe_dir)]) == 0
    assert main(["probe", "eval", "--probe", str(probe_dir), "--run", str(run_dir), "--split", "test",
                 "--baseline", "max-prob", "--out", str(eval_dir)]) == 0
    assert main(["report", str(eval_dir), "--out", str(report_dir)]) == 0
    for name in ("metrics.json", "report.md", "report.html"):
        assert (report_dir / name).is_file(), name
    assert list(report_dir.glob("*.png"))

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    scores = [json.loads(line) for line in (eval_dir / "scores.jsonl").read_text().splitlines()]
    y = [s["label"] for s in scores]
    assert len(scores) == 40
    # the AUROC in metrics.json recomputes from the saved scores, and from the probe applied to the run itself
    assert metrics["auroc"] == roc_auc_score(y, [s["score"] for s in scores])
    run = open_run(run_dir)
    test = [i for i, s in enumerate(run.splits) if s == "test"]
    direct = load_probe(probe_dir).predict_proba(np.asarray(run.logits(0), dtype=np.float32)[test])[:, 1]
    # `probe eval` reads the rows in chunks (another matrix shape than these 40 rows at once): float rounding only
    np.testing.assert_allclose([s["score"] for s in scores], direct, rtol=1e-6, atol=1e-12)
    assert metrics["auroc"] > 0.8  # the label is learnable from the first-token distribution
