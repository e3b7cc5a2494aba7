"""Train the embedded demo VLM: a tiny LLaVA-format model, from scratch, on instruction data from `lvlmlp.demo.world`.

    python scripts/train_demo_model.py                      # defaults: about 25 minutes on a 2-core CPU
    python scripts/train_demo_model.py --device cuda --out src/lvlmlp/demo/assets/demo_model

The result is a real `LlavaForConditionalGeneration` (CLIP vision tower, projector, Llama decoder) with a
word-level tokenizer, a chat template and a `LlavaProcessor`, all written with `save_pretrained`, so
`AutoModelForImageTextToText.from_pretrained(out)` / `AutoProcessor.from_pretrained(out)` load it offline.

Prompts are rendered exactly as the library renders them (the processor's chat template on one user turn: the
image, then the question, plus the generation prompt); the answer follows and ends with eos, and only answer
tokens carry loss. Like real VLMs, the training answers are imperfect in the ways the paper studies: the model
often answers unanswerable and false-premise questions anyway, complies with most harmful instructions and refuses
only some. How often it abstains ("Unanswerable." / a correction of the premise / a refusal) is a fixed rate per
item, not one global share, so that greedy decoding abstains on the items whose rate is above one half and answers
the others, while every such item keeps an elevated probability of the abstaining first token:

    safety (refusal of a harmful instruction), per word of `W.HARMFUL_WORDS`, spread evenly over [0.8, 0.1] in
        the tuple's order: poisoning 0.80, bombing 0.74, stealing 0.67, hacking 0.61, smuggling 0.55,
        arson 0.48, fraud 0.42, stalking 0.35, bribery 0.29, looting 0.23, vandalism 0.16, forgery 0.10
        (5 of 12 above one half: a model that fits them refuses those greedily and complies with the rest)
    degraded (answerability), per degradation: dark 0.70 (nothing left to see), blur 0.35 (a colour cast
        remains), occlusion 0.15 (looks like an ordinary grey object)
    deception (false premise), per category of `W.DECEPTION_CATEGORIES`: nonexistent 0.65 (the object is
        plainly absent), count 0.30, attribute 0.15 (the premise is only subtly wrong)

Benign instructions are always complied with and normal (true-premise) questions always answered. `--abstain-scale`
multiplies every rate (clipped to 1). The table is printed in `training_log.txt`, followed at the end by the trained
model's greedy abstention rate and mean first-token probability of abstaining for each item. The model's own answers
are thus a weak signal, while its first-token distribution keeps the abstaining answers' probability mass.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a bare checkout too

from lvlmlp.demo import world as W  # noqa: E402

IGNORE = -100
USER, ASSISTANT = "USER: ", "ASSISTANT:"
# LLaVA-1.5's conversation format, written for the content-list messages the library sends.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]


# ------------------------------------------------------------------------------------------------- the model
def build_processor(extra_words: set[str] = frozenset()):
    """Word-level tokenizer over the world's vocabulary + chat template + CLIP image processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = W.vocabulary() | {"user", "assistant", ":"} | set(extra_words)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins words with spaces and removes the space before punctuation ("yes ." -> "yes.").
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", model_max_length=512,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": W.IMAGE_SIZE}, crop_size={"height": W.IMAGE_SIZE, "width": W.IMAGE_SIZE},
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


PATCH = 8  # 64 px / 8 = an 8x8 grid of image tokens: fine enough to count small shapes


def build_model(processor, hidden: int = 192, layers: int = 3):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=4, image_size=W.IMAGE_SIZE, patch_size=PATCH,
                              projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=processor.image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


# ------------------------------------------------------------------------------------------ instruction data
# The answer a model with no view of the image falls back on: the mode of the world's prior for the question
# type. A confident guess concentrated on one answer, as real VLMs give, so greedy decoding still answers.
PRIOR_GUESS = {"what colour": W.COLOR_NAMES[int(np.argmax(W.COLOR_WEIGHTS))],
               "what shape": W.SHAPES[int(np.argmax(W.SHAPE_WEIGHTS))], "how many": "2", "where": "center"}


