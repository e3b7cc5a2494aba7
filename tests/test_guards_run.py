"""Guards of `lvlmlp run`: a changed setting redoes exactly the steps that depend on it, an interrupted run resumes
without redoing committed work, and every shipped config loads and validates. Each test names the breakage it
catches (checked by hand once)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

import lvlmlp.extraction.backend
from lvlmlp.cli import main
from lvlmlp.extraction.store import open_run
from lvlmlp.probing.probes import load_probe
from lvlmlp.study.experiment import load_config, prompts_of, split_names
from lvlmlp.tasks import get_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The CI config trimmed to one prompt, no layers and no CLIP: the cheapest experiment with every step kind.
SETS = ["prompt=oe", "extract.layers=[]", "extract.max_new_tokens=2", "n_boot=20", "clip=null"]


def _manifest(root: Path) -> Path:
    rng = np.random.default_rng(4)
    (root / "img").mkdir(parents=True)
    lines = []
    for split, n in (("train", 14), ("test", 10)):
        for i in range(n):
            label = i % 2
            px = np.clip((140 if label else 110) + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / "img" / f"{split}{i}.png")
            lines.append({"id": f"{split}-{i}", "image": f"img/{split}{i}.png", "question": "is it bright ?",
                          "label": label, "split": split})
    (root / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root / "m.jsonl"


@pytest.fixture(scope="module")
def base(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_guard")
    manifest = _manifest(root / "data")
    argv = ["run", str(CONFIGS / "ci_tiny.yaml"), "--model", str(tiny_ckpt("llava")), "--no-progress",
            "--set", f"data_root={manifest}", *[x for s in SETS for x in ("--set", s)]]
    out = root / "out"
    assert main([*argv, "--out", str(out)]) == 0
    return {"argv": argv, "out": out, "doc": json.loads((out / "report" / "metrics.json").read_text())}


def _mtimes(folder: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.glob(pattern))}


def test_changed_probe_setting_redoes_probe_and_report_not_extraction(base, monkeypatch):
    """Catches: resumed steps that ignore their settings (a cached probe kept after --set probe.C=0.5), or a probe
    change that re-extracts."""
    out = base["out"]
    runs_before = _mtimes(out, "runs/*/*.npy")
    assert len(runs_before) >= 4 and "evals/oe/metrics.json" in _mtimes(out, "evals/*/metrics.json")

    def forbidden(*a, **k):
        raise AssertionError("a probe setting must not load the model again")

    monkeypatch.setattr(lvlmlp.extraction.backend, "Backend", forbidden)
    assert main([*base["argv"], "--out", str(out), "--set", "probe.C=0.5"]) == 0
    assert _mtimes(out, "runs/*/*.npy") == runs_before  # no extraction redone
    train, test = open_run(out / "runs" / "oe-train"), open_run(out / "runs" / "oe-test")
    ref = LogisticRegression(C=0.5).fit(np.asarray(train.logits(0), np.float32), train.labels.astype(int))
    probe = load_probe(out / "probes" / "oe")
    assert probe.C == 0.5
    np.testing.assert_allclose(probe.predict_proba(test.logits(0)), ref.predict_proba(test.logits(0)), atol=1e-6)
    doc = json.loads((out / "report" / "metrics.json").read_text())
    assert doc["config"]["probe"]["C"] == 0.5
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(test.labels.astype(int), ref.predict_proba(test.logits(0))[:, 1])
    assert doc["evaluations"]["oe"]["auroc"] == pytest.approx(auroc, abs=1e-9)
    # And back: the original setting gives the original numbers again (recomputed, not a stale file).
    assert main([*base["argv"], "--out", str(out)]) == 0
    again = json.loads((out / "report" / "metrics.json").read_text())
    assert again["evaluations"]["oe"]["auroc"] == pytest.approx(base["doc"]["evaluations"]["oe"]["auroc"], abs=1e-9)


def test_interrupted_run_resumes_without_redoing_committed_extraction(base, tmp_path, monkeypatch):
    """Catches: a resumed `lvlmlp run` re-extracting a finished split or the committed rows of the cut one."""
    out = tmp_path / "out"
    real = lvlmlp.extraction.backend.Backend.generate
    calls: list[int] = []

    def dies_in_test_split(self, batch, **kw):
        if len(calls) == 3:  # train (14 rows) = batches of 8 + 6; the third batch is the test split's first
            raise KeyboardInterrupt
        calls.append(batch["input_ids"].shape[0])
        return real(self, batch, **kw)

    monkeypatch.setattr(lvlmlp.extraction.backend.Backend, "generate", dies_in_test_split)
    assert main([*base["argv"], "--out", str(out), "--set", "batch_size=7"]) == 130
    assert calls == [7, 7, 7]  # train done (2 batches), one test batch was running
    assert (out / "runs" / "oe-train" / "logits.npy").is_file() and not (out / "report" / "metrics.json").exists()

    seen: list[int] = []

    def count(self, batch, **kw):
        seen.append(batch["input_ids"].shape[0])
        return real(self, batch, **kw)

    monkeypatch.setattr(lvlmlp.extraction.backend.Backend, "generate", count)
    train_stamp = _mtimes(out, "runs/oe-train/*.npy")
    assert main([*base["argv"], "--out", str(out), "--set", "batch_size=7"]) == 0
    assert _mtimes(out, "runs/oe-train/*.npy") == train_stamp
    assert sum(seen) == 10  # the test split's rows only (its first batch died before anything was committed)
    doc = json.loads((out / "report" / "metrics.json").read_text())
    want = copy.deepcopy(base["doc"]["evaluations"]["oe"])
    assert doc["evaluations"]["oe"]["auroc"] == pytest.approx(want["auroc"], abs=1e-6)
    assert doc["evaluations"]["oe"]["n"] == want["n"] == 10


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path: Path):
    """Catches: a shipped config with an unknown key, a task or prompt style that does not exist, bad splits."""
    ci = path.stem.startswith("ci_")  # the CI configs (ci_tiny, ci_signals) take the model and data as flags
    cfg = load_config(path, ["data_root=somewhere"] if ci else [], model="tiny" if ci else None)
    task = get_task(cfg["task"])
    assert cfg["name"] == path.stem and cfg["model"]
    prompts = prompts_of(cfg)
    assert prompts and all(t is None or "{question}" in t for _, t in prompts)
    splits = split_names(cfg)
    assert 1 <= len(splits) <= 2
    if not ci:
        assert path.stem.split("_")[0] == cfg["task"] == task.name
