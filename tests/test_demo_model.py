"""The committed demo checkpoint (src/lvlmlp/assets/demo_model) and the script that trains it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp import world as W

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "lvlmlp" / "assets" / "demo_model"
HELD_OUT_SEED = 987_654  # the training script draws from seeds 0 and 1 only


def _prompt(processor, question: str) -> str:
    """The library's default prompt (CONTRACT.md): one user turn, the image then the question."""
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForImageTextToText.from_pretrained(DEMO).eval()
    return model, AutoProcessor.from_pretrained(DEMO)


def _generate(model, processor, images: list, questions: list[str]) -> list[str]:
    inputs = processor(text=[_prompt(processor, q) for q in questions], images=images, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    return [s.strip() for s in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                      skip_special_tokens=True)]


def test_checkpoint_is_small_complete_and_loads_offline(demo) -> None:
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "training_log.txt", "training_log.json"):
        assert (DEMO / name).is_file(), name
    model, processor = demo
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert _prompt(processor, "Is there a red star in the image?") == \
        "USER: <image>\nIs there a red star in the image? ASSISTANT:"
    # every word the world can ask about is in the vocabulary: no question is silently <unk>-ed
    ids = processor.tokenizer(" ".join(sorted(W.vocabulary())), add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids
    n_image_tokens = (W.IMAGE_SIZE // 8) ** 2
    inputs = processor(text=_prompt(processor, W.Q_CLASSIFY), images=np.zeros((64, 64, 3), np.uint8))
    assert inputs["input_ids"][0].count(model.config.image_token_id) == n_image_tokens


def test_demo_model_answers_held_out_easy_questions(demo) -> None:
    """Single clear objects from a seed never used in training: class (30-way) and colour (6-way)."""
    model, processor = demo
    images, truths = [], []
    for i in range(48):
        rng = W.rng_for(HELD_OUT_SEED, "test-easy", i)
        c = int(rng.integers(len(W.CLASS_NAMES)))
        images.append(W.sample_scene(rng, [W._split_class(W.CLASS_NAMES[c])], size=(16, 30)).render())
        truths.append(W.CLASS_NAMES[c])
    classes = _generate(model, processor, images, [W.Q_CLASSIFY] * len(images))
    colours = _generate(model, processor, images, [W.Q_COLOR.format(shape=t.split()[1]) for t in truths])
    class_acc = np.mean([a == t for a, t in zip(classes, truths)])
    colour_acc = np.mean([a == t.split()[0] for a, t in zip(colours, truths)])
    # measured on the committed checkpoint: 1.0 and 1.0 here (chance 1/30 and 1/6; training_log.txt has the
    # same on another held-out seed)
    assert class_acc >= 0.75, (class_acc, classes[:8])
    assert colour_acc >= 0.75, (colour_acc, colours[:8])


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def test_first_token_knows_what_the_answer_hides(demo, tmp_path: Path) -> None:
    """The paper's premise, on the demo model: greedy answers rarely abstain, yet the first token's probability
    of the abstaining answer ("sorry" / "unanswerable") separates harmful / unanswerable rows from the rest."""
    model, processor = demo
    for task, word in (("safety", "sorry"), ("answerability", "unanswerable")):
        rows = W.task_rows(task, tmp_path / task, n_train=0, n_test=40, seed=HELD_OUT_SEED)
        inputs = processor(text=[_prompt(processor, r["question"]) for r in rows],
                           images=[Image.open(r["image"]) for r in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            probs = model(**inputs).logits[:, -1].softmax(-1)
        p_abstain = probs[:, processor.tokenizer.convert_tokens_to_ids(word)].numpy()
        labels = np.array([r["label"] for r in rows])
        greedy_abstains = (probs.argmax(-1) == processor.tokenizer.convert_tokens_to_ids(word)).float().mean()
        # measured: AUROC 0.90 (safety) and 1.0 (answerability), greedy abstention 0.0 for both
        assert _auroc(-p_abstain, labels) > 0.75, task
        assert greedy_abstains < 0.25, task


def test_training_script_runs_end_to_end(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--tiny", "--steps", "2", "--threads", "1", "--out", str(tmp_path / "m")])
    log = (out / "training_log.txt").read_text()
    assert "heldout/loss" in log and (out / "training_log.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    answer = _generate(model, processor, [np.zeros((64, 64, 3), np.uint8)], [W.Q_CLASSIFY])
    assert isinstance(answer[0], str)