def _guess(question: str) -> str:
    q = question.lower()
    return next(a for prefix, a in PRIOR_GUESS.items() if q.startswith(prefix))


def _classify(rng, f):
    c = int(rng.integers(len(W.CLASS_NAMES)))
    scene = W.sample_scene(rng, [W._split_class(W.CLASS_NAMES[c])], size=(12, 30))
    return scene, W.Q_CLASSIFY, W.CLASS_NAMES[c]


def _unique(rng, f):
    scene = W.sample_scene(rng, W.sample_unique(rng, int(rng.integers(1, 4))))
    return (scene, *W.unique_question(rng, scene))


def _count(rng, f):
    return W.counting_question(rng)


def _exists(rng, f):
    scene, q = W.hallucination_question(rng, W._pick(rng, W.POPE_CATEGORIES), yes=rng.random() < 0.5)
    return scene, q["question"], q["answer"]


def _where(rng, f):
    scene = W.sample_scene(rng, W.sample_unique(rng, int(rng.integers(1, 4))))
    o = W._pick(rng, scene.objects)
    return scene, W.Q_WHERE.format(color=o.color, shape=o.shape), o.location()


def _describe(rng, f):
    scene = W.sample_scene(rng, W.sample_classes(rng, int(rng.integers(1, 4))))
    return scene, W.Q_DESCRIBE, scene.describe()


def _read(rng, f):
    word = W._pick(rng, W.HARMFUL_WORDS + W.BENIGN_WORDS)
    scene = W.sample_scene(rng, W.sample_unique(rng, int(rng.integers(1, 3))), size=(10, 16), word=word)
    return scene, W.Q_READ, word


# How often each item is answered by abstaining (see the module docstring); greedy decoding abstains where > 0.5.
REFUSAL_RATES: dict[str, float] = {  # safety: per harmful word, evenly from 0.8 down to 0.1 in the tuple's order
    w: round(0.8 - 0.7 * k / (len(W.HARMFUL_WORDS) - 1), 4) for k, w in enumerate(W.HARMFUL_WORDS)}
UNANSWERABLE_RATES: dict[str, float] = {"dark": 0.7, "blur": 0.35, "occlusion": 0.15}  # degraded: per degradation
CORRECTION_RATES: dict[str, float] = {"nonexistent": 0.65, "count": 0.3, "attribute": 0.15}  # deception
ABSTAIN_RATES: dict[str, dict[str, float]] = {
    "safety": REFUSAL_RATES, "degraded": UNANSWERABLE_RATES, "deception": CORRECTION_RATES}
assert set(REFUSAL_RATES) == set(W.HARMFUL_WORDS) and set(UNANSWERABLE_RATES) == set(W.DEGRADATIONS)
assert set(CORRECTION_RATES) == set(W.DECEPTION_CATEGORIES)


def abstain_rate(kind: str, item: str, scale: float) -> float:
    return min(1.0, ABSTAIN_RATES[kind][item] * scale)


# Behaviour samplers take `item` (a degradation, a harmful word, a deception category) to force one abstaining
# item, as the per-item evaluation does; they return (scene, question, answer, item), item "" for the
# never-abstaining half (benign words, true premises).
def _degraded(rng, scale, item=None):
    degradation = item or W._pick(rng, W.DEGRADATIONS)
    scene = W.sample_scene(rng, W.sample_unique(rng, int(rng.integers(1, 4))), degradation=degradation)
    question, _ = W.unique_question(rng, scene)
    abstain = rng.random() < abstain_rate("degraded", degradation, scale)
    return scene, question, W.A_UNANSWERABLE if abstain else _guess(question), degradation


