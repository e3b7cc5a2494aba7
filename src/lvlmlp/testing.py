"""Tiny real checkpoints of every supported VLM family, built offline from config classes.

`tiny_model("llava", out_dir)` writes a randomly initialised model (hidden size 32, 2 layers, 28 px images), a
byte-level BPE tokenizer trained on a built-in corpus, the family's image processor, chat template and processor,
all with `save_pretrained`, so `AutoModelForImageTextToText.from_pretrained(out_dir)` and
`AutoProcessor.from_pretrained(out_dir)` load them without a network. The models are real transformers models
(same code paths as the released checkpoints, only smaller), which is what makes them useful for testing the
backend's batching quirks exactly; their answers are of course noise.

Each family is one `Family` entry of `SPECS`: data naming the transformers classes and the keyword arguments that
make them tiny, with markers (`Id`, `Special`, `VOCAB`, `TOKENIZER`, `Template`) for what depends on the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    "llava_onevision": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|im_start|>user\n",
        "<image>\n",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
    ),
    "idefics2": ("", "User:", "<image>", "<end_of_utterance>\n", "Assistant:", "<end_of_utterance>\n"),
    "mistral3": ("", "[INST]", "[IMG]", "[/INST]", "", "</s>"),
    "internvl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "<|im_start|>user\n",
        "<IMG_CONTEXT>\n",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
    ),
    "aya_vision": (
        "",
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
        "<image>",
        "<|END_OF_TURN_TOKEN|>",
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
    ),
    "mllama": (
        "<|begin_of_text|>",
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|image|>",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    "glm4v": (
        "[gMASK]<sop>",
        "<|user|>\n",
        "<|begin_of_image|><|image|><|end_of_image|>",
        "",
        "<|assistant|>\n",
        "",
    ),
    "lfm2_vl": (
        "<|startoftext|>",
        "<|im_start|>user\n",
        "<image>",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
    ),
    "cohere2_vision": (
        "",
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>",
        "<|IMG_PATCH|>",
        "<|END_OF_TURN_TOKEN|>",
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
    ),
    "gemma4": ("", "<start_of_turn>user\n", "<image_soft_token>", "<end_of_turn>\n", "<start_of_turn>model\n",
               "<end_of_turn>\n"),
    "janus": ("", "<|User|>: ", "<image_placeholder>\n", "\n\n", "<|Assistant|>:", "<｜end▁of▁sentence｜>"),
    "deepseek_vl": ("", "User: ", "<image_placeholder>\n", "\n\n", "Assistant:", "<｜end▁of▁sentence｜>"),
    "molmo2": ("", "<|im_start|>user\n", "<|image|>", "<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
    "llama4": (
        "<|begin_of_text|>",
        "<|header_start|>user<|header_end|>\n\n",
        "<|image|>",
        "<|eot|>",
        "<|header_start|>assistant<|header_end|>\n\n",
        "<|eot|>",
    ),
    "gemma3": ("", "<start_of_turn>user\n", "<start_of_image>", "<end_of_turn>\n", "<start_of_turn>model\n",
               "<end_of_turn>\n"),
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


def _tokenizer(spec: Tokens) -> Any:
    """A byte-level BPE tokenizer trained on `_CORPUS` as `spec` says; its specials come first (ids 0, 1, 2, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(spec.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer)
    named = {"bos_token": spec.bos, "eos_token": spec.eos, "pad_token": spec.pad, "unk_token": spec.unk}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{k: v for k, v in named.items() if v is not None},
        extra_special_tokens=dict(spec.extra),
        add_bos_token=spec.add_bos,
        add_eos_token=spec.add_eos,
    )


# ------------------------------------------------------------------------------------------------ family entries
# A family is data: a `Family` entry names transformers classes and their keyword arguments. Values that depend on
# the family's own tokenizer (its size, a token's id, the tokenizer itself) are written as markers and resolved when
# the checkpoint is built, so an entry never needs code of its own.


@dataclass(frozen=True)
class Tokens:
    """A tokenizer to train offline: `specials` come first (ids 0, 1, 2, ...), then byte-level BPE merges."""

    specials: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    unk: str | None = None
    add_bos: bool = False
    add_eos: bool = False
    extra: tuple[tuple[str, str], ...] = ()  # named special tokens, e.g. ("image_token", "<image>")
    vocab_size: int = 320


@dataclass(frozen=True)
class Part:
    """A transformers class by name and its keyword arguments (markers allowed); `as_dict`: its config dict."""

    cls: str
    kwargs: tuple[tuple[str, Any], ...]
    as_dict: bool = False


def part(cls: str, **kwargs: Any) -> Part:
    return Part(cls, tuple(kwargs.items()))


@dataclass(frozen=True)
class Id:
    """The id of `token` in the family's tokenizer."""

    token: str


@dataclass(frozen=True)
class Special:
    """The id of the tokenizer's `bos`, `eos` or `pad` token (None when it has none)."""

    name: str


@dataclass(frozen=True)
class Template:
    """A chat template in one of the `_TEMPLATES` styles."""

    style: str


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


TOKENIZER = _Marker("TOKENIZER")  # the family's tokenizer object
VOCAB = _Marker("VOCAB")  # its length (the embedding rows the text model needs)
VOCAB_MAP = _Marker("VOCAB_MAP")  # its token -> id dictionary


@dataclass(frozen=True)
class Family:
    """One tiny-checkpoint entry: the model class, its config, the processor, the tokenizer.

    `model_type` is the `config.model_type` the checkpoint gets (PaliGemma 2 is a `paligemma`); its `Quirks` row in
    `extraction/families.py` is what the backend reads."""

    model: str
    config: Part
    processor: Part
    tokenizer: Tokens
    model_type: str
    # Names (last part) of parameters the model initialises to zero that keep the image from the text (Gemma 3's image
    # projection, Mllama's cross-attention gates): drawn at random like the other weights, as trained checkpoints
    # have them non-zero, so that the family checks see the image (test_the_image_reaches_the_text).
    reinit: tuple[str, ...] = ()
    # The LoRA targets of its finetuning check where the default ones (q_proj, k_proj, v_proj, o_proj) are not all
    # Linear layers of its language model (OPT and LFM2 call the attention's output out_proj): `--lora-targets`.
    lora_targets: tuple[str, ...] = ()


def _resolve(value: Any, tok: Any) -> Any:
    """`value` with every marker replaced by what it stands for in the family built over `tok`."""
    import transformers as tf

    if isinstance(value, Part):
        obj = getattr(tf, value.cls)(**{k: _resolve(v, tok) for k, v in value.kwargs})
        return obj.to_dict() if value.as_dict else obj
    if isinstance(value, Tokens):
        return _tokenizer(value)
    if isinstance(value, Id):
        return tok.convert_tokens_to_ids(value.token)
    if isinstance(value, Special):
        return getattr(tok, f"{value.name}_token_id")
    if isinstance(value, Template):
        return _chat_template(value.style)
    if value is TOKENIZER:
        return tok
    if value is VOCAB:
        return len(tok)
    if value is VOCAB_MAP:
        return tok.get_vocab()
    if isinstance(value, dict):
        return {k: _resolve(v, tok) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, tok) for v in value]
    return value


