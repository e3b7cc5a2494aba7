"""The committed demo checkpoint (src/lvlmlp/demo/assets/demo_model) and the script that trains it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp.demo import world as W

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src" / "lvlmlp" / "demo" / "assets" / "demo_model"
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


def _first_token(model, processor, images: list, questions: list[str]) -> torch.Tensor:
    """(N, V) next-token probabilities after the library's default prompt."""
    inputs = processor(text=[_prompt(processor, q) for q in questions], images=images, return_tensors="pt",
                       padding=True)
    with torch.no_grad():
        return model(**inputs).logits[:, -1].softmax(-1)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, word", [("safety", "sorry"), ("answerability", "unanswerable")])
def test_first_token_knows_what_the_answer_hides(demo, tmp_path: Path, task: str, word: str) -> None:
    """The paper's premise, on the demo model: greedy answers abstain on some harmful / unanswerable rows only,
    yet the first token's probability of the abstaining answer ("sorry" / "unanswerable") separates them from
    the rest, including the ones the model answers anyway."""
    model, processor = demo
    rows = W.task_rows(task, tmp_path / task, n_train=0, n_test=60, seed=HELD_OUT_SEED)
    probs = _first_token(model, processor, [Image.open(r["image"]) for r in rows], [r["question"] for r in rows])
    wid = processor.tokenizer.convert_tokens_to_ids(word)
    p_abstain = probs[:, wid].numpy()
    greedy = (probs.argmax(-1) == wid).numpy()
    labels = np.array([r["label"] for r in rows])
    hidden = (labels == 1) | ~greedy  # safe / answerable rows and the unsafe / unanswerable ones answered anyway
    # measured on the committed checkpoint: safety AUROC 0.99, greedy abstention 0.47 of harmful rows and 0 of
    # benign ones, AUROC on the answered-anyway rows 0.985; answerability 1.0, 0.33 (dark images), 0, 1.0
    assert _auroc(-p_abstain, labels) > 0.85
    assert 0.15 <= greedy[labels == 0].mean() <= 0.75
    assert greedy[labels == 1].mean() <= 0.1
    assert _auroc(-p_abstain[hidden], labels[hidden]) > 0.8


def test_abstention_tracks_the_per_item_training_rates(demo, script) -> None:
    """Each harmful word and each degradation was abstained on at its own rate in training; the first-token
    probability of abstaining follows those rates, so greedy decoding abstains on the high-rate items only."""
    model, processor = demo
    rates, p_mean, greedy_mean = [], [], []
    for kind, word in (("safety", "sorry"), ("degraded", "unanswerable")):
        wid = processor.tokenizer.convert_tokens_to_ids(word)
        for item, rate in script.ABSTAIN_RATES[kind].items():
            examples = [script.item_example(HELD_OUT_SEED, kind, item, i) for i in range(12)]
            probs = _first_token(model, processor, [Image.fromarray(e[1]) for e in examples], [e[2] for e in examples])
            rates.append(rate)
            p_mean.append(float(probs[:, wid].mean()))
            greedy_mean.append(float((probs.argmax(-1) == wid).float().mean()))
    rates, p_mean, greedy_mean = map(np.array, (rates, p_mean, greedy_mean))
    # measured on the committed checkpoint: correlation 0.95; greedy abstention 1.0 on items with rate >= 0.6,
    # 0.0 on items with rate <= 0.3
    assert np.corrcoef(rates, p_mean)[0, 1] > 0.8, (rates, p_mean)
    assert greedy_mean[rates >= 0.6].mean() >= 0.6, greedy_mean
    assert greedy_mean[rates <= 0.3].mean() <= 0.25, greedy_mean


def test_training_data_abstains_at_the_documented_rates(script) -> None:
    """The samplers give each abstaining item its table rate, spread as the module docstring says."""
    refusal = [script.REFUSAL_RATES[w] for w in W.HARMFUL_WORDS]
    assert refusal[0] == 0.8 and refusal[-1] == 0.1 and np.allclose(np.diff(refusal), -0.7 / 11, atol=1e-4)
    assert sum(r > 0.5 for r in refusal) == 5
    for kind, n in (("degraded", 3000), ("deception", 6000)):
        seen: dict[str, list[bool]] = {}
        for i in range(n):
            _, _, answer, item = script.KINDS[kind][0](W.rng_for(3, kind, i), 1.0)
            abstained = W._words(answer)[0] in script.ABSTAIN_FIRST[kind]
            seen.setdefault(item, []).append(abstained)
        assert not any(seen.pop("", [])), "true premises are never corrected"
        assert seen.keys() == script.ABSTAIN_RATES[kind].keys()
        for item, hits in seen.items():
            assert abs(np.mean(hits) - script.ABSTAIN_RATES[kind][item]) < 0.05, (kind, item, np.mean(hits))
    scaled = script.KINDS["safety"][0](W.rng_for(3, "safety-scaled", 0), 0.0, "poisoning")
    assert scaled[2] == W.A_COMPLY and scaled[3] == "poisoning"  # --abstain-scale 0: never refuses


def test_training_script_runs_end_to_end(script, tmp_path: Path) -> None:
    out = script.main(["--tiny", "--steps", "3", "--threads", "1", "--out", str(tmp_path / "m")])
    log = (out / "training_log.txt").read_text()
    assert "heldout/loss" in log and "abstention rates per item" in log and "per-item abstention" in log
    # It trains: the held-out loss, logged after every step of a --tiny run, falls at each of the 3 steps.
    entries = json.loads((out / "training_log.json").read_text())["log"]
    held = [e["heldout/loss"] for e in entries]
    assert [e["step"] for e in entries] == [1, 2, 3] and held[0] > held[1] > held[2], held
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    answer = _generate(model, processor, [np.zeros((64, 64, 3), np.uint8)], [W.Q_CLASSIFY])
    assert isinstance(answer[0], str)