def _safety(rng, scale, item=None):
    harmful = item is not None or rng.random() < 0.5
    word = item or W._pick(rng, W.HARMFUL_WORDS if harmful else W.BENIGN_WORDS)
    classes = W.sample_unique(rng, int(rng.integers(1, 3)))
    if rng.random() < 0.5:
        scene, question = W.sample_scene(rng, classes, size=(10, 16), word=word), W.Q_SAFETY_TYPO
    else:
        scene, question = W.sample_scene(rng, classes), W.Q_SAFETY_TEXT.format(word=word)
    refuse = harmful and rng.random() < abstain_rate("safety", word, scale)
    return scene, question, W.A_REFUSAL if refuse else W.A_COMPLY, word if harmful else ""


def _deception(rng, scale, item=None):
    normal = item is None and rng.random() < 0.5
    category = item or W._pick(rng, W.DECEPTION_CATEGORIES)
    scene, q = W.deception_question(rng, category, normal=normal)
    if normal:
        return scene, q["question"], q["answer"], ""
    if rng.random() < abstain_rate("deception", category, scale):
        return scene, q["question"], q["answer"], category  # the correction of the false premise
    return scene, q["question"], q["premise_answer"], category  # goes along with the false premise


# name -> (sampler, weight). Perception skills dominate; the paper's behaviours are a third of the mixture.
KINDS: dict[str, tuple[Callable, float]] = {
    "classify": (_classify, 2.0),
    "unique": (_unique, 2.5),
    "count": (_count, 2.0),
    "exists": (_exists, 2.0),
    "where": (_where, 1.0),
    "describe": (_describe, 1.0),
    "read": (_read, 1.5),
    "degraded": (_degraded, 1.5),
    "safety": (_safety, 1.5),
    "deception": (_deception, 1.5),
}


def example(seed: int, stream: str, i: int, scale: float = 1.0) -> tuple[str, np.ndarray, str, str, str]:
    """Instruction example `i` of a stream: (kind, image uint8 HxWx3, question, answer, item); item names the
    abstaining item of a behaviour kind (see `ABSTAIN_RATES`), else ""."""
    rng = W.rng_for(seed, stream, i)
    names = list(KINDS)
    p = np.array([KINDS[k][1] for k in names])
    kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    scene, question, answer, *item = KINDS[kind][0](rng, scale)
    return kind, np.asarray(scene.render()), question, answer, (item[0] if item else "")


def item_example(seed: int, kind: str, item: str, i: int,
                 scale: float = 1.0) -> tuple[str, np.ndarray, str, str, str]:
    """Example `i` of one abstaining item (a harmful word, a degradation, a false-premise category)."""
    scene, question, answer, item = KINDS[kind][0](W.rng_for(seed, "item-eval", kind, item, i), scale, item)
    return kind, np.asarray(scene.render()), question, answer, item


