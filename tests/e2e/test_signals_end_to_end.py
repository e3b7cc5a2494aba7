"""Issue 30's signals on a real (tiny) model's run: extract 4 tokens, then the first-token probe, the `mtre` probe on
`multi-token` features, the `mlp` probe and the sequence estimators, compared pairwise with `probe compare`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.probing.compare import delong_test
from tests.e2e.test_end_to_end import bright_dark_manifest


def test_signals_on_a_tiny_models_run(tiny_ckpt, tmp_path, capsys):
    manifest = bright_dark_manifest(tmp_path, 60)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows[::5]:  # every fifth label flipped: no signal separates the rows perfectly (DeLong's variance > 0)
        row["label"] = 1 - row["label"]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_dir = tmp_path / "run"
    assert main(["extract", "--model", str(tiny_ckpt("llava")), "--data", str(manifest), "--out", str(run_dir),
                 "--max-new-tokens", "4", "--batch-size", "8", "--no-progress"]) == 0
    run = open_run(run_dir)
    trainings = {
        "first": [],
        "mtre": ["--feature", "multi-token", "--tokens", "4", "--probe", "mtre"],
        "mlp": ["--probe", "mlp", "--hidden", "32,16", "--epochs", "40"],
    }
    for name, flags in trainings.items():
        assert main(["probe", "train", "--run", str(run_dir), "--split", "train", *flags,
                     "--out", str(tmp_path / f"p-{name}")]) == 0
        assert main(["probe", "eval", "--probe", str(tmp_path / f"p-{name}"), "--run", str(run_dir), "--split", "test",
                     "--baseline", "seq-prob", "--baseline", "perplexity", "--n-boot", "50",
                     "--out", str(tmp_path / f"e-{name}")]) == 0
    metrics = {name: json.loads((tmp_path / f"e-{name}" / "metrics.json").read_text()) for name in trainings}
    test = [i for i, s in enumerate(run.splits) if s == "test"]
    n_tokens = run.n_tokens[test]
    assert metrics["mtre"]["n_short"] == int(np.sum((n_tokens > 0) & (n_tokens < 4)))
    assert metrics["mtre"]["n_scored"] == metrics["first"]["n_scored"] == int(np.sum(n_tokens > 0))
    capsys.readouterr()
    for a, b in (("mtre", "first"), ("mlp", "first")):
        out = tmp_path / f"{a}-vs-{b}.json"
        assert main(["probe", "compare", str(tmp_path / f"e-{a}"), str(tmp_path / f"e-{b}"), "--n-boot", "50",
                     "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["auroc_a"] == pytest.approx(metrics[a]["auroc"], abs=1e-12)
        assert result["auroc_b"] == pytest.approx(metrics[b]["auroc"], abs=1e-12)
        recs = {side: [json.loads(line) for line in (tmp_path / f"e-{side}" / "scores.jsonl").read_text().splitlines()]
                for side in (a, b)}
        ref = delong_test([r["label"] for r in recs[a]], [r["score"] for r in recs[a]], [r["score"] for r in recs[b]])
        assert 0 < ref["delong_var"] and result["delong_z"] == pytest.approx(ref["delong_z"], rel=1e-9)
        assert result["delong_p"] == pytest.approx(ref["delong_p"], rel=1e-9)
    # A baseline column against the first-token probe of the same evaluation.
    assert main(["probe", "compare", str(tmp_path / "e-first"), str(tmp_path / "e-first"), "--baseline-b", "seq-prob",
                 "--n-boot", "50"]) == 0
    assert f"({tmp_path / 'e-first'} [seq-prob])" in capsys.readouterr().out
