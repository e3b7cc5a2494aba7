"""Every flag does what it says or is refused (issue 19): row selection with --data works as with a task, and flags
that would do nothing in a combination stop with a one-line error naming the flag (exit 2)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.tasks import get_task


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 rows: train/test alternate, labels 0/1 in blocks so that splits and classes cross."""
    root = tmp_path_factory.mktemp("flags")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"img/{i}.png", "question": "what is this?", "label": (i // 2) % 2,
                      "split": "train" if i % 2 else "test"})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def _extract(ckpt: Path, manifest: Path, out: Path, *flags: str) -> int:
    return main(["extract", "--model", str(ckpt), "--data", str(manifest), "--out", str(out), "--workers", "0",
                 "--no-progress", *flags])


def test_data_split_per_class_and_limit_select_rows_like_a_task(tiny_ckpt, manifest, tmp_path):
    ckpt = tiny_ckpt("llava")
    assert _extract(ckpt, manifest, tmp_path / "test", "--split", "test") == 0
    run = open_run(tmp_path / "test")
    assert run.ids == [f"r{i}" for i in range(0, 12, 2)]
    chosen = run.manifest["selection"]
    assert {k: chosen[k] for k in ("split", "per_class", "limit", "seed", "task")} == {
        "split": "test", "per_class": None, "limit": None, "seed": 0, "task": None}

    assert _extract(ckpt, manifest, tmp_path / "pc", "--split", "train", "--per-class", "2", "--seed", "4") == 0
    picked = open_run(tmp_path / "pc")
    assert Counter(m["label"] for m in picked.meta) == {0: 2, 1: 2}
    assert all(m["split"] == "train" for m in picked.meta)

    # --limit samples the same seeded subset as the registered `jsonl` task does with the same flags.
    assert _extract(ckpt, manifest, tmp_path / "lim", "--limit", "5", "--seed", "3") == 0
    expected = [r["id"] for r in get_task("jsonl").rows(manifest, limit=5, seed=3)]
    assert open_run(tmp_path / "lim").ids == expected and expected != _ids(manifest)[:5]


def test_a_resume_with_another_selection_is_refused(tiny_ckpt, manifest, tmp_path, capsys):
    ckpt = tiny_ckpt("llava")
    assert _extract(ckpt, manifest, tmp_path / "run", "--split", "test") == 0
    capsys.readouterr()
    assert _extract(ckpt, manifest, tmp_path / "run", "--split", "train") == 2
    err = capsys.readouterr().err
    assert "selection" in err and "Traceback" not in err
    assert open_run(tmp_path / "run").ids == [f"r{i}" for i in range(0, 12, 2)]  # the finished run is intact


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--split", "val"], "no row has split 'val' (splits present: test, train)"),
        (["--data-root", "x"], "--data-root applies to --task NAME only"),
        (["--image-root", "x"], "--image-root applies to --task NAME only"),
        (["--task-option", "a=b"], "--task-option applies to --task NAME only"),
        (["--prompt-style", "oe"], "--prompt-style applies to --task NAME only"),
        (["--seed", "3"], "--seed: extract has nothing to seed"),
        (["--per-class", "0"], "--per-class: must be an integer >= 1, got '0'"),
        (["--logits-tokens", "2"], "--logits-tokens applies to generated tokens"),
    ],
)
def test_extract_flags_that_would_do_nothing_are_refused(manifest, tmp_path, capsys, flags, needle):
    # No model is loaded for these: the model path does not even exist.
    assert _extract(tmp_path / "no-model", manifest, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prompt_style_and_template_together_are_refused(tmp_path, capsys):
    code = main(["extract", "--model", "m", "--task", "pope", "--data-root", str(tmp_path / "data"), "--out",
                 str(tmp_path / "o"), "--prompt-style", "oe", "--prompt-template", "{question}!"])
    assert code == 2 and "give --prompt-style or --prompt-template, not both" in capsys.readouterr().err


@pytest.fixture(scope="module")
def probe_dir(tiny_ckpt, manifest, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("probe")
    assert _extract(tiny_ckpt("llava"), manifest, root / "run") == 0
    assert main(["probe", "train", "--run", str(root / "run"), "--out", str(root / "probe")]) == 0
    return root


def test_generate_reads_the_split_and_refuses_temperature_without_sampling(tiny_ckpt, manifest, probe_dir,
                                                                          tmp_path, capsys):
    ckpt = tiny_ckpt("llava")
    base = ["generate", "--model", str(ckpt), "--data", str(manifest), "--probe", str(probe_dir / "probe"),
            "--template", "Sorry", "--max-new-tokens", "6", "--no-progress"]
    assert main([*base, "--split", "train", "--out", str(tmp_path / "g.jsonl")]) == 0
    assert _ids(tmp_path / "g.jsonl") == [f"r{i}" for i in range(1, 12, 2)]
    capsys.readouterr()
    assert main([*base, "--temperature", "0.7", "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "--temperature applies to sampling only" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--probe", "lda", "--C", "2"], "--C does not apply to --probe lda"),
        (["--probe", "logistic", "--epochs", "3"], "--epochs does not apply to --probe logistic"),
        (["--probe", "lda", "--standardize"], "--standardize does not apply to --probe lda"),
        (["--layer", "1"], "--layer applies to --feature layer only"),
        (["--probe", "svm"], "--probe 'svm': unknown probe (choose from logistic, multinomial, lda, mlp, mtre)"),
    ],
)
def test_probe_train_refuses_hyper_parameters_of_another_probe(probe_dir, tmp_path, capsys, flags, needle):
    assert main(["probe", "train", "--run", str(probe_dir / "run"), "--out", str(tmp_path / "p"), *flags]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_probe_train_hyper_parameters_take_effect(probe_dir, tmp_path):
    assert main(["probe", "train", "--run", str(probe_dir / "run"), "--out", str(tmp_path / "m"), "--probe",
                 "multinomial", "--epochs", "3", "--lr", "0.5", "--threshold", "0.3"]) == 0
    doc = json.loads((tmp_path / "m" / "probe.json").read_text())
    assert doc["params"]["epochs"] == 3 and doc["params"]["lr"] == 0.5 and doc["params"]["threshold"] == 0.3 and "threshold" not in doc
    assert doc["params"]["weight_decay"] == 1e-4  # not given: the probe class's own default


@pytest.mark.parametrize("flag", [["--data-root", "x"], ["--image-root", "x"], ["--split", "train"],
                                  ["--prompt-style", "oe"], ["--task-option", "a=b"], ["--per-class", "2"],
                                  ["--seed", "1"]])
def test_tasks_refuses_dump_only_flags_without_dump(flag, capsys):
    assert main(["tasks", "vizwiz", *flag]) == 2
    assert f"tasks: {flag[0]} applies to --dump only" in capsys.readouterr().err