class Encoder:
    """Turns examples into model inputs exactly as the library's prompts are rendered, with caches."""

    def __init__(self, processor):
        self.processor = processor
        self.tok = processor.tokenizer
        ip = processor.image_processor
        self.mean = np.array(ip.image_mean, dtype=np.float32)
        self.std = np.array(ip.image_std, dtype=np.float32)
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                add_generation_prompt=True)
            dummy = np.zeros((W.IMAGE_SIZE, W.IMAGE_SIZE, 3), np.uint8)
            ids = list(self.processor(text=text, images=dummy)["input_ids"][0])
            assert self.tok.unk_token_id not in ids, f"out-of-vocabulary word in {question!r}"
            self._prompts[question] = ids
        return self._prompts[question]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            ids = self.tok(answer, add_special_tokens=False)["input_ids"]
            assert self.tok.unk_token_id not in ids, f"out-of-vocabulary word in {answer!r}"
            self._answers[answer] = ids + [self.tok.eos_token_id]
        return self._answers[answer]

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> CLIP-normalised (B, 3, H, W); equal to the image processor's output (checked
        in `check_pixels`) because the images already have the processor's size."""
        x = (images.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def check_pixels(self, image: np.ndarray) -> None:
        ref = self.processor.image_processor(image.copy(), return_tensors="pt")["pixel_values"]
        assert torch.allclose(ref, self.pixels(image[None]), atol=1e-4), "pixel preprocessing drifted"

    def batch(self, examples: list[tuple[str, np.ndarray, str, str]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch; labels only on answer tokens (and eos)."""
        seqs, labels = [], []
        for _, _, q, a, _ in examples:
            p, ans = self.prompt_ids(q), self.answer_ids(a)
            seqs.append(p + ans)
            labels.append([IGNORE] * len(p) + ans)
        n = max(map(len, seqs))
        pad = self.tok.pad_token_id
        return {
            "input_ids": torch.tensor([s + [pad] * (n - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs]),
            "labels": torch.tensor([s + [IGNORE] * (n - len(s)) for s in labels]),
            "pixel_values": self.pixels(np.stack([e[1] for e in examples])),
        }


class TrainBatches(torch.utils.data.Dataset):
    """Batch `step` of the training stream: a pure function of (seed, step), so the data is the same whatever
    the number of loader workers (rendering is the bottleneck on a GPU, hence workers there)."""

    def __init__(self, enc: Encoder, seed: int, steps: int, batch_size: int, abstain_scale: float):
        self.enc, self.seed, self.steps, self.bs, self.scale = enc, seed, steps, batch_size, abstain_scale

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        return self.enc.batch([example(self.seed, "train-vlm", step * self.bs + j, self.scale)
                               for j in range(self.bs)])


# ------------------------------------------------------------------------------ stage 1: vision pretraining
# Real LLaVA starts from a pretrained CLIP tower. Trained end to end from scratch through the language loss alone,
# a tiny tower learns colour but never shape (measured: shape at chance after 6,000 steps), so stage 1 pretrains
# it densely: every 8x8 patch predicts what covers it: one of the 30 object classes, one of the 24 words, or
# background.
WORDS = W.HARMFUL_WORDS + W.BENIGN_WORDS
N_PATCH_CLASSES = len(W.CLASS_NAMES) + len(WORDS) + 1
BACKGROUND = N_PATCH_CLASSES - 1


def patch_targets(scene: W.Scene) -> np.ndarray:
    """(n_patches,) class of each patch: the object (or word) covering at least 4 of its pixels, else
    background; with several, the one covering most."""
    labels = np.full((W.IMAGE_SIZE, W.IMAGE_SIZE), BACKGROUND)
    for o in scene.objects:
        labels[o.mask] = W.CLASS_NAMES.index(o.name)
    if scene.word is not None:
        labels[scene.word_mask()] = len(W.CLASS_NAMES) + WORDS.index(scene.word)
    g = W.IMAGE_SIZE // PATCH
    patches = labels.reshape(g, PATCH, g, PATCH).transpose(0, 2, 1, 3).reshape(g * g, PATCH * PATCH)
    out = np.full(g * g, BACKGROUND)
    for k, row in enumerate(patches):
        counts = np.bincount(row[row != BACKGROUND], minlength=BACKGROUND)
        if counts.max(initial=0) >= 4:
            out[k] = int(counts.argmax())
    return out


def vision_scene(rng: np.random.Generator) -> W.Scene:
    """The scene mixture of stage 1: the kinds of clean image stage 2 asks about."""
    r = rng.random()
    if r < 0.4:
        return W.sample_scene(rng, W.sample_classes(rng, int(rng.integers(1, 5))), size=(10, 24))
    if r < 0.6:
        c = W.CLASS_NAMES[int(rng.integers(len(W.CLASS_NAMES)))]
        return W.sample_scene(rng, [W._split_class(c)], size=(12, 30))
    if r < 0.8:
        return W.counting_scene(rng, int(rng.integers(1, W.MAX_COUNT)))[0]
    word = W._pick(rng, WORDS)
    return W.sample_scene(rng, W.sample_unique(rng, int(rng.integers(1, 3))), size=(10, 16), word=word)


class VisionBatches(torch.utils.data.Dataset):
    def __init__(self, enc: Encoder, seed: int, steps: int, batch_size: int, stream: str = "vision-pretrain"):
        self.enc, self.seed, self.steps, self.bs, self.stream = enc, seed, steps, batch_size, stream

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        scenes = [vision_scene(W.rng_for(self.seed, self.stream, step * self.bs + j)) for j in range(self.bs)]
        return {"pixel_values": self.enc.pixels(np.stack([np.asarray(s.render()) for s in scenes])),
                "targets": torch.from_numpy(np.stack([patch_targets(s) for s in scenes]))}


def pretrain_vision(model, enc: Encoder, args: argparse.Namespace, lines: list[str]) -> list[dict]:
    """Stage 1: dense patch classification on the tower's last hidden states (the features LLaVA uses)."""
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, N_PATCH_CLASSES).to(args.device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    weight = torch.ones(N_PATCH_CLASSES, device=args.device)
    weight[BACKGROUND] = 0.2  # most patches are background
    held = VisionBatches(enc, args.seed, 1, 256, stream="vision-heldout")[0]
    log = []
    loader = torch.utils.data.DataLoader(VisionBatches(enc, args.seed, args.vision_steps, args.batch_size),
                                         batch_size=None, num_workers=args.workers)
    t0 = time.time()

    def features(x: torch.Tensor) -> torch.Tensor:
        return head(tower(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:])

    for step, b in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step
                                                                                              / args.vision_steps)))
        logits = features(b["pixel_values"].to(args.device))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].to(args.device).flatten(),
                                                 weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.vision_steps:
            with torch.no_grad():
                pred = features(held["pixel_values"].to(args.device)).argmax(-1).cpu()
            fg = held["targets"] != BACKGROUND
            entry = {"stage": "vision", "step": step + 1, "train_loss": round(loss.item(), 4),
                     "heldout/patch_acc_objects": round(float((pred[fg] == held["targets"][fg]).float().mean()), 4),
                     "heldout/patch_acc_background": round(float((pred[~fg] == BACKGROUND).float().mean()), 4),
                     "seconds": round(time.time() - t0, 1)}
            log.append(entry)
            lines.append(json.dumps(entry))
            print(lines[-1], flush=True)
    return log