# Every tower is this small: 2 layers of width 32 keep a whole family's checkpoint under 1 MB and a forward in ms.
_TINY: dict[str, int] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _variant(base: Part, cls: str | None = None, **changes: Any) -> Part:
    """`base` with another class and/or some keyword arguments changed (a sibling family's config)."""
    return Part(cls or base.cls, tuple({**dict(base.kwargs), **changes}.items()), base.as_dict)


def _text(cls: str | None = "LlamaConfig", **overrides: Any) -> Any:
    """A tiny decoder config over the family tokenizer's vocabulary and special tokens; a dict when `cls` is None."""
    kwargs = {
        "vocab_size": VOCAB,
        **_TINY,
        "num_key_value_heads": 1,
        "max_position_embeddings": 512,
        "pad_token_id": Special("pad"),
        "bos_token_id": Special("bos"),
        "eos_token_id": Special("eos"),
        **({"tie_word_embeddings": False} if cls == "LlamaConfig" else {}),
        **overrides,
    }
    return part(cls, **kwargs) if cls else kwargs


def _vision(cls: str | None = None, **overrides: Any) -> Any:
    """A tiny ViT: 28 px images in 7 px patches (16 patches) unless overridden; a dict when `cls` is None."""
    kwargs = {**_TINY, "image_size": 28, "patch_size": 7, **overrides}
    return part(cls, **kwargs) if cls else kwargs


# LLaVA-1.5 and LLaVA-NeXT: a CLIP tower, a Llama, "<image>" expanded to one token per patch.
_LLAVA_TOKENS = Tokens(("<unk>", "<s>", "</s>", "<pad>", "<image>"), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                       add_bos=True, extra=(("image_token", "<image>"),))
_LLAVA_CONFIG = dict(vision_config=_vision("CLIPVisionConfig", projection_dim=32), text_config=_text(),
                     image_token_id=Id("<image>"), vision_feature_layer=-2, vision_feature_select_strategy="default")
_LLAVA_SIZE = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
_LLAVA_PROCESSOR = dict(tokenizer=TOKENIZER, patch_size=7, vision_feature_select_strategy="default",
                        num_additional_image_tokens=1)
# "anyres": an image is cut into 28 px tiles on the best-fitting grid, so wide, tall and square images give different
# numbers of image tokens (the reason LLaVA-NeXT batches need padding).
_PINPOINTS = [[28, 56], [56, 28], [56, 56]]

# Qwen2-VL and Qwen2.5-VL: 4 px patches merged 2x2, so every 8x8 pixel block is one image token; images are resized
# to 16..48 px a side. mrope_section splits the 16-dim head's 8 rotary frequencies over (time, height, width).
_QWEN_TOKENS = Tokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"), eos="<|im_end|>", pad="<|endoftext|>")
_QWEN_VISION = dict(depth=2, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                    in_channels=3)
_QWEN_TEXT = _text(None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
_QWEN_IDS = dict(image_token_id=Id("<|image_pad|>"), video_token_id=Id("<|video_pad|>"),
                 vision_start_token_id=Id("<|vision_start|>"), vision_end_token_id=Id("<|vision_end|>"))
_QWEN_PIXELS = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=48 * 48)
_QWEN_PROCESSOR = dict(image_processor=part("Qwen2VLImageProcessor", **_QWEN_PIXELS), tokenizer=TOKENIZER,
                       video_processor=part("Qwen2VLVideoProcessor", **_QWEN_PIXELS), chat_template=Template("qwen"))

# Idefics3 and SmolVLM: 32 px tiles of 8 px patches, pixel-shuffled 2x2: 4 tokens per tile; images up to 64 px are
# split into a grid of up to 2x2 tiles plus a global view, so the token count depends on the image's shape.
_GRID = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_IDEFICS3_EXTRA = (("image_token", "<image>"), ("fake_image_token", "<fake_token_around_image>"),
                   ("global_image_token", "<global-img>"), ("end_of_utterance_token", "<end_of_utterance>"))


def _idefics3_tokens(bos: str, pad: str) -> Tokens:
    specials = (bos, pad, "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", *_GRID)
    return Tokens(specials, bos=bos, eos="<end_of_utterance>", pad=pad, extra=_IDEFICS3_EXTRA, vocab_size=400)


_IDEFICS3_CONFIG = dict(vision_config=_vision(image_size=32, patch_size=8),
                        text_config=Part("LlamaConfig", _text().kwargs, as_dict=True), scale_factor=2,
                        image_token_id=Id("<image>"))
_IDEFICS3_SIZE = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})

# PaliGemma: a SigLIP tower and a Gemma; no chat template. The processor adds 1024 <locXXXX> and 128 <segXXX> tokens
# to the tokenizer, so VOCAB (resolved after the processor is built) covers them.
_PALIGEMMA_TOKENS = Tokens(("<pad>", "<eos>", "<bos>", "<unk>", "<image>"), bos="<bos>", eos="<eos>", pad="<pad>",
                           unk="<unk>", extra=(("image_token", "<image>"),))


def _paligemma(text: Part) -> Family:
    return Family(
        model="PaliGemmaForConditionalGeneration",
        config=part("PaliGemmaConfig", vision_config=_vision("SiglipVisionConfig", projection_dim=32), text_config=text,
                    projection_dim=32, image_token_index=Id("<image>")),
        processor=part("PaliGemmaProcessor", image_processor=part("SiglipImageProcessor", size={"height": 28,
                       "width": 28}, image_seq_length=16), tokenizer=TOKENIZER),
        tokenizer=_PALIGEMMA_TOKENS,
        model_type="paligemma",
    )


