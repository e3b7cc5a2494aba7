"""`tasks:` in an `lvlmlp run` config (issue 30): several tasks of one model in one run, the transfer table in its
report; every cell recomputed from its saved scores and checked against scikit-learn; a re-run does no model work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.store import open_run
from lvlmlp.probing.metrics import bootstrap_ci
from lvlmlp.study.config import load_config
from lvlmlp.testing import tiny_manifest


def _config(root: Path, data: list[Path], **extra: object) -> Path:
    path = root / "multi.yaml"
    path.write_text(yaml.safe_dump({
        "name": "multi", "task": "jsonl", "prompt": "oe", "device": "cpu", "dtype": "float32",
        "extract": {"max_new_tokens": 2, "store_dtype": "float32"}, "probe": {"kind": "logistic"},
        "analyses": {"token_decay": False, "layer_sweep": False}, "n_boot": 50,
        # two "tasks" of one model: other rows (seeds), sizes and prompts
        "tasks": [{"name": "bright-a", "data_root": str(data[0])},
                  {"name": "bright-b", "data_root": str(data[1]), "prompt": "oeh"}], **extra}))
    return path


@pytest.fixture(scope="module")
def experiment(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("multitask")
    data = [tiny_manifest(root / "data-a", 24, 16, seed=0), tiny_manifest(root / "data-b", 20, 12, seed=1)]
    out = root / "out"
    argv = ["run", str(_config(root, data)), "--model", str(tiny_ckpt("llava")), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return {"root": root, "data": data, "out": out, "argv": argv,
            "doc": json.loads((out / "report" / "metrics.json").read_text())}


def test_each_task_runs_in_its_own_folder(experiment: dict) -> None:
    out, doc = experiment["out"], experiment["doc"]
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["bright-a", "bright-b"]
    assert list(doc["evaluations"]) == ["bright-a: oe", "bright-b: oeh"]
    for name, prompt in (("bright-a", "oe"), ("bright-b", "oeh")):
        own = json.loads((out / "tasks" / name / "evals" / prompt / "metrics.json").read_text())
        assert doc["evaluations"][f"{name}: {prompt}"]["auroc"] == own["auroc"]
        assert (out / "tasks" / name / "report" / "report.html").is_file()


def test_transfer_table_in_the_report(experiment: dict) -> None:
    out, doc = experiment["out"], experiment["doc"]
    table = doc["transfer"]
    assert table == json.loads((out / "transfer" / "transfer.json").read_text())
    assert table["names"] == ["bright-a", "bright-b"] and [len(r) for r in table["cells"]] == [2, 2]
    md = (out / "report" / "report.md").read_text()
    lines = md[md.index("## Transfer between tasks"):].splitlines()
    header = lines.index("| train \\ test | bright-a | bright-b |")
    assert lines[header + 2].startswith("| bright-a | ") and lines[header + 3].startswith("| bright-b | ")
    assert "Transfer between tasks" in (out / "report" / "report.html").read_text()
    prompts = {"bright-a": "oe", "bright-b": "oeh"}
    for i, row in enumerate(table["cells"]):
        for j, cell in enumerate(row):
            assert (cell["train"], cell["test"]) == (table["names"][i], table["names"][j])
            # the cell from its saved scores alone
            records = [json.loads(x) for x in (out / "transfer" / cell["scores"]).read_text().splitlines()]
            y, s = np.array([r["label"] for r in records]), np.array([r["score"] for r in records])
            assert cell["n"] == len(records) == (16 if j == 0 else 12)
            assert cell["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
            assert cell["auroc_ci"] == pytest.approx(list(bootstrap_ci(y, s, "auroc", n_boot=50, seed=0)), abs=1e-12)
            # and independently: LogisticRegression() on the train task's logits, scored on the test task's rows
            a, b = out / "tasks" / cell["train"], out / "tasks" / cell["test"]
            train = open_run(a / "runs" / f"{prompts[cell['train']]}-train")
            test = open_run(b / "runs" / f"{prompts[cell['test']]}-test")
            sk = LogisticRegression().fit(np.asarray(train.logits(0)), train.labels.astype(int))
            assert [r["id"] for r in records] == test.ids
            np.testing.assert_allclose(s, sk.predict_proba(np.asarray(test.logits(0)))[:, 1], atol=1e-6)
            if i == j:
                own = json.loads((a / "evals" / prompts[cell["train"]] / "metrics.json").read_text())
                # the same probe on the same rows through another code path (other batch shapes): the scores agree
                # to the last bits, so the AUROC within one swapped near-tie pair
                evaluated = [json.loads(x) for x in (a / "evals" / prompts[cell["train"]] / "scores.jsonl")
                             .read_text().splitlines()]
                assert [r["id"] for r in evaluated] == test.ids
                np.testing.assert_allclose(s, [r["score"] for r in evaluated], atol=1e-6)
                pairs = int(y.sum()) * int((1 - y).sum())
                assert cell["auroc"] == pytest.approx(own["auroc"], abs=1 / pairs)


def test_rerun_does_no_model_work(experiment: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import lvlmlp.extraction.backend

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished experiment must not load a model")

    monkeypatch.setattr(lvlmlp.extraction.backend, "Backend", forbidden)
    out = experiment["out"]
    stamps = {str(p): p.stat().st_mtime_ns for p in out.rglob("steps/*.json")}
    table = (out / "transfer" / "transfer.json").stat().st_mtime_ns
    assert main(experiment["argv"]) == 0
    assert json.loads((out / "report" / "metrics.json").read_text()) == experiment["doc"]
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("steps/*.json")} == stamps
    assert (out / "transfer" / "transfer.json").stat().st_mtime_ns == table  # not rebuilt either


def test_transfer_false(experiment: dict, tiny_ckpt) -> None:
    root = experiment["root"] / "off"
    root.mkdir()
    out = root / "out"
    assert main(["run", str(_config(root, experiment["data"], transfer=False)), "--model", str(tiny_ckpt("llava")),
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "report" / "metrics.json").read_text())
    assert "transfer" not in doc and not (out / "transfer").exists()
    assert "Transfer between tasks" not in (out / "report" / "report.md").read_text()
    assert list(doc["evaluations"]) == ["bright-a: oe", "bright-b: oeh"]


@pytest.mark.parametrize("change, message", [
    ({"tasks": [{"name": "a", "model": "other"}]},
     "config: tasks[0]: model is shared by every task (one model, one run folder); set it outside tasks:"),
    ({"tasks": [{"name": "a"}, {"name": "a"}]}, "config: tasks[1]: a second task named 'a'; give each entry its "
                                                "own name:"),
    ({"tasks": [{"name": "a/b"}]}, "config: tasks[0]: name 'a/b' names a folder: use letters, digits, '-', '_' "
                                   "and '.'"),
    ({"tasks": ["vizwiz"]}, "config: tasks[0]: expected a mapping, got 'vizwiz'"),
    ({"tasks": [{"name": "a", "batch_size": 0}]}, "config: tasks[0]: batch_size: must be an integer >= 1, got 0"),
    ({"tasks": [{"name": "a", "data_root": None}]}, "config: tasks[0]: 'data_root' is required (in the file, or "
                                                    "--data-root / --set)"),
    ({"tasks": [{"name": "a"}], "transfer": True}, "config: transfer needs two or more tasks: entries"),
    ({"transfer": True}, "config: transfer is the table of several tasks: list them under tasks:"),
    ({"tasks": [{"name": "a"}, {"name": "b", "splits": {"cv": 3}}], "transfer": True},
     "config: transfer needs splits {train, test} (a fitted probe per task), not cv"),
])
def test_config_errors(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "out": str(tmp_path / "o"), "data_root": "d.jsonl",
                                    "prompt": "oe", **change}))
    with pytest.raises(LvlmlpError) as err:
        load_config(path)
    assert str(err.value) == message


def test_out_over_a_tasks_data_is_refused(experiment: dict, tiny_ckpt, capsys) -> None:
    data = experiment["data"][1]  # the second task's manifest; OUT would be its folder
    assert main(["run", str(_config(experiment["root"], experiment["data"])), "--model", str(tiny_ckpt("llava")),
                 "--out", str(data.parent), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lvlmlp: error: out {data.parent}: contains tasks[1].data_root {data} (an input of this command, which "
        "writing out would overwrite); give another out")
    assert not (data.parent / "tasks").exists()