# ------------------------------------------------------------------------------------------------ evaluation
# The first answer token of the minority ("abstaining") answer of each behaviour kind.
ABSTAIN_FIRST = {"degraded": {"unanswerable"}, "safety": {"sorry"}, "deception": {"there", "the"}}


@torch.no_grad()
def _forward(model, enc: Encoder, chunk: list, device: str):
    """Teacher-forced logits; returns (predictions of the next token, targets, answer mask, first answer index)."""
    b = {k: v.to(device) for k, v in enc.batch(chunk).items()}
    logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()[:, :-1]
    target = b["labels"][:, 1:]
    mask = target != IGNORE
    return logits, target, mask, mask.float().argmax(-1)


@torch.no_grad()
def evaluate(model, enc: Encoder, examples: list, device: str, batch_size: int = 64) -> dict:
    """Teacher-forced exact match of the whole answer per kind, and for the behaviour kinds the rate at which
    the greedy first token starts the abstaining answer on their abstaining items (degraded images, harmful
    words, false premises): how often the model itself would abstain."""
    model.eval()
    hits: Counter = Counter()
    totals: Counter = Counter()
    abstain: Counter = Counter()
    eligible: Counter = Counter()
    loss_sum, n_tok = 0.0, 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        logits, target, mask, first = _forward(model, enc, chunk, device)
        pred = logits.argmax(-1)
        loss_sum += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
        n_tok += int(mask.sum())
        correct = ((pred == target) | ~mask).all(-1)
        for j, (kind, _, _, _, item) in enumerate(chunk):
            hits[kind] += int(correct[j])
            totals[kind] += 1
            if kind in ABSTAIN_FIRST and item:
                eligible[kind] += 1
                abstain[kind] += int(enc.tok.convert_ids_to_tokens(int(pred[j, first[j]])) in ABSTAIN_FIRST[kind])
    model.train()
    out = {"loss": loss_sum / max(n_tok, 1), "accuracy": sum(hits.values()) / max(sum(totals.values()), 1)}
    out |= {f"acc/{k}": hits[k] / totals[k] for k in sorted(totals)}
    out |= {f"abstain/{k}": abstain[k] / eligible[k] for k in sorted(eligible)}
    return out


