"""A model outside transformers' Auto classes (the backend protocol, docs/backends.md) through `lvlmlp run` and
`lvlmlp serve`: the example MiniGPT-4-shaped backend (examples/minigpt4_backend.py, conftest's `minigpt4`) named by a
config's `backend:` and by `serve --backend`, built by the same `BackendSpec` as `lvlmlp extract --backend`.

Results are checked against independent computations: `lvlmlp extract --backend` of the same rows, scikit-learn's
LogisticRegression on the stored logits, `lvlmlp generate --backend` for the served answers."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import lvlmlp.extraction.protocol
from lvlmlp import open_run
from lvlmlp.cli import build_parser, main
from lvlmlp.data import load_image, read_manifest
from lvlmlp.errors import LvlmlpError
from lvlmlp.study.config import load_config
from lvlmlp.testing import tiny_manifest
from tests.serve.test_serve import data_url, message, running

TEMPLATE = "the answer is"
C = 100.0


def _config(path: Path, **keys: object) -> Path:
    path.write_text(yaml.safe_dump(keys))
    return path


@pytest.fixture(scope="module")
def experiment(minigpt4, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`lvlmlp run` of a config naming the example backend: extraction of both splits, probe, baselines, steering,
    report."""
    _, ckpt, spec = minigpt4
    root = tmp_path_factory.mktemp("protocol_run")
    manifest = tiny_manifest(root / "data", n_train=12, n_test=8)
    config = _config(root / "minigpt4.yaml", name="minigpt4", model=str(ckpt), backend=spec, task="jsonl",
                     data_root=str(manifest), splits={"train": "train", "test": "test"}, device="cpu",
                     dtype="float32", batch_size=5,
                     extract={"max_new_tokens": 4, "hidden": True, "layers": [0, 2], "store_dtype": "float32"},
                     probe={"kind": "logistic", "C": C}, baselines=["max-prob", "entropy"],
                     steering={"template": TEMPLATE}, n_boot=20, out=str(root / "out"))
    argv = ["run", str(config), "--no-progress"]
    assert main(argv) == 0
    return {"root": root, "manifest": manifest, "out": root / "out", "argv": argv, "ckpt": ckpt, "spec": spec,
            "doc": json.loads((root / "out" / "report" / "metrics.json").read_text())}


def test_run_extracts_through_the_backend_as_extract_does(experiment, tmp_path) -> None:
    """Each split's run folder equals `lvlmlp extract --backend` of the same rows, and records the backend."""
    manifest, out = experiment["manifest"], experiment["out"]
    for split in ("train", "test"):
        run = open_run(out / "runs" / f"default-{split}")
        assert run.manifest["backend"] == experiment["spec"] and run.manifest["family"] == "minigpt4-example"
        assert run.manifest["model"] == str(experiment["ckpt"])
        ref_dir = tmp_path / split
        assert main(["extract", "--backend", experiment["spec"], "--model", str(experiment["ckpt"]), "--data",
                     str(manifest), "--split", split, "--out", str(ref_dir), "--device", "cpu", "--dtype", "float32",
                     "--batch-size", "5", "--max-new-tokens", "4", "--hidden", "--layers", "0,2",
                     "--store-dtype", "float32", "--no-progress"]) == 0
        ref = open_run(ref_dir)
        assert run.ids == ref.ids and run.responses == ref.responses and len(run.ids) > 0
        assert list(run.n_tokens) == list(ref.n_tokens)
        for t in range(4):
            np.testing.assert_allclose(run.logits(t), ref.logits(t), atol=1e-5, rtol=0)
        np.testing.assert_allclose(run.layer(2), ref.layer(2), atol=1e-5, rtol=0)
        assert run.manifest["prompt_template"] == ref.manifest["prompt_template"]


