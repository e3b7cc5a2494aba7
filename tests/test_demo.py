"""`lvlmlp demo` at a reduced size: it runs, and every number in results.json recomputes from the saved scores."""

from __future__ import annotations

import json

import numpy as np
from sklearn.metrics import roc_auc_score

from lvlmlp.cli import main


def test_demo_reduced_results_recompute_from_scores(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n-train", "40", "--n-test", "40", "--max-new-tokens", "3",
                 "--threads", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| answerability (VizWiz) |" in printed and "Probe-guided decoding on safety" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"answerability", "safety", "deception", "uncertainty", "hallucination",
                                     "classification"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6  # five ROC plots and the token-decay plot
    for task, entry in results["tasks"].items():
        recs = [json.loads(line) for line in (out / "scores" / f"{task}.jsonl").read_text().splitlines()]
        assert len(recs) == entry["n_test"] == 40
        y = np.array([r["label"] for r in recs])
        if task == "classification":
            acc = float(np.mean(np.array([r["probe_pred"] for r in recs]) == y))
            assert entry["probe"]["accuracy"] == acc
            continue
        for key, name in (("probe", "probe"), ("own_answer", "own_answer"), ("token_prob", "token_prob")):
            if name in entry and entry[name]["auroc"] is not None:
                assert entry[name]["auroc"] == roc_auc_score(y, [r[key] for r in recs]), (task, key)
        assert [p["token"] for p in entry["token_decay"]] == [1, 2, 3]
    for task, ft in results["finetune"].items():  # finetuned vs probe: the same probe scores, the same test rows
        assert ft["methods"]["probe (base model)"]["auroc"] == results["tasks"][task]["probe"]["auroc"], task
        assert ft["n_test"] == 40 and ft["n_finetune_rows"] == 32
    assert "Finetuning (LoRA, 32 train rows, 2 epochs) vs probing" in printed
    for task, s in results["steering"].items():
        assert s["before"]["n_label0"] + s["before"]["n_label1"] == 40, task
        assert 0 <= s["after"]["label0_answered"] <= s["after"]["n_label0"]