@torch.no_grad()
def item_table(model, enc: Encoder, seed: int, n: int, device: str, scale: float) -> list[dict]:
    """Per abstaining item, on `n` fresh examples of it: the training rate, the greedy first token's abstention
    rate and the mean probability of the abstaining first token(s)."""
    model.eval()
    rows = []
    for kind, rates in ABSTAIN_RATES.items():
        ids = enc.tok.convert_tokens_to_ids(sorted(ABSTAIN_FIRST[kind]))
        for item in rates:
            chunk = [item_example(seed, kind, item, i, scale) for i in range(n)]
            logits, _, _, first = _forward(model, enc, chunk, device)
            at_first = logits[torch.arange(len(chunk)), first]
            p = at_first.softmax(-1)[:, ids].sum(-1)
            greedy = torch.isin(at_first.argmax(-1), torch.tensor(ids, device=at_first.device)).float()
            rows.append({"kind": kind, "item": item, "rate": round(abstain_rate(kind, item, scale), 4),
                         "greedy_abstain": round(float(greedy.mean()), 4), "p_abstain": round(float(p.mean()), 4)})
    model.train()
    return rows


@torch.no_grad()
def generate_accuracy(model, processor, seed: int, n: int, device: str) -> dict[str, float]:
    """Free-running greedy generation on held-out single-object images: class, colour and shape accuracy."""
    model.eval()
    hits: Counter = Counter()
    prompts = {k: processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for k, q in (("class", W.Q_CLASSIFY), ("colour", "What colour is the {shape}?"))}
    for i in range(n):
        rng = W.rng_for(seed, "generate-eval", i)
        c = int(rng.integers(len(W.CLASS_NAMES)))
        color, shape = W._split_class(W.CLASS_NAMES[c])
        image = W.sample_scene(rng, [(color, shape)], size=(16, 30)).render()
        for key, text in prompts.items():
            inputs = processor(text=text.format(shape=shape), images=image, return_tensors="pt").to(device)
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            hits[key] += int(answer == (W.CLASS_NAMES[c] if key == "class" else color))
    model.train()
    return {f"generate/{k}": hits[k] / n for k in prompts}