SPECS: dict[str, Family] = {
    "llava": Family(
        model="LlavaForConditionalGeneration",
        config=part("LlavaConfig", **_LLAVA_CONFIG),
        processor=part("LlavaProcessor", image_processor=part("CLIPImageProcessor", **_LLAVA_SIZE),
                       chat_template=Template("llava"), **_LLAVA_PROCESSOR),
        tokenizer=_LLAVA_TOKENS,
        model_type="llava",
    ),
    "llava_next": Family(
        model="LlavaNextForConditionalGeneration",
        config=part("LlavaNextConfig", **_LLAVA_CONFIG, image_grid_pinpoints=_PINPOINTS),
        processor=part("LlavaNextProcessor", chat_template=Template("llava_next"), **_LLAVA_PROCESSOR,
                       image_processor=part("LlavaNextImageProcessor", **_LLAVA_SIZE, image_grid_pinpoints=_PINPOINTS)),
        tokenizer=Tokens(_LLAVA_TOKENS.specials + ("[INST]", "[/INST]"), bos="<s>", eos="</s>", pad="<pad>",
                         unk="<unk>", add_bos=True, extra=_LLAVA_TOKENS.extra),
        model_type="llava_next",
    ),
    "qwen2_vl": Family(
        model="Qwen2VLForConditionalGeneration",
        config=part("Qwen2VLConfig", vision_config={**_QWEN_VISION, "embed_dim": 32, "mlp_ratio": 2},
                    text_config=_QWEN_TEXT, **_QWEN_IDS),
        processor=part("Qwen2VLProcessor", **_QWEN_PROCESSOR),
        tokenizer=_QWEN_TOKENS,
        model_type="qwen2_vl",
    ),
    "qwen2_5_vl": Family(
        model="Qwen2_5_VLForConditionalGeneration",
        # Window attention over 8 px windows in the first block, full attention in the second.
        config=part("Qwen2_5_VLConfig", vision_config={**_QWEN_VISION, "intermediate_size": 64, "out_hidden_size": 32,
                    "window_size": 16, "fullatt_block_indexes": [1]}, text_config=_QWEN_TEXT, **_QWEN_IDS),
        processor=part("Qwen2_5_VLProcessor", **_QWEN_PROCESSOR),
        tokenizer=_QWEN_TOKENS,
        model_type="qwen2_5_vl",
    ),
    # No `image_token` on the tokenizer: InstructBlipProcessor then registers "<image>" itself (as the released
    # checkpoints do; with the attribute set, transformers 5 fails on `image_token.content`). The Q-Former reads the
    # question through its own BERT-style tokenizer: [CLS] question [SEP].
    "instructblip": Family(
        model="InstructBlipForConditionalGeneration",
        config=part("InstructBlipConfig", vision_config=_vision("InstructBlipVisionConfig"),
                    qformer_config=part("InstructBlipQFormerConfig", vocab_size=300, **_TINY, pad_token_id=0,
                                        max_position_embeddings=128),
                    text_config=_text(), num_query_tokens=4, image_token_index=Id("<image>")),
        processor=part("InstructBlipProcessor", image_processor=part("BlipImageProcessor", size={"height": 28,
                       "width": 28}), tokenizer=TOKENIZER, num_query_tokens=4,
                       qformer_tokenizer=Tokens(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), bos="[CLS]",
                                                eos="[SEP]", pad="[PAD]", unk="[UNK]", add_bos=True, add_eos=True,
                                                vocab_size=300)),
        tokenizer=Tokens(_LLAVA_TOKENS.specials, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True),
        model_type="instructblip",
    ),
    "idefics3": Family(
        model="Idefics3ForConditionalGeneration",
        config=part("Idefics3Config", **_IDEFICS3_CONFIG),
        processor=part("Idefics3Processor", image_processor=part("Idefics3ImageProcessor", **_IDEFICS3_SIZE),
                       tokenizer=TOKENIZER, image_seq_len=4, chat_template=Template("idefics3")),
        tokenizer=_idefics3_tokens("<|begin_of_text|>", "<|end_of_text|>"),
        model_type="idefics3",
    ),
    "smolvlm": Family(
        model="SmolVLMForConditionalGeneration",
        config=part("SmolVLMConfig", **_IDEFICS3_CONFIG),
        processor=part("SmolVLMProcessor", image_processor=part("SmolVLMImageProcessor", **_IDEFICS3_SIZE),
                       tokenizer=TOKENIZER, video_processor=part("SmolVLMVideoProcessor", **_IDEFICS3_SIZE),
                       image_seq_len=4, chat_template=Template("smolvlm")),
        tokenizer=_idefics3_tokens("<|im_start|>", "<|im_end|>"),
        model_type="smolvlm",
    ),
    "paligemma": _paligemma(_text("GemmaConfig", head_dim=16)),
    # Gemma 2 squashes logits with 30 * tanh(x / 30): the head is not linear in the final hidden state.
    "paligemma2": _paligemma(_text("Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=64)),
    # Gemma 3: a SigLIP tower average-pooled to 2x2 = 4 soft tokens per image between <start_of_image> and
    # <end_of_image>, attended bidirectionally (token_type_ids); sliding-window layers (window 8, so the window
    # really cuts the prompt) alternate with global ones.
    "gemma3": Family(
        model="Gemma3ForConditionalGeneration",
        config=part("Gemma3Config", vision_config=_vision("SiglipVisionConfig"),
                    text_config=_text("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"]),
                    mm_tokens_per_image=4, boi_token_index=Id("<start_of_image>"), eoi_token_index=Id("<end_of_image>"),
                    image_token_index=Id("<image_soft_token>")),
        processor=part("Gemma3Processor", tokenizer=TOKENIZER, image_seq_length=4, chat_template=Template("gemma3"),
                       image_processor=part("Gemma3ImageProcessor", size={"height": 28, "width": 28})),
        tokenizer=Tokens(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                          "<end_of_image>", "<image_soft_token>"), bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
                         add_bos=True, extra=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                                              ("image_token", "<image_soft_token>"))),
        model_type="gemma3",
        reinit=("mm_input_projection_weight",),  # zero at init: every image would be the same
    ),
    # LLaVA-OneVision: SigLIP + Qwen2, "anyres_max_9" tiles on a grid of 28 px tiles, unpadded per image shape.
    "llava_onevision": Family(
        model="LlavaOnevisionForConditionalGeneration",
        config=part("LlavaOnevisionConfig", vision_config=_vision("SiglipVisionConfig"),
                    text_config=_text("Qwen2Config"), image_token_index=Id("<image>"), video_token_index=Id("<video>"),
                    image_grid_pinpoints=_PINPOINTS),
        processor=part("LlavaOnevisionProcessor", tokenizer=TOKENIZER, num_image_tokens=16,
                       vision_feature_select_strategy="full", chat_template=Template("llava_onevision"),
                       image_processor=part("LlavaOnevisionImageProcessor", size={"height": 28, "width": 28},
                                            image_grid_pinpoints=_PINPOINTS),
                       video_processor=part("LlavaOnevisionVideoProcessor", size={"height": 28, "width": 28})),
        tokenizer=Tokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"), eos="<|im_end|>",
                         pad="<|endoftext|>", extra=(("image_token", "<image>"), ("video_token", "<video>"))),
        model_type="llava_onevision",
    ),
    # Idefics2: a variable-resolution SigLIP-style tower (images 28..56 px, not split), a perceiver resampler to 4
    # latents, a Mistral; the processor wraps the 4 <image> tokens in <fake_token_around_image>.
    "idefics2": Family(
        model="Idefics2ForConditionalGeneration",
        config=part("Idefics2Config", vision_config=_vision(), text_config=_text("MistralConfig", head_dim=16),
                    perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                                          resampler_head_dim=16, num_key_value_heads=1),
                    image_token_id=Id("<image>")),
        processor=part("Idefics2Processor", tokenizer=TOKENIZER, image_seq_len=4, chat_template=Template("idefics2"),
                       image_processor=part("Idefics2ImageProcessor", size={"shortest_edge": 28, "longest_edge": 56},
                                            do_image_splitting=False)),
        tokenizer=Tokens(("<unk>", "<s>", "</s>", "<pad>", "<fake_token_around_image>", "<image>",
                          "<end_of_utterance>"), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True),
        model_type="idefics2",
    ),
    # Mistral 3: a Pixtral tower (4 px patches, 2-D rotary positions, any image shape up to 48 px) whose patches are
    # merged 2x2; [IMG] tokens per row of patches, [IMG_BREAK] between rows, [IMG_END] at the end.
    "mistral3": Family(
        model="Mistral3ForConditionalGeneration",
        config=part("Mistral3Config", vision_config=_vision("PixtralVisionConfig", image_size=48, patch_size=4,
                                                             head_dim=16),
                    text_config=_text("MistralConfig", head_dim=16), image_token_index=Id("[IMG]"),
                    spatial_merge_size=2, tie_word_embeddings=False),
        processor=part("PixtralProcessor", tokenizer=TOKENIZER, patch_size=4, spatial_merge_size=2,
                       chat_template=Template("mistral3"),
                       image_processor=part("PixtralImageProcessor", size={"longest_edge": 48},
                                            patch_size={"height": 8, "width": 8})),
        tokenizer=Tokens(("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"),
                         bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True),
        model_type="mistral3",
    ),
    # Qwen3-VL: learned 4x4 vision position embeddings interpolated to each image's grid, DeepStack (the first vision
    # block's features added to the first text layers), interleaved 3-D rotary positions.
    "qwen3_vl": Family(
        model="Qwen3VLForConditionalGeneration",
        config=part("Qwen3VLConfig", vision_config={**_QWEN_VISION, "intermediate_size": 64, "out_hidden_size": 32,
                                                    "num_position_embeddings": 16, "deepstack_visual_indexes": [0]},
                    text_config=_text("Qwen3VLTextConfig", head_dim=16, rope_parameters={
                        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                        "mrope_interleaved": True}),
                    **_QWEN_IDS),
        processor=part("Qwen3VLProcessor", image_processor=part("Qwen2VLImageProcessor", **_QWEN_PIXELS),
                       tokenizer=TOKENIZER, video_processor=part("Qwen3VLVideoProcessor", **_QWEN_PIXELS),
                       chat_template=Template("qwen")),
        tokenizer=_QWEN_TOKENS,
        model_type="qwen3_vl",
    ),
    # InternVL (the -hf ports): an InternViT tower, pixel-unshuffled to 4 tokens per 28 px tile, the image cropped
    # to up to 4 tiles by its aspect ratio plus a thumbnail, <img>...</img> around each image's tokens, a Qwen2.
    "internvl": Family(
        model="InternVLForConditionalGeneration",
        config=part("InternVLConfig", vision_config=_vision("InternVLVisionConfig"), text_config=_text("Qwen2Config"),
                    image_token_id=Id("<IMG_CONTEXT>"), image_seq_length=4, tie_word_embeddings=False),
        processor=part("InternVLProcessor", tokenizer=TOKENIZER, image_seq_length=4, chat_template=Template("internvl"),
                       image_processor=part("GotOcr2ImageProcessor", size={"height": 28, "width": 28},
                                            crop_to_patches=True, min_patches=1, max_patches=4),
                       video_processor=part("InternVLVideoProcessor", size={"height": 28, "width": 28})),
        tokenizer=Tokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                          "<video>"), eos="<|im_end|>", pad="<|endoftext|>",
                         extra=(("start_image_token", "<img>"), ("end_image_token", "</img>"),
                                ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>"))),
        model_type="internvl",
    ),
    # Aya Vision: SigLIP pixel-shuffled 2x2 to 4 tokens per 28 px tile, up to 4 tiles (TILE_i) and a global view,
    # a Cohere 2 with sliding-window layers (window 8) and logits scaled by 0.0625 after the head.
    "aya_vision": Family(
        model="AyaVisionForConditionalGeneration",
        config=part("AyaVisionConfig", vision_config=_vision("SiglipVisionConfig"),
                    text_config=_text("Cohere2Config", sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"]),
                    downsample_factor=2, image_token_index=Id("<|IMG_PATCH|>")),
        processor=part("AyaVisionProcessor", tokenizer=TOKENIZER, patch_size=7, img_size=28, downsample_factor=2,
                       chat_template=Template("aya_vision"),
                       image_processor=part("GotOcr2ImageProcessor", size={"height": 28, "width": 28},
                                            crop_to_patches=True, min_patches=1, max_patches=4)),
        tokenizer=Tokens(("<PAD>", "<UNK>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>",
                          "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
                          "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"),
                         bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", unk="<UNK>", add_bos=True),
        model_type="aya_vision",
    ),
    # Llama 3.2 Vision (Mllama): the image never enters the token sequence; one <|image|> token, and text layer 1
    # cross-attends to the tiles' features (up to 4 tiles of 28 px by aspect ratio, a local and a global encoder).
    "mllama": Family(
        model="MllamaForConditionalGeneration",
        config=part("MllamaConfig", vision_config=part("MllamaVisionConfig", hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                                       image_size=28, patch_size=7, max_num_tiles=4,
                                                       intermediate_layers_indices=[0], vision_output_dim=64),
                    text_config=_text("MllamaTextConfig", cross_attention_layers=[1]),
                    image_token_index=Id("<|image|>")),
        processor=part("MllamaProcessor", tokenizer=TOKENIZER, chat_template=Template("mllama"),
                       image_processor=part("MllamaImageProcessor", size={"height": 28, "width": 28},
                                            max_image_tiles=4)),
        tokenizer=Tokens(("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                          "<|end_header_id|>", "<|eot_id|>", "<|image|>", "<|python_tag|>"),
                         bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>"),
        model_type="mllama",
        reinit=("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate"),  # closed gates would keep the image out
    ),
    # GLM-4V (GLM-4.1V/4.5V): Qwen-style 4 px patches merged 2x2 with learned 4x4 position embeddings interpolated
    # to each grid, 3-D rotary positions on half of each head's dimensions.
    "glm4v": Family(
        model="Glm4vForConditionalGeneration",
        config=part("Glm4vConfig", vision_config={**_QWEN_VISION, "image_size": 16, "intermediate_size": 64,
                                                  "out_hidden_size": 32},
                    text_config=_text("Glm4vTextConfig", rope_parameters={
                        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                        "partial_rotary_factor": 0.5}),
                    image_token_id=Id("<|image|>"), video_token_id=Id("<|video|>"),
                    image_start_token_id=Id("<|begin_of_image|>"), image_end_token_id=Id("<|end_of_image|>"),
                    video_start_token_id=Id("<|begin_of_video|>"), video_end_token_id=Id("<|end_of_video|>")),
        processor=part("Glm4vProcessor", tokenizer=TOKENIZER, chat_template=Template("glm4v"),
                       image_processor=part("Glm4vImageProcessor", size={"shortest_edge": 16 * 16,
                                            "longest_edge": 48 * 48}, patch_size=4, temporal_patch_size=2,
                                            merge_size=2),
                       video_processor=part("Glm4vVideoProcessor", size={"shortest_edge": 16 * 16,
                                            "longest_edge": 48 * 48}, patch_size=4, temporal_patch_size=2,
                                            merge_size=2)),
        tokenizer=Tokens(("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                          "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"),
                         eos="<|user|>", pad="<|endoftext|>"),
        model_type="glm4v",
    ),
    # VipLLaVA: LLaVA-1.5 reading several vision layers at once (concatenated, layer-normed, projected).
    "vipllava": Family(
        model="VipLlavaForConditionalGeneration",
        config=part("VipLlavaConfig", vision_config=_vision("CLIPVisionConfig", projection_dim=32), text_config=_text(),
                    image_token_index=Id("<image>"), vision_feature_layer=[-2, -1], image_seq_length=16),
        processor=part("LlavaProcessor", image_processor=part("CLIPImageProcessor", **_LLAVA_SIZE),
                       chat_template=Template("llava"), tokenizer=TOKENIZER, patch_size=7,
                       vision_feature_select_strategy="full", num_additional_image_tokens=0),
        tokenizer=_LLAVA_TOKENS,
        model_type="vipllava",
    ),
    # LLaVA-NeXT-Video on images: LLaVA-NeXT's anyres tiles (the video path is not used by lvlmlp).
    "llava_next_video": Family(
        model="LlavaNextVideoForConditionalGeneration",
        config=part("LlavaNextVideoConfig", **_LLAVA_CONFIG, image_grid_pinpoints=_PINPOINTS,
                    video_token_index=Id("<video>")),
        processor=part("LlavaNextVideoProcessor", chat_template=Template("llava_next"), **_LLAVA_PROCESSOR,
                       image_processor=part("LlavaNextImageProcessor", **_LLAVA_SIZE, image_grid_pinpoints=_PINPOINTS),
                       video_processor=part("LlavaNextVideoVideoProcessor", **_LLAVA_SIZE)),
        tokenizer=Tokens(_LLAVA_TOKENS.specials + ("<video>", "[INST]", "[/INST]"), bos="<s>", eos="</s>",
                         pad="<pad>", unk="<unk>", add_bos=True,
                         extra=(("image_token", "<image>"), ("video_token", "<video>"))),
        model_type="llava_next_video",
    ),
    # BLIP-2: a Q-Former (4 queries, no text input) between the vision tower and an OPT; no chat template.
    "blip-2": Family(
        model="Blip2ForConditionalGeneration",
        config=part("Blip2Config", vision_config=_vision(),
                    qformer_config=dict(**_TINY, vocab_size=300, encoder_hidden_size=32, pad_token_id=0,
                                        max_position_embeddings=128),
                    text_config=part("OPTConfig", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=512,
                                     pad_token_id=Special("pad"), bos_token_id=Special("bos"),
                                     eos_token_id=Special("eos")),
                    num_query_tokens=4, image_token_index=Id("<image>")),
        processor=part("Blip2Processor", image_processor=part("BlipImageProcessor", size={"height": 28, "width": 28}),
                       tokenizer=TOKENIZER, num_query_tokens=4),
        tokenizer=Tokens(("<pad>", "</s>", "<unk>", "<image>"), bos="</s>", eos="</s>", pad="<pad>", unk="<unk>",
                         add_bos=True),
        model_type="blip-2",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),
    ),
    # LFM2-VL: a NaFlex SigLIP 2 tower (4 px patches, any shape up to 64 patches) pixel-unshuffled 2x2, images over
    # 32 px split into 32 px tiles plus a thumbnail; an LFM2 text model whose first layer is a short convolution.
    "lfm2_vl": Family(
        model="Lfm2VlForConditionalGeneration",
        config=part("Lfm2VlConfig", vision_config=part("Siglip2VisionConfig", **_TINY, patch_size=4, num_patches=64),
                    text_config=_text("Lfm2Config", layer_types=["conv", "full_attention"],
                                      block_auto_adjust_ff_dim=False),
                    image_token_id=Id("<image>"), downsample_factor=2, projector_hidden_size=32),
        processor=part("Lfm2VlProcessor", tokenizer=TOKENIZER, chat_template=Template("lfm2_vl"),
                       image_processor=part("Lfm2VlImageProcessor", tile_size=32, encoder_patch_size=4,
                                            downsample_factor=2, min_image_tokens=4, max_image_tokens=16,
                                            min_tiles=2, max_tiles=4, size={"height": 32, "width": 32},
                                            max_num_patches=64)),
        tokenizer=Tokens(("<|pad|>", "<|startoftext|>", "<|im_end|>", "<|im_start|>", "<image>", "<|image_start|>",
                          "<|image_end|>", "<|img_thumbnail|>",
                          *(f"<|img_row_{i}_col_{j}|>" for i in range(1, 5) for j in range(1, 5))),
                         bos="<|startoftext|>", eos="<|im_end|>", pad="<|pad|>", vocab_size=340),
        model_type="lfm2_vl",
        lora_targets=("q_proj", "k_proj", "v_proj", "out_proj"),  # out_proj: its convolutions' too
    ),
    # Command A Vision (Cohere2-Vision): SigLIP pixel-shuffled 2x2 to 4 tokens per 28 px tile, up to 4 tiles and a
    # thumbnail, a line break token after each tile; a Cohere 2 whose logit scale the model does not apply.
    "cohere2_vision": Family(
        model="Cohere2VisionForConditionalGeneration",
        config=part("Cohere2VisionConfig", vision_config=_vision("SiglipVisionConfig"),
                    text_config=_text("Cohere2Config", sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"]),
                    downsample_factor=2, image_token_id=Id("<|IMG_PATCH|>"), alignment_intermediate_size=64),
        processor=part("Cohere2VisionProcessor", tokenizer=TOKENIZER, chat_template=Template("cohere2_vision"),
                       image_processor=part("Cohere2VisionImageProcessor", size={"height": 28, "width": 28},
                                            patch_size=2, crop_to_patches=True, min_patches=1, max_patches=4)),
        tokenizer=Tokens(("<PAD>", "<UNK>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>",
                          "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>",
                          "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>"),
                         bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", unk="<UNK>", add_bos=True,
                         extra=(("boi_token", "<|START_OF_IMG|>"), ("eoi_token", "<|END_OF_IMG|>"),
                                ("image_token", "<|IMG_PATCH|>"), ("img_line_break_token", "<|IMG_LINE_BREAK|>"))),
        model_type="cohere2_vision",
    ),
    # Gemma 4: a vision tower on 2 px patches with 2-D positions, 3x3-pooled to at most 70 soft tokens per image
    # (any aspect ratio), per-layer token inputs, sliding-window (8) and global layers with their own rotary.
    "gemma4": Family(
        model="Gemma4ForConditionalGeneration",
        config=part("Gemma4Config", vision_config=dict(**_TINY, num_key_value_heads=2, head_dim=16, patch_size=2,
                                                       pooling_kernel_size=3, position_embedding_size=64),
                    text_config=_text("Gemma4TextConfig", head_dim=16, global_head_dim=16, sliding_window=8,
                                      layer_types=["sliding_attention", "full_attention"],
                                      vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
                    audio_config=None, boi_token_id=Id("<start_of_image>"), eoi_token_id=Id("<end_of_image>"),
                    image_token_id=Id("<image_soft_token>"), video_token_id=Id("<|video|>"),
                    boa_token_id=Id("<start_of_audio>"), eoa_token_index=Id("<end_of_audio>"),
                    audio_token_id=Id("<audio_soft_token>")),
        processor=part("Gemma4Processor", tokenizer=TOKENIZER, chat_template=Template("gemma4"), image_seq_length=70,
                       feature_extractor=part("Gemma4AudioFeatureExtractor"),
                       image_processor=part("Gemma4ImageProcessor", patch_size=2, max_soft_tokens=70,
                                            pooling_kernel_size=3),
                       video_processor=part("Gemma4VideoProcessor", patch_size=2, max_soft_tokens=70,
                                            pooling_kernel_size=3)),
        tokenizer=Tokens(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                          "<end_of_image>", "<image_soft_token>", "<|video|>", "<start_of_audio>", "<end_of_audio>",
                          "<audio_soft_token>"), bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
                         # The processor wants the audio tokens named even without audio.
                         extra=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                                ("image_token", "<image_soft_token>"), ("boa_token", "<start_of_audio>"),
                                ("eoa_token", "<end_of_audio>"), ("audio_token", "<audio_soft_token>"))),
        model_type="gemma4",
    ),
    # Video-LLaVA on images: a CLIP image tower (its video tower unused), a Llama.
    "video_llava": Family(
        model="VideoLlavaForConditionalGeneration",
        config=part("VideoLlavaConfig", **_LLAVA_CONFIG, video_token_index=Id("<video>"), image_seq_length=16),
        processor=part("VideoLlavaProcessor", chat_template=Template("llava"), **_LLAVA_PROCESSOR,
                       image_processor=part("VideoLlavaImageProcessor", **_LLAVA_SIZE),
                       video_processor=part("VideoLlavaVideoProcessor", **_LLAVA_SIZE)),
        tokenizer=Tokens(_LLAVA_TOKENS.specials + ("<video>",), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>",
                         add_bos=True, extra=(("image_token", "<image>"), ("video_token", "<video>"))),
        model_type="video_llava",
    ),
    # Janus (-Pro): a SigLIP-style understanding tower (16 tokens per 28 px image between <begin_of_image> and
    # <end_of_image>), a Llama; its VQ image generator is built (tiny) but unused by lvlmlp.
    "janus": Family(
        model="JanusForConditionalGeneration",
        config=part("JanusConfig", vision_config=dict(_vision(), mlp_ratio=2.0, projection_dim=32, depth=1,
                                                      num_image_tokens=16),
                    vq_config=dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,
                                   channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4, projection_dim=32,
                                   image_token_embed_dim=32, num_hidden_layers=1),
                    text_config=_text(), image_token_id=Id("<image_placeholder>")),
        processor=part("JanusProcessor", tokenizer=TOKENIZER, chat_template=Template("janus"), num_image_tokens=16,
                       image_processor=part("JanusImageProcessor", size={"height": 28, "width": 28})),
        tokenizer=Tokens(("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image_placeholder>",
                          "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>"),
                         bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>", add_bos=True,
                         extra=(("image_token", "<image_placeholder>"), ("boi_token", "<begin_of_image>"),
                                ("eoi_token", "<end_of_image>"))),
        model_type="janus",
    ),
    # DeepSeek-VL: a SigLIP tower (images padded to a square, 16 tokens), a Llama.
    "deepseek_vl": Family(
        model="DeepseekVLForConditionalGeneration",
        config=part("DeepseekVLConfig", vision_config=_vision("SiglipVisionConfig"), text_config=_text(),
                    image_token_id=Id("<image_placeholder>")),
        processor=part("DeepseekVLProcessor", tokenizer=TOKENIZER, chat_template=Template("deepseek_vl"),
                       num_image_tokens=16,
                       image_processor=part("DeepseekVLImageProcessor", size={"height": 28, "width": 28})),
        tokenizer=Tokens(("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image_placeholder>"),
                         bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>", add_bos=True,
                         extra=(("image_token", "<image_placeholder>"),)),
        model_type="deepseek_vl",
    ),
    # Ovis2: a visual tokenizer (each 2x2 patch group a softmax over a 64-entry visual vocabulary, embedded from its
    # own table), up to 4 aspect-ratio tiles after a global view, indicator tokens between them; a Qwen2.
    "ovis2": Family(
        model="Ovis2ForConditionalGeneration",
        config=part("Ovis2Config", vision_config=dict(_vision(), vocab_size=64, hidden_stride=2,
                                                      num_visual_indicator_tokens=5),
                    text_config=_text("Qwen2Config"), vocab_size=VOCAB, hidden_size=32,
                    image_token_id=Id("<IMG_ATOM>"),
                    visual_indicator_token_ids=[Id(t) for t in ("<IMG_START>", "<IMG_GRID>", "<IMG_COL>",
                                                                 "<IMG_ROW>", "<IMG_END>")]),
        processor=part("Ovis2Processor", tokenizer=TOKENIZER, chat_template=Template("llava_onevision"),
                       image_seq_length=4,
                       image_processor=part("Ovis2ImageProcessor", size={"height": 28, "width": 28},
                                            crop_to_patches=True, min_patches=1, max_patches=4)),
        tokenizer=Tokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<IMG_START>", "<IMG_ATOM>",
                          "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"), eos="<|im_end|>",
                         pad="<|endoftext|>"),
        model_type="ovis2",
    ),
    # Molmo2: overlapping 28 px crops (up to 4) plus a low-resolution view, two ViT layers pooled 2x2 by attention,
    # <im_col> after each patch row; a Qwen3-style text model with extra embeddings for its special tokens.
    "molmo2": Family(
        model="Molmo2ForConditionalGeneration",
        config=part("Molmo2Config",
                    vision_config=dict(_vision(), num_key_value_heads=2, head_dim=16, image_size=[28, 28],
                                       num_position_embeddings=16),
                    adapter_config=dict(vision_feature_layer=[-1, -2], hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                        text_hidden_size=32),
                    text_config=_text("Molmo2TextConfig", head_dim=16, additional_vocab_size=8),
                    image_start_token_id=Id("<im_start>"), low_res_image_start_token_id=Id("<low_res_im_start>"),
                    image_end_token_id=Id("<im_end>"), image_patch_id=Id("<im_patch>"),
                    frame_start_token_id=Id("<frame_start>"), frame_end_token_id=Id("<frame_end>")),
        processor=part("Molmo2Processor", tokenizer=TOKENIZER, chat_template=Template("molmo2"),
                       image_processor=part("Molmo2ImageProcessor", size={"height": 28, "width": 28}, patch_size=7,
                                            max_crops=4, overlap_margins=[1, 1], pooling_size=[2, 2]),
                       video_processor=part("Molmo2VideoProcessor", size={"height": 28, "width": 28}, patch_size=7,
                                            pooling_size=[2, 2])),
        tokenizer=Tokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>", "<im_patch>",
                          "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>",
                          "<im_low>"), bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>"),
        model_type="molmo2",
    ),
    # Kosmos-2: a CLIP tower resampled to 64 latents placed between <image> and </image> by the processor, a
    # sinusoidal-position decoder; no chat template. Refused (see its Quirks row); the entry shows why.
    "kosmos-2": Family(
        model="Kosmos2ForConditionalGeneration",
        config=part("Kosmos2Config", vision_config=_vision(), latent_query_num=64,
                    text_config=dict(vocab_size=VOCAB, embed_dim=32, layers=2, ffn_dim=64, attention_heads=2,
                                     max_position_embeddings=512, pad_token_id=Special("pad"),
                                     bos_token_id=Special("bos"), eos_token_id=Special("eos"))),
        processor=part("Kosmos2Processor", tokenizer=TOKENIZER, num_patch_index_tokens=16,
                       image_processor=part("CLIPImageProcessor", **_LLAVA_SIZE)),
        tokenizer=Tokens(("<s>", "<pad>", "</s>", "<unk>"), bos="<s>", eos="</s>", pad="<pad>", unk="<unk>"),
        model_type="kosmos-2",
    ),
    # Llama 4: a ViT pixel-shuffled 2x2 to 4 <|patch|> tokens per 28 px tile, up to 4 tiles and a global view
    # (bfloat16 pixels from the processor); a mixture-of-experts text model whose rotary layers attend in chunks (of
    # 8 tokens here, so they cut the prompt) and whose no-rotary layers (every 2nd here, every 4th in Llama 4) attend
    # globally. Their attention temperature grows from position `floor_scale` on, counting left padding (so a padded
    # row differs from a single run there): 8192 in Llama 4, 512 here, beyond every test prompt (docs/models.md).
    "llama4": Family(
        model="Llama4ForConditionalGeneration",
        config=part("Llama4Config",
                    vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, vision_output_dim=32, image_size=28, patch_size=7,
                                       pixel_shuffle_ratio=0.5, projector_input_dim=32, projector_output_dim=32),
                    text_config=_text("Llama4TextConfig", head_dim=16, intermediate_size_mlp=64, num_local_experts=4,
                                      num_experts_per_tok=1, attention_chunk_size=8, floor_scale=512,
                                      no_rope_layer_interval=2),
                    boi_token_index=Id("<|image_start|>"), eoi_token_index=Id("<|image_end|>"),
                    image_token_index=Id("<|patch|>")),
        processor=part("Llama4Processor", tokenizer=TOKENIZER, patch_size=7, pixel_shuffle_ratio=0.5,
                       chat_template=Template("llama4"),
                       image_processor=part("Llama4ImageProcessor", size={"height": 28, "width": 28}, max_patches=4,
                                            resize_to_max_canvas=False)),
        tokenizer=Tokens(("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>",
                          "<|header_end|>", "<|eot|>", "<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>",
                          "<|tile_x_separator|>", "<|tile_y_separator|>"),
                         bos="<|begin_of_text|>", eos="<|eot|>", pad="<|finetune_right_pad|>"),
        model_type="llama4",
    ),
    # Chameleon: early fusion: a VQ-VAE turns each 28 px image into 7x7 codes, which are tokens of the text vocabulary
    # ("IMGIMG" + the code in letters A-J for digits 0-9 + "Z"); no chat template.
    "chameleon": Family(
        model="ChameleonForConditionalGeneration",
        config=part("ChameleonConfig", **{k: v for k, v in _text("ChameleonConfig").kwargs}, vocabulary_map=VOCAB_MAP,
                    vq_config=dict(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32,
                                   channel_multiplier=[1, 1, 1], num_res_blocks=1, resolution=28, attn_resolutions=[])),
        processor=part("ChameleonProcessor", tokenizer=TOKENIZER, image_seq_length=49,
                       image_processor=part("ChameleonImageProcessor", size={"shortest_edge": 28},
                                            crop_size={"height": 28, "width": 28})),
        tokenizer=Tokens(("<unk>", "<s>", "</s>", "<pad>", "<image>", "<racm3:break>", "<eoss>", "<reserved08706>",
                          *(f"IMGIMG{''.join(chr(ord('A') + int(d)) for d in str(i))}Z" for i in range(16))),
                         bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", add_bos=True,
                         extra=(("image_token", "<image>"), ("boi_token", "<racm3:break>"), ("eoi_token", "<eoss>"),
                                ("sep_token", "<reserved08706>"))),
        model_type="chameleon",
    ),
}
# Qwen3.5: Qwen3-VL's vision side and processor; the text model alternates Gated DeltaNet (linear attention with
# a short convolution) and full-attention layers; rotary positions on a quarter of each head.
SPECS["qwen3_5"] = Family(
    model="Qwen3_5ForConditionalGeneration",
    config=_variant(SPECS["qwen3_vl"].config, "Qwen3_5Config", text_config=_text(
        "Qwen3_5TextConfig", head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=2, layer_types=["linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 0],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25})),
    processor=SPECS["qwen3_vl"].processor,
    tokenizer=_QWEN_TOKENS,
    model_type="qwen3_5",
)
# Mixture-of-experts siblings: the same processors, 4 experts of which each token uses 2.
_MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
SPECS["qwen3_vl_moe"] = Family(
    model="Qwen3VLMoeForConditionalGeneration",
    config=_variant(SPECS["qwen3_vl"].config, "Qwen3VLMoeConfig", text_config=_variant(
        dict(SPECS["qwen3_vl"].config.kwargs)["text_config"], "Qwen3VLMoeTextConfig", num_experts=4, **_MOE)),
    processor=SPECS["qwen3_vl"].processor,
    tokenizer=_QWEN_TOKENS,
    model_type="qwen3_vl_moe",
)
SPECS["glm4v_moe"] = Family(
    model="Glm4vMoeForConditionalGeneration",
    config=_variant(SPECS["glm4v"].config, "Glm4vMoeConfig", text_config=_variant(
        dict(SPECS["glm4v"].config.kwargs)["text_config"], "Glm4vMoeTextConfig", n_routed_experts=4,
        n_shared_experts=1, first_k_dense_replace=1, **_MOE)),
    processor=SPECS["glm4v"].processor,
    tokenizer=SPECS["glm4v"].tokenizer,
    model_type="glm4v_moe",
)
SPECS["qwen3_5_moe"] = Family(
    model="Qwen3_5MoeForConditionalGeneration",
    config=_variant(SPECS["qwen3_5"].config, "Qwen3_5MoeConfig", text_config=_variant(
        dict(SPECS["qwen3_5"].config.kwargs)["text_config"], "Qwen3_5MoeTextConfig", num_experts=4,
        shared_expert_intermediate_size=32, **_MOE)),
    processor=SPECS["qwen3_vl"].processor,
    tokenizer=_QWEN_TOKENS,
    model_type="qwen3_5_moe",
)
# GLM-4.6V: GLM-4V's architecture under its own config, model and processor classes.
_GLM4V_PROCESSOR = dict(SPECS["glm4v"].processor.kwargs)
SPECS["glm46v"] = Family(
    model="Glm46VForConditionalGeneration",
    config=_variant(SPECS["glm4v"].config, "Glm46VConfig"),
    processor=_variant(SPECS["glm4v"].processor, "Glm46VProcessor",
                       image_processor=_variant(_GLM4V_PROCESSOR["image_processor"], "Glm46VImageProcessor"),
                       video_processor=_variant(_GLM4V_PROCESSOR["video_processor"], "Glm46VVideoProcessor")),
    tokenizer=SPECS["glm4v"].tokenizer,
    model_type="glm46v",
)
# FastVLM: a FastViTHD tower (timm's `fastvit_mci3`: convolutional stages, then attention stages, 64x downsampling,
# here one block per stage and widths 8..32, layer scales starting at 1 rather than 1e-5 so that its blocks count)
# whose 2x2 output map for a 128 px image is 4 image tokens; a Qwen2.
SPECS["fast_vlm"] = Family(
    model="FastVlmForConditionalGeneration",
    config=part("FastVlmConfig", vision_config=dict(model_type="timm_wrapper", architecture="fastvit_mci3",
                                                    do_pooling=False, hidden_size=64,
                                                    model_args=dict(inference_mode=True, layers=[1, 1, 1, 1, 1],
                                                                    embed_dims=[8, 16, 16, 32, 32],
                                                                    layer_scale_init_value=1.0)),
                text_config=_text("Qwen2Config"), image_token_index=Id("<image>"), image_seq_length=4),
    processor=part("LlavaProcessor", tokenizer=TOKENIZER, chat_template=Template("llava_onevision"), patch_size=64,
                   vision_feature_select_strategy="full", num_additional_image_tokens=0,
                   image_processor=part("CLIPImageProcessor", size={"shortest_edge": 128},
                                        crop_size={"height": 128, "width": 128})),
    tokenizer=Tokens(("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"), eos="<|im_end|>",
                     pad="<|endoftext|>", extra=(("image_token", "<image>"),)),
    model_type="fast_vlm",
)
# PerceptionLM: a Perception Encoder tower (timm's `vit_pe_core_large_patch14_336`: rotary ViT with a CLS token,
# here 2 layers of width 32 on 28 px tiles of 7 px patches), pooled 2x2 to 4 tokens per tile; a thumbnail plus up to
# 4 aspect-ratio tiles per image; a Llama.
SPECS["perception_lm"] = Family(
    model="PerceptionLMForConditionalGeneration",
    config=part("PerceptionLMConfig", vision_config=dict(model_type="timm_wrapper",
                                                         architecture="vit_pe_core_large_patch14_336",
                                                         do_pooling=False,
                                                         model_args=dict(embed_dim=32, depth=2, num_heads=2,
                                                                         patch_size=7, img_size=[28, 28],
                                                                         ref_feat_shape=[4, 4],
                                                                         global_pool="",
                                                                         use_post_transformer_norm=False,
                                                                         init_values=0.1)),
                text_config=_text(), vision_use_cls_token=True, projector_pooling_ratio=2,
                image_token_id=Id("<|image|>"), video_token_id=Id("<|video|>")),
    processor=part("PerceptionLMProcessor", tokenizer=TOKENIZER, chat_template=Template("mllama"), patch_size=7,
                   pooling_ratio=2,
                   image_processor=part("PerceptionLMImageProcessor", tile_size=28, max_num_tiles=4,
                                        size={"height": 28, "width": 28}),
                   video_processor=part("PerceptionLMVideoProcessor", size={"height": 28, "width": 28})),
    tokenizer=Tokens(("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eot_id|>", "<|image|>", "<|video|>"),
                     bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                     extra=(("image_token", "<|image|>"), ("video_token", "<|video|>"))),
    model_type="perception_lm",
)



# Gemma 3n: a MobileNet-V5 tower (timm's `mobilenetv5_300m_enc`, all its 84 blocks: edge and inverted residual blocks,
# then multi-query attention; its channels scaled by 1/80 to 8..16, which timm allows, while its depth and attention
# widths are fixed by timm), fused across its last two stages into a 2x2 map of 2048 channels: 4 soft tokens per
# 64 px image. Its multimodal tokens follow the text vocabulary (named tokens that are not specials are appended after
# the BPE merges, in order) and are embedded by their own tables; the text model has AltUp, Laurel, per-layer inputs,
# activation sparsity, KV sharing (layers 3-4 reuse the KV of 1-2), sliding-window (8) and global layers, and
# soft-capped logits. The audio tower is built (tiny) but unused.
SPECS["gemma3n"] = Family(
    model="Gemma3nForConditionalGeneration",
    config=part("Gemma3nConfig",
                vision_config=part("Gemma3nVisionConfig", hidden_size=2048, vocab_size=2,
                                   vocab_offset=Id("<end_of_image>"),
                                   model_args=dict(channel_multiplier=0.0125, stem_size=8, msfa_output_resolution=2)),
                audio_config=part("Gemma3nAudioConfig", vocab_size=2, vocab_offset=Id("<end_of_audio>"),
                                  hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                                  sscp_conv_channel_size=[8, 8]),
                text_config=_text("Gemma3nTextConfig", num_hidden_layers=4, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * 2,
                                  vocab_size_per_layer_input=Id("<end_of_image>"), hidden_size_per_layer_input=8,
                                  laurel_rank=4, num_kv_shared_layers=2,
                                  activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
                vision_soft_tokens_per_image=4, boi_token_id=Id("<start_of_image>"),
                eoi_token_id=Id("<end_of_image>"), image_token_id=Id("<image_soft_token>"),
                boa_token_id=Id("<start_of_audio>"), eoa_token_id=Id("<end_of_audio>"),
                audio_token_id=Id("<audio_soft_token>")),
    # Gemma 4's template style: the image part is the soft token, which the processor expands.
    processor=part("Gemma3nProcessor", tokenizer=TOKENIZER, chat_template=Template("gemma4"), image_seq_length=4,
                   feature_extractor=part("Gemma3nAudioFeatureExtractor"),
                   image_processor=part("SiglipImageProcessor", size={"height": 64, "width": 64})),
    tokenizer=Tokens(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                      "<start_of_audio>"), bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
                     extra=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                            ("image_token", "<image_soft_token>"), ("boa_token", "<start_of_audio>"),
                            ("eoa_token", "<end_of_audio>"), ("audio_token", "<audio_soft_token>"))),
    model_type="gemma3n",
)
FAMILIES: tuple[str, ...] = tuple(SPECS)


def tiny_model(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random checkpoint of `family` (one of `FAMILIES`) to `out_dir` and return its path.

    The weights depend only on `seed`; the global torch RNG state is left untouched.
    """
    if family not in FAMILIES:
        raise LvlmlpError(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}")
    import torch
    import transformers
    from transformers import PretrainedConfig

    spec = SPECS[family]
    tok = _tokenizer(spec.tokenizer)
    # The processor first: some (PaliGemma's) add tokens to the tokenizer, which the embedding must then cover.
    processor = _resolve(spec.processor, tok)
    config = _resolve(spec.config, tok)
    # Larger than the usual 0.02 so the tiny model's logits are well separated: greedy decoding then never hinges
    # on near-ties that float rounding could flip between a batched and a single run.
    config.initializer_range = 0.2
    for sub in config.sub_configs:
        if isinstance(getattr(config, sub, None), PretrainedConfig):
            getattr(config, sub).initializer_range = 0.2
    model_cls = getattr(transformers, spec.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in spec.reinit:
                with torch.no_grad():
                    param.normal_(0.0, config.initializer_range)
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


# A checkpoint's own code (`tiny_remote_checkpoint`): LLaVA under another model type and class names.
_REMOTE_MODELING = '''from transformers import LlavaConfig, LlavaForConditionalGeneration


class {prefix}Config(LlavaConfig):
    model_type = "{model_type}"


class {prefix}ForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = {prefix}Config
'''


def tiny_remote_checkpoint(base: Path, root: Path, module_name: str, model_type: str, auto_class: str) -> Path:
    """The tiny LLaVA `base`'s weights under a class of a modeling file of its own (`module_name`.py, saved beside
    them), of model type `model_type`, registered in config.json's auto_map for `auto_class` only."""
    import importlib.util
    import sys

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    prefix = "".join(part.title() for part in model_type.split("_"))
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module_name}.py").write_text(_REMOTE_MODELING.format(prefix=prefix, model_type=model_type))
    spec = importlib.util.spec_from_file_location(module_name, root / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # save_pretrained copies the file of the class's module
    try:
        spec.loader.exec_module(module)
        config_cls, model_cls = getattr(module, f"{prefix}Config"), getattr(module, f"{prefix}ForConditionalGeneration")
        # Registered classes are saved with an auto_map pointing at their file, which is copied beside the weights.
        config_cls.register_for_auto_class()
        model_cls.register_for_auto_class(auto_class)
        llava = LlavaForConditionalGeneration.from_pretrained(base)
        model = model_cls(config_cls(**llava.config.to_dict()))
        model.load_state_dict(llava.state_dict())
        model.generation_config = llava.generation_config
        out = root / f"ckpt-{module_name}"  # transformers caches a folder's code under the folder's name
        model.save_pretrained(out)
        AutoProcessor.from_pretrained(base).save_pretrained(out)
    finally:
        del sys.modules[module_name]
    config = json.loads((out / "config.json").read_text())
    if config["model_type"] != model_type or sorted(config["auto_map"]) != ["AutoConfig", auto_class] or not (
            out / f"{module_name}.py").is_file():
        raise RuntimeError(f"{out}: transformers saved no auto_map for {auto_class} or not the code beside it")
    return out
