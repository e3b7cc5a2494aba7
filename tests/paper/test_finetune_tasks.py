"""Issue 26 item 4: finetuning as the paper did it: ONE adapter trained on several tasks' rows together, each row
under its own task's prompt (the style the original evaluated the finetuned model with) and with that prompt's
answer words as its target."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lvlmlp.cli import main
from lvlmlp.extraction.backend import Backend
from lvlmlp.study.finetune import multitask_examples, paper_style
from lvlmlp.tasks import get_task
from lvlmlp.testing import tiny_manifest

FIXTURES = Path(__file__).parents[1] / "fixtures" / "lvlm-lp"
POPE_HINT = "\nAnswer the question using a single word or phrase."  # dataset/POPE.py's text after the question
JSONL_MQ = 'Here is a question about this image: "{q}"\nCan and should it be answered from the image? Reply yes or no.'


def pope_images(root: Path) -> Path:
    images = root / "val2014"
    images.mkdir(parents=True)
    for f in (FIXTURES / "pope").glob("coco_val_pope_*.json"):
        for line in f.read_text().splitlines():
            path = images / json.loads(line)["image"]
            if not path.exists():
                Image.new("RGB", (20, 20), (len(line) % 255, 60, 120)).save(path)
    return images


def test_paper_styles_are_those_finetune_all_evaluated_with():
    # scripts/finetune_all.sh: --prompt mq for VizWiz, MMSafety, MAD; --prompt oe for POPE and ImageNet
    assert {t: paper_style(t) for t in ("vizwiz", "mmsafety", "mad", "pope", "imagenet")} == {
        "vizwiz": "mq", "mmsafety": "mq", "mad": "mq", "pope": "oe", "imagenet": "oe"}


def test_examples_of_two_tasks_carry_each_tasks_prompt_and_words(tiny_ckpt, tmp_path):
    manifest = tiny_manifest(tmp_path / "data", n_train=4, n_test=2)
    images = pope_images(tmp_path)
    jrows = get_task("jsonl").rows(manifest, split="train")
    prows = get_task("pope").rows(FIXTURES / "pope", images, split="test", per_class=2)
    rows, targets = multitask_examples([("jsonl", "mq", jrows), ("pope", "oe", prows)])
    assert [r["id"] for r in rows] == [f"jsonl:mq/{r['id']}" for r in jrows] + [f"pope:oe/{r['id']}" for r in prows]
    assert [r["question"] for r in rows] == ([JSONL_MQ.format(q=r["question"]) for r in jrows]
                                             + [r["question"] + POPE_HINT for r in prows])
    assert targets == [["no", "yes"][r["label"]] for r in jrows] + [["no", "yes"][r["label"]] for r in prows]
    # a backend without a template of its own renders exactly what extraction sends for each task
    plain = Backend(tiny_ckpt("llava"), device="cpu", dtype="float32", load_model=False)
    pope = Backend(tiny_ckpt("llava"), device="cpu", dtype="float32", load_model=False,
                   prompt_template="{question}" + POPE_HINT)
    assert plain.prompt(rows[-1]["question"]) == pope.prompt(prows[-1]["question"])


def test_one_adapter_on_two_tasks_from_the_command_line(tiny_ckpt, tmp_path, capsys):
    manifest = tiny_manifest(tmp_path / "data", n_train=4, n_test=2)
    images = pope_images(tmp_path)
    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(tiny_ckpt("llava")), "--task", "jsonl", "--data-root", str(manifest),
            "--image-root", str(tmp_path / "data"), "--task", "pope", "--data-root", str(FIXTURES / "pope"),
            "--image-root", str(images), "--split", "test", "--per-class", "2", "--epochs", "1", "--batch-size",
            "4", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    n = len(get_task("jsonl").rows(manifest, split="test", per_class=2)) + 4  # + POPE: 2 per class
    assert f"{n} rows, 1 epochs" in capsys.readouterr().out
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["n_rows"] == n and summary["prompt"] == Backend(tiny_ckpt("llava"), load_model=False,
                                                                   device="cpu").prompt("{question}")
    assert (out / "model" / "config.json").is_file()
    for extra, message in (
        (["--data-root", "x"], "--data-root: give one per --task (2), in the same order; got 3"),
        (["--answers", "Yes,No"], "--answers applies to one --task only"),
        (["--prompt-style", "mq"], "--prompt-style: give one per --task (2), in the same order; got 1"),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0


def test_the_run_finetune_section_takes_the_papers_evaluation_prompt(tmp_path):
    from lvlmlp.study.config import load_config
    from lvlmlp.study.experiment import finetune_prompt, prompts_of

    root = Path(__file__).resolve().parents[2] / "configs"
    chosen = {}
    for name in ("mmsafety_llava15_7b", "vizwiz_llava15_7b", "mad_qwen25vl_7b", "pope_llava15_7b", "ci_tiny"):
        cfg = load_config(root / f"{name}.yaml", model="m", data_root="d", out=str(tmp_path))
        chosen[name] = finetune_prompt(cfg, prompts_of(cfg))[0]
    # mq where the config runs it (finetune_all.sh), POPE's oe; else the first prompt (ci_tiny: jsonl oe, oeh)
    assert chosen == {"mmsafety_llava15_7b": "mq", "vizwiz_llava15_7b": "mq", "mad_qwen25vl_7b": "mq",
                      "pope_llava15_7b": "oe", "ci_tiny": "oe"}