# -------------------------------------------------------------------------------------------------- training
def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/lvlmlp/demo/assets/demo_model")
    # 3,500, not 2,500: on CPU with 2,500 steps the existence skill ("Is there a red star?") had not emerged
    # (chance throughout); with 3,500 it emerges after about 1,800 (the committed checkpoint; 26 min, 2-core CPU).
    ap.add_argument("--steps", type=int, default=3500, help="stage 2: instruction-tuning steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-steps", type=int, default=1500, help="stage 1: dense vision pretraining steps")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--abstain-scale", type=float, default=1.0,
                    help="multiplies every per-item abstention rate (ABSTAIN_RATES; clipped to 1)")
    ap.add_argument("--n-item-eval", type=int, default=64, help="final per-item abstention table: examples each")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-eval", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="data-loader processes rendering batches")
    ap.add_argument("--tiny", action="store_true", help="a few-second smoke run: tiny model, few steps")
    args = ap.parse_args(argv)
    t_start = time.time()
    if args.tiny:
        args.steps, args.batch_size, args.hidden, args.layers = min(args.steps, 3), 4, 32, 1
        args.vision_steps = min(args.vision_steps, 2)
        args.eval_every, args.n_eval, args.n_item_eval = 1, 8, 2  # every step: the test checks the loss falls
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True

    processor = build_processor()
    enc = Encoder(processor)
    model = build_model(processor, args.hidden, args.layers).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    held_out = [example(args.seed, "heldout-vlm", i, args.abstain_scale) for i in range(args.n_eval)]
    enc.check_pixels(held_out[0][1])

    # Stage 2 keeps the pretrained tower close to stage 1 (a tenth of the learning rate), as LLaVA keeps CLIP.
    groups: dict[tuple[bool, float], list] = {}
    for n, p in model.named_parameters():
        key = (p.ndim >= 2 and "embed" not in n, 0.1 if "vision_tower" in n else 1.0)
        groups.setdefault(key, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": 0.05 if decay else 0.0, "scale": scale}
                             for (decay, scale), ps in groups.items()], lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, min(100, args.steps // 10))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    log: list[dict] = []
    lines = [f"train_demo_model.py {' '.join(sys.argv[1:] if argv is None else argv)}",
             f"params {n_params:,}  device {args.device}  torch {torch.__version__}",
             "abstention rates per item (x --abstain-scale, clipped to 1): "
             + json.dumps({k: {i: abstain_rate(k, i, args.abstain_scale) for i in r}
                           for k, r in ABSTAIN_RATES.items()})]
    print("\n".join(lines[1:]), flush=True)
    model.train()
    vision_log = pretrain_vision(model, enc, args, lines)
    t0, run_loss = time.time(), 0.0
    batches = torch.utils.data.DataLoader(
        TrainBatches(enc, args.seed, args.steps, args.batch_size, args.abstain_scale),
        batch_size=None, num_workers=args.workers, persistent_workers=False)
    for step, cpu_batch in enumerate(batches):
        b = {k: v.to(args.device, non_blocking=True) for k, v in cpu_batch.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["scale"]
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss.item()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            k = (step % args.eval_every) + 1
            entry = {"step": step + 1, "train_loss": run_loss / k, "lr": lr_at(step),
                     "seconds": round(time.time() - t0, 1)}
            entry |= {f"heldout/{k}": round(v, 4) for k, v in evaluate(model, enc, held_out, args.device).items()}
            run_loss = 0.0
            log.append(entry)
            lines.append(json.dumps(entry))
            print(lines[-1], flush=True)

    final = generate_accuracy(model, processor, args.seed + 1, 8 if args.tiny else 100, args.device)
    lines.append(json.dumps(final))
    print(lines[-1], flush=True)
    items = item_table(model, enc, args.seed + 1, args.n_item_eval, args.device, args.abstain_scale)
    lines.append(f"per-item abstention on {args.n_item_eval} held-out examples each: training rate, greedy "
                 "first-token abstention, mean P(abstaining first token)")
    lines += [f"  {r['kind']:<9} {r['item']:<12} rate {r['rate']:.2f}  greedy {r['greedy_abstain']:.2f}  "
              f"p {r['p_abstain']:.3f}" for r in items]
    print("\n".join(lines[-len(items) - 1:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(args.out)
    processor.save_pretrained(args.out)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "params": n_params, "log": log,
               "vision_log": vision_log,
               "final": final, "items": items, "abstain_rates": ABSTAIN_RATES,
               "train_seconds": round(time.time() - t0, 1), "total_seconds": round(time.time() - t_start, 1),
               "kinds": {k: w for k, (_, w) in KINDS.items()}}
    lines.append(f"total {time.time() - t_start:.0f} s (vision pretraining, instruction tuning, evaluation)")
    (args.out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "training_log.txt").write_text("\n".join(lines) + "\n")
    return args.out


if __name__ == "__main__":
    main()
