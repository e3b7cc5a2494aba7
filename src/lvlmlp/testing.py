"""Tiny real checkpoints of every supported VLM family, built offline from config classes.

`tiny_model("llava", out_dir)` writes a randomly initialised model (hidden size 32, 2 layers, 28 px images), a
byte-level BPE tokenizer trained on a built-in corpus, the family's image processor, chat template and processor,
all with `save_pretrained`, so `AutoModelForImageTextToText.from_pretrained(out_dir)` and
`AutoProcessor.from_pretrained(out_dir)` load them without a network. The models are real transformers models
(same code paths as the released checkpoints, only smaller), which is what makes them useful for testing the
backend's batching quirks exactly; their answers are of course noise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lvlmlp.errors import LvlmlpError

# Small but varied text so byte-level BPE learns a few hundred merges: whole common words become single tokens.
_CORPUS = """
the a an is are was were be of in on at to for with and or not no yes what which who where when how why
is there a cat in the image ? is there a dog in this picture ? what color is the car ? how many people are there ?
red green blue yellow black white orange purple brown gray pink one two three four five six seven eight nine ten
the quick brown fox jumps over the lazy dog . a man is riding a horse on the beach . two birds sit on a wire .
can you answer the question from the image ? the image is too blurry to answer . answer yes or no .
describe the image in one sentence . what is the person holding ? is it safe ? is this image normal ?
please read the text in the picture . what is the value of x in the figure ? the answer is
USER: ASSISTANT: User: Assistant: system user assistant You are a helpful assistant .
circle square triangle left right top bottom small large big tiny object objects shape shapes
"""

# Rough stand-ins for each family's real chat format: (text before the conversation, user turn prefix, image
# placeholder, user turn suffix, assistant turn prefix, assistant turn suffix).
_TEMPLATES: dict[str, tuple[str, str, str, str, str, str]] = {
    "llava": ("", "USER: ", "<image>\n", " ", "ASSISTANT:", "</s> "),
    "llava_next": ("", "[INST] ", "<image>\n", " [/INST]", "", "</s>"),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|im_start|>user\n",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
    ),
    "idefics3": (
        "<|begin_of_text|>",
        "User:",
        "<image>",
        "<end_of_utterance>\n",
        "Assistant:",
        "<end_of_utterance>\n",
    ),
    "smolvlm": (
        "<|im_start|>",
        "User:",
        "<image>",
        "<end_of_utterance>\n",
        "Assistant:",
        "<end_of_utterance>\n",
    ),
}


def _chat_template(style: str) -> str:
    """A Jinja chat template in the family's style; literals are JSON-quoted, which Jinja reads as strings."""
    head, user, image, user_end, assistant, assistant_end = (json.dumps(s) for s in _TEMPLATES[style])
    return (
        f"{{{{ {head} }}}}{{% for message in messages %}}"
        f"{{% if message['role'] == 'user' %}}{{{{ {user} }}}}{{% else %}}{{{{ {assistant} }}}}{{% endif %}}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{{{ {image} }}}}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        f"{{% if message['role'] == 'user' %}}{{{{ {user_end} }}}}{{% else %}}{{{{ {assistant_end} }}}}{{% endif %}}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ {assistant} }}}}{{% endif %}}"
    )


def _tokenizer(
    specials: list[str],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str | None = None,
    add_bos: bool = False,
    add_eos: bool = False,
    extra: dict[str, str] | None = None,
    vocab_size: int = 320,
) -> Any:
    """A byte-level BPE tokenizer trained on `_CORPUS`; `specials` come first, so their ids are 0, 1, 2, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer)
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        extra_special_tokens=extra or {},
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )


# Every tower is this small: 2 layers of width 32 keep a whole family's checkpoint under 1 MB and a forward in ms.
_TINY: dict[str, int] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _text(tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny decoder config over `tokenizer`'s vocabulary and special tokens."""
    return {
        "vocab_size": len(tokenizer),
        **_TINY,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }


