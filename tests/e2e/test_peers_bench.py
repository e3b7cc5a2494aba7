"""bench/peers.py compares equal work: its hand-written transformers peer gives lvlmlp's first-token logits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.extract import extract

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_handwritten_peer_equals_lvlmlp(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # as when run as a script: its folder's peer_cli importable
    ckpt = tiny_ckpt("llava")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(7):  # questions of different lengths: left padding in every batch but one
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(20 + 9 * i, 60 - 5 * i, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"r{i}", "image": str(path), "question": " ".join(["is it red"] * (1 + i % 4)) + "?"})
    theirs = _bench_module("peers_handwritten").first_token_logits(str(ckpt), rows, batch_size=3)
    run = extract(Backend(ckpt, device="cpu", dtype="float32"), rows, tmp_path / "run", batch_size=4,
                  store_dtype="float32", progress=False, workers=0)
    ours = np.asarray(run.logits(0))
    assert list(run.ids) == [r["id"] for r in rows]
    assert theirs.shape == ours.shape == (7, run.manifest["vocab_size"])
    # other batch compositions (3 vs 4 rows): equal up to float rounding
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_first_batch_phases_are_recorded(tiny_ckpt, tmp_path):
    """bench/first_batch.py runs the command unchanged and records when each start-up phase ended, in order."""
    import subprocess
    import sys

    ckpt = tiny_ckpt("llava")
    image = tmp_path / "a.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(image)
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "image": str(image), "question": "red?"}) + "\n" for i in "ab"))
    phases = tmp_path / "phases.json"
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {"PYTHONPATH": src, "LVLMLP_PHASES": str(phases), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(BENCH / "first_batch.py"), "extract", "--model", str(ckpt), "--data",
                           str(manifest), "--out", str(tmp_path / "run"), "--no-progress", "--batch-size", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    marks = json.loads(phases.read_text())
    # the data-loader worker is at work before the weights load (they are not in what it was forked from)
    order = ["python", "cli", "config", "processor", "weights hash", "Backend (config, processor, hash)",
             "first batch prepared, worker forked", "model weights", "run folder opened", "first batch's forward",
             "exit"]
    assert [m for m in marks if m in order] == order
    assert all(marks[a] <= marks[b] for a, b in zip(order, order[1:]))
    again = subprocess.run([sys.executable, "-m", "lvlmlp.cli", "extract", "--model", str(ckpt), "--data",
                            str(manifest), "--out", str(tmp_path / "run"), "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 rows" in again.stdout  # the wrapped run is a finished, valid run
