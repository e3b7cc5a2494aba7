"""The transfer table (issue 30): `lvlmlp transfer` over finished `lvlmlp run` folders of one model; its shape, the
diagonal equal to each folder's own evaluation, an off-diagonal cell equal to scikit-learn, every cell recomputed
from its saved scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lvlmlp.cli import main
from lvlmlp.extraction.store import open_run
from lvlmlp.probing.metrics import bootstrap_ci
from lvlmlp.testing import tiny_manifest


def _config(root: Path, name: str, prompt: str) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "task": "jsonl", "prompt": prompt, "device": "cpu", "dtype": "float32",
        "extract": {"max_new_tokens": 2, "store_dtype": "float32"}, "probe": {"kind": "logistic"},
        "analyses": {"token_decay": False, "layer_sweep": False}, "n_boot": 50}))
    return path


@pytest.fixture(scope="module")
def folders(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("transfer")
    out = []
    # two "tasks" of one model: other rows (seeds), other prompts, other sizes
    for name, prompt, seed, sizes in (("bright-a", "oe", 0, (24, 16)), ("bright-b", "oeh", 1, (20, 12))):
        data = tiny_manifest(root / f"data-{name}", *sizes, seed=seed)
        folder = root / name
        assert main(["run", str(_config(root, name, prompt)), "--model", str(tiny_ckpt("llava")), "--out",
                     str(folder), "--no-progress", "--set", f"data_root={data}"]) == 0
        out.append(folder)
    return out


def test_transfer_table(folders: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "transfer"
    assert main(["transfer", *map(str, folders), "--out", str(out), "--n-boot", "50"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| train \\ test | bright-a | bright-b |"
    doc = json.loads((out / "transfer.json").read_text())
    assert doc["names"] == ["bright-a", "bright-b"] and doc["tasks"] == ["jsonl", "jsonl"]
    assert [len(r) for r in doc["cells"]] == [2, 2]
    prompts = {"bright-a": "oe", "bright-b": "oeh"}
    for i, (folder_a, row) in enumerate(zip(folders, doc["cells"])):
        for j, (folder_b, cell) in enumerate(zip(folders, row)):
            assert (cell["train"], cell["test"]) == (doc["names"][i], doc["names"][j])
            records = [json.loads(x) for x in (out / cell["scores"]).read_text().splitlines()]
            y = np.array([r["label"] for r in records])
            s = np.array([r["score"] for r in records])
            assert cell["n"] == len(records)
            assert cell["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            assert cell["auroc_ci"] == pytest.approx(list(bootstrap_ci(y, s, "auroc", n_boot=50, seed=0)), abs=1e-12)
            # independently: LogisticRegression() on A's train first-token logits, scored on B's test rows
            train = open_run(folder_a / "runs" / f"{prompts[cell['train']]}-train")
            test = open_run(folder_b / "runs" / f"{prompts[cell['test']]}-test")
            sk = LogisticRegression().fit(np.asarray(train.logits(0)), train.labels.astype(int))
            assert [r["id"] for r in records] == test.ids
            np.testing.assert_allclose(s, sk.predict_proba(np.asarray(test.logits(0)))[:, 1], atol=1e-6)
            if i == j:  # the diagonal is the folder's own evaluation
                own = json.loads((folder_a / "evals" / prompts[cell["train"]] / "metrics.json").read_text())
                assert cell["auroc"] == pytest.approx(own["auroc"], abs=1e-12)


def test_transfer_refusals(folders: list[Path], tmp_path: Path, capsys) -> None:
    assert main(["transfer", str(folders[0]), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == "lvlmlp: error: transfer: give two or more `lvlmlp run` folders"
    other = tmp_path / "other"
    other.mkdir()
    assert main(["transfer", str(folders[0]), str(other), "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == (f"lvlmlp: error: {other}: not a finished `lvlmlp run` folder "
                                               "(no report/metrics.json)")
    # the table is never written over or inside a folder it reads
    assert main(["transfer", *map(str, folders), "--out", str(folders[0] / "t")]) == 2
    assert "lies inside RUN_DIR" in capsys.readouterr().err
    assert main(["transfer", *map(str, folders), "--prompt", "mq", "--out", str(tmp_path / "t")]) == 2
    assert capsys.readouterr().err.strip() == (f"lvlmlp: error: {folders[0]}: no evaluation of prompt 'mq' "
                                               "(prompts: oe)")