def _vision(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny ViT: 28 px images in 7 px patches (16 patches) unless overridden."""
    return {**_TINY, "image_size": 28, "patch_size": 7, **overrides}


def _llama(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_text(tokenizer, tie_word_embeddings=False, **overrides))


def _clip_vision() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**_vision(projection_dim=32))


def _build_llava(family: str) -> tuple[Any, Any, Any]:
    import transformers as tf

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"] + (["[INST]", "[/INST]"] if family == "llava_next" else [])
    tok = _tokenizer(specials, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True,
                     extra={"image_token": "<image>"})
    common = dict(vision_config=_clip_vision(), text_config=_llama(tok),
                  image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    size = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    if family == "llava":
        model_cls, config = tf.LlavaForConditionalGeneration, tf.LlavaConfig(**common)
        image_processor, proc_cls = tf.CLIPImageProcessor(**size), tf.LlavaProcessor
    else:
        # "anyres": an image is cut into 28 px tiles on the best-fitting grid, so wide, tall and square images give
        # different numbers of image tokens (the reason LLaVA-NeXT batches need padding).
        pinpoints = [[28, 56], [56, 28], [56, 56]]
        model_cls = tf.LlavaNextForConditionalGeneration
        config = tf.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        image_processor = tf.LlavaNextImageProcessor(**size, image_grid_pinpoints=pinpoints)
        proc_cls = tf.LlavaNextProcessor
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, patch_size=7,
                         vision_feature_select_strategy="default", num_additional_image_tokens=1,
                         chat_template=_chat_template(family))
    return model_cls, config, processor


def _build_qwen(version: str) -> tuple[Any, Any, Any]:
    import transformers as tf

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = _tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    # 4 px patches merged 2x2: every 8x8 pixel block is one image token, images are resized to 16..48 px a side.
    vision = dict(
        depth=2,
        hidden_size=32,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    # mrope_section splits the 16-dim head's 8 rotary frequencies over (time, height, width).
    text = _text(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if version == "qwen2_vl":
        config_cls, model_cls, proc_cls = (
            tf.Qwen2VLConfig,
            tf.Qwen2VLForConditionalGeneration,
            tf.Qwen2VLProcessor,
        )
        vision.update(embed_dim=32, mlp_ratio=2)
    else:
        config_cls, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        proc_cls = tf.Qwen2_5_VLProcessor
        # Window attention over 8 px windows in the first block, full attention in the second.
        vision.update(intermediate_size=64, out_hidden_size=32, window_size=16, fullatt_block_indexes=[1])
    config = config_cls(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    pixels = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=48 * 48)
    processor = proc_cls(
        image_processor=tf.Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=tf.Qwen2VLVideoProcessor(**pixels),
        chat_template=_chat_template("qwen"),
    )
    return model_cls, config, processor


def _build_instructblip() -> tuple[Any, Any, Any]:
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    # No `image_token` attribute on the tokenizer: InstructBlipProcessor then registers "<image>" itself (as the
    # released checkpoints do; with the attribute set, transformers 5 fails on `image_token.content`).
    tok = _tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
    )
    # The Q-Former reads the question through its own BERT-style tokenizer: [CLS] question [SEP].
    qtok = _tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        bos="[CLS]",
        eos="[SEP]",
        pad="[PAD]",
        unk="[UNK]",
        add_bos=True,
        add_eos=True,
        vocab_size=300,
    )
    vision = InstructBlipVisionConfig(**_vision())
    qformer = InstructBlipQFormerConfig(vocab_size=len(qtok), **_TINY, pad_token_id=0, max_position_embeddings=128)
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=_llama(tok),
        num_query_tokens=4,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    image_processor = BlipImageProcessor(size={"height": 28, "width": 28})
    processor = InstructBlipProcessor(
        image_processor=image_processor, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=4
    )
    return InstructBlipForConditionalGeneration, config, processor


def _build_idefics3(family: str) -> tuple[Any, Any, Any]:
    import transformers as tf

    grid = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    if family == "idefics3":
        bos, eos, pad = "<|begin_of_text|>", "<end_of_utterance>", "<|end_of_text|>"
    else:
        bos, eos, pad = "<|im_start|>", "<end_of_utterance>", "<|im_end|>"
    specials = [bos, pad, eos, "<fake_token_around_image>", "<image>", "<global-img>", *grid]
    extra = {
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    tok = _tokenizer(specials, bos=bos, eos=eos, pad=pad, extra=extra, vocab_size=400)
    # 32 px tiles of 8 px patches, pixel-shuffled 2x2: 4 tokens per tile; images up to 64 px are split into a
    # grid of up to 2x2 tiles plus a global view, so the token count depends on the image's shape.
    vision = _vision(image_size=32, patch_size=8)
    if family == "idefics3":
        config_cls, model_cls, image_cls = (
            tf.Idefics3Config,
            tf.Idefics3ForConditionalGeneration,
            tf.Idefics3ImageProcessor,
        )
    else:
        config_cls, model_cls, image_cls = (
            tf.SmolVLMConfig,
            tf.SmolVLMForConditionalGeneration,
            tf.SmolVLMImageProcessor,
        )
    config = config_cls(
        vision_config=vision,
        text_config=_llama(tok).to_dict(),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    image_processor = image_cls(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    if family == "idefics3":
        processor = tf.Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tok,
            image_seq_len=4,
            chat_template=_chat_template("idefics3"),
        )
    else:
        video = tf.SmolVLMVideoProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
        processor = tf.SmolVLMProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video,
            image_seq_len=4,
            chat_template=_chat_template("smolvlm"),
        )
    return model_cls, config, processor


def _build_paligemma(family: str) -> tuple[Any, Any, Any]:
    import transformers as tf

    tok = _tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"],
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        extra={"image_token": "<image>"},
    )
    # The processor adds 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer; the embedding must cover them.
    image_processor = tf.SiglipImageProcessor(size={"height": 28, "width": 28})
    image_processor.image_seq_length = 16
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    vision = tf.SiglipVisionConfig(**_vision(projection_dim=32))
    common = _text(tok, head_dim=16)
    if family == "paligemma":
        text = tf.GemmaConfig(**common)
    else:
        # Gemma 2 squashes logits with 30 * tanh(x / 30): the head is not linear in the final hidden state.
        text = tf.Gemma2Config(**common, query_pre_attn_scalar=16, sliding_window=64)
    config = tf.PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        projection_dim=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return tf.PaliGemmaForConditionalGeneration, config, processor


_BUILDERS: dict[str, Callable[[], tuple[Any, Any, Any]]] = {
    "llava": lambda: _build_llava("llava"),
    "llava_next": lambda: _build_llava("llava_next"),
    "qwen2_vl": lambda: _build_qwen("qwen2_vl"),
    "qwen2_5_vl": lambda: _build_qwen("qwen2_5_vl"),
    "instructblip": _build_instructblip,
    "idefics3": lambda: _build_idefics3("idefics3"),
    "smolvlm": lambda: _build_idefics3("smolvlm"),
    "paligemma": lambda: _build_paligemma("paligemma"),
    "paligemma2": lambda: _build_paligemma("paligemma2"),
}
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)


def tiny_model(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` (one of `FAMILIES`) to `out_dir` and return its path.

    The weights depend only on `seed`; the global torch RNG state is left untouched.
    """
    if family not in FAMILIES:
        raise LvlmlpError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")
    import torch

    model_cls, config, processor = _BUILDERS[family]()
    tok = processor.tokenizer
    # Larger than the usual 0.02 so the tiny model's logits are well separated: greedy decoding then never hinges
    # on near-ties that float rounding could flip between a batched and a single run.
    config.initializer_range = 0.2
    for sub in ("text_config", "vision_config", "qformer_config"):
        if hasattr(config, sub):
            getattr(config, sub).initializer_range = 0.2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    gen.do_sample = False
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Some files are written through temporary files (mode 0600): make every file readable like any other.
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    return out


def tiny_manifest(root: str | Path, n_train: int = 24, n_test: int = 16, seed: int = 0) -> Path:
    """Write `root/manifest.jsonl` and its images: "train" and "test" rows of noisy 32 px images whose 0/1 label
    is visible but not trivially (brighter on average = 1, darker = 0). The data of `configs/ci_tiny.yaml`."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = i % 2
            base = rng.uniform(115, 175) if label else rng.uniform(85, 145)
            pixels = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "img" / f"{split}{i}.png")
            lines.append({"id": f"{split}-{i}", "image": f"img/{split}{i}.png", "question": "is the image bright ?",
                          "label": label, "split": split})
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
