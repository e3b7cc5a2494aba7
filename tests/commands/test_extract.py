"""`lvlmlp extract` (commands/extract.py): every flag does what it says or is refused (issue 19): row
selection with --data works as with a task, and flags that would do nothing in a combination stop with a one-
line error naming the flag (exit 2)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.tasks import get_task
from tests.commands.conftest import extract_cli, ids_of


def test_data_split_per_class_and_limit_select_rows_like_a_task(tiny_ckpt, manifest, tmp_path):
    ckpt = tiny_ckpt("llava")
    assert extract_cli(ckpt, manifest, tmp_path / "test", "--split", "test") == 0
    run = open_run(tmp_path / "test")
    assert run.ids == [f"r{i}" for i in range(0, 12, 2)]
    chosen = run.manifest["selection"]
    assert {k: chosen[k] for k in ("split", "per_class", "limit", "seed", "task")} == {
        "split": "test", "per_class": None, "limit": None, "seed": 0, "task": None}

    assert extract_cli(ckpt, manifest, tmp_path / "pc", "--split", "train", "--per-class", "2", "--seed", "4") == 0
    picked = open_run(tmp_path / "pc")
    assert Counter(m["label"] for m in picked.meta) == {0: 2, 1: 2}
    assert all(m["split"] == "train" for m in picked.meta)

    # --limit samples the same seeded subset as the registered `jsonl` task does with the same flags.
    assert extract_cli(ckpt, manifest, tmp_path / "lim", "--limit", "5", "--seed", "3") == 0
    expected = [r["id"] for r in get_task("jsonl").rows(manifest, limit=5, seed=3)]
    assert open_run(tmp_path / "lim").ids == expected and expected != ids_of(manifest)[:5]


def test_a_resume_with_another_selection_is_refused(tiny_ckpt, manifest, tmp_path, capsys):
    ckpt = tiny_ckpt("llava")
    assert extract_cli(ckpt, manifest, tmp_path / "run", "--split", "test") == 0
    capsys.readouterr()
    assert extract_cli(ckpt, manifest, tmp_path / "run", "--split", "train") == 2
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
    assert extract_cli(tmp_path / "no-model", manifest, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prompt_style_and_template_together_are_refused(tmp_path, capsys):
    code = main(["extract", "--model", "m", "--task", "pope", "--data-root", str(tmp_path / "data"), "--out",
                 str(tmp_path / "o"), "--prompt-style", "oe", "--prompt-template", "{question}!"])
    assert code == 2 and "give --prompt-style or --prompt-template, not both" in capsys.readouterr().err




def test_a_manifest_is_validated_once_whole_and_its_selected_rows_are_not_checked_again(
        tiny_ckpt, manifest, tmp_path, monkeypatch, capsys):
    import lvlmlp.data
    import lvlmlp.extraction.extract
    import lvlmlp.tasks.base
    from lvlmlp.data import ValidRows

    checked: list[int] = []
    validate = lvlmlp.data.validate_rows

    def spy(rows, source):
        if not isinstance(rows, ValidRows):
            checked.append(len(rows))
        return validate(rows, source)

    for module in (lvlmlp.data, lvlmlp.extraction.extract, lvlmlp.tasks.base):
        monkeypatch.setattr(module, "validate_rows", spy)
    ckpt, out = tiny_ckpt("llava"), tmp_path / "once"
    assert extract_cli(ckpt, manifest, out, "--split", "test", "--limit", "3", "--shard", "0/2") == 0
    assert checked == [12]  # the whole manifest, when it was read; not the 3 rows selected, nor the shard's
    assert len(open_run(out).ids) == 1

    # Whole: a bad row outside the selected split still stops the extraction, naming it.
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[1].update(label="yes", image=str(manifest.parent / rows[1]["image"]))  # r1: a train row
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    assert main(["extract", "--model", str(ckpt), "--data", str(bad), "--out", str(tmp_path / "b"),
                 "--split", "test", "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"lvlmlp: error: {bad}: row 'r1': 'label' must be an int, got 'yes'"