def test_run_probes_and_reports_the_backend_runs(experiment) -> None:
    """The evaluation is scikit-learn's logistic regression on the stored first-token logits; steering forced the
    template on exactly the rows the probe flagged; the report was written."""
    out, doc = experiment["out"], experiment["doc"]
    train, test = open_run(out / "runs" / "default-train"), open_run(out / "runs" / "default-test")
    ref = LogisticRegression(C=C).fit(np.asarray(train.logits(0), np.float32), train.labels.astype(int))
    scores = ref.predict_proba(np.asarray(test.logits(0), np.float32))[:, 1]
    assert doc["evaluations"]["default"]["auroc"] == pytest.approx(roc_auc_score(test.labels.astype(int), scores),
                                                                   abs=1e-9)
    records = [json.loads(x) for x in (out / "analyses" / "steering-default.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == list(test.ids)
    np.testing.assert_allclose([r["probe_score"] for r in records], scores, atol=1e-5)
    assert 0 < sum(r["flagged"] for r in records) < len(records)
    by_id = dict(zip(test.ids, test.responses))
    for r in records:
        assert r["response_before"] == by_id[r["id"]]
        assert r["response_after"].startswith(TEMPLATE) == r["flagged"], r
        if not r["flagged"]:  # greedy, unguarded: the extraction's answer
            assert r["response_after"] == r["response_before"]
    assert (out / "report" / "report.html").is_file()


def test_second_run_does_no_model_work(experiment, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished experiment must not load its backend")

    monkeypatch.setattr(lvlmlp.extraction.protocol, "load_backend", forbidden)
    out = experiment["out"]
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "steps").glob("*.json")}
    assert main(experiment["argv"]) == 0
    assert json.loads((out / "report" / "metrics.json").read_text()) == experiment["doc"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "steps").glob("*.json")} == stamps


@pytest.mark.parametrize(("keys", "given"), [
    ({"prompt": "oe"}, "prompt (oe)"),
    ({"prompt": "{question} Answer briefly."}, "prompt (template)"),
    ({"raw_prompt": True, "system_prompt": "Be brief."}, "raw_prompt, system_prompt"),
    ({"trust_remote_code": True}, "trust_remote_code"),
    ({"ray": True}, "ray"),
    ({"extract": {"vision": True}}, "extract.vision"),
    ({"finetune": {"epochs": 1}}, "finetune"),
])
def test_config_backend_refuses_what_does_not_apply(minigpt4, tmp_path, keys, given) -> None:
    _, ckpt, spec = minigpt4
    config = _config(tmp_path / "c.yaml", model=str(ckpt), backend=spec, data_root=str(tmp_path / "m.jsonl"),
                     out=str(tmp_path / "out"), **keys)
    with pytest.raises(LvlmlpError) as err:
        load_config(config)
    assert str(err.value) == ("config: backend: the backend renders its own prompts and loads its own model, "
                              f"so it takes no {given}")


def test_serve_answers_through_the_backend_as_generate_does(minigpt4, experiment, tmp_path, capsys) -> None:
    """`serve --backend`: each request gets the answer, flag and probe score that `generate --backend` gives its
    row (greedy), flagged answers start with the template."""
    _, ckpt, spec = minigpt4
    probe = experiment["out"] / "probes" / "default"
    manifest = experiment["manifest"]
    common = ["--backend", spec, "--model", str(ckpt), "--probe", str(probe), "--template", TEMPLATE,
              "--device", "cpu", "--dtype", "float32"]
    out = tmp_path / "gen.jsonl"
    assert main(["generate", *common, "--data", str(manifest), "--split", "test", "--max-new-tokens", "6",
                 "--no-progress", "--out", str(out)]) == 0
    generated = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert 0 < sum(x["flagged"] for x in generated.values()) < len(generated)
    from lvlmlp.commands.serve import build_app

    app = build_app(build_parser().parse_args(["serve", *common, "--max-tokens", "6"]))
    rows = [r for r in read_manifest(manifest) if r["split"] == "test"]
    with running(app) as url:
        for row in rows:
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "ckpt", "temperature": 0,
                "messages": message(data_url(load_image(row["image"], row["id"])), row["question"])}).json()
            choice, want = reply["choices"][0], generated[row["id"]]
            assert choice["message"]["content"] == want["response"], row["id"]
            assert choice["flagged"] is want["flagged"]
            assert choice["probe_score"] == pytest.approx(want["probe_score"], abs=1e-5)
            assert choice["message"]["content"].startswith(TEMPLATE) == want["flagged"]
    capsys.readouterr()
    assert main(["serve", *common, "--raw-prompt"]) == 2
    assert capsys.readouterr().err.strip() == ("lvlmlp: error: --backend: the backend renders its own prompts and "
                                               "loads its own model, so it takes no --raw-prompt")
