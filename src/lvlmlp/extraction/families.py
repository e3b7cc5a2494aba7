"""What each model family needs beyond transformers' Auto classes, as data: one `Quirks` row per `model_type`.

The backend reads these flags and names no family itself, so adding a family is one row here plus one tiny-checkpoint
builder in `lvlmlp.testing` (its tests then run the family through every exactness check). Families without a row
get the defaults, which are what a standard chat-templated VLM needs.
"""

from __future__ import annotations

from dataclasses import dataclass

_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_GLM_IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"


@dataclass(frozen=True)
class Quirks:
    """Family-specific behaviour the backend must know; every field's default is the common case."""

    needs: tuple[str, ...] = ()  # packages the processor or model imports that transformers does not require
    chat_template: bool = True  # False: the question goes to the processor as it is (no usable chat template)
    # Text that stands for the image when no chat template builds the prompt; None: the processor's `image_token`.
    image_placeholder: str | None = None
    nested_language_model: bool = False  # positions are prepared by `model.language_model` (InstructBLIP)
    qformer_text: bool = False  # a Q-Former tokenizer with absolute positions: right-pad its text
    drop_outputs: tuple[str, ...] = ()  # processor outputs that are not model inputs for inference
    # True: the model multiplies lm_head's output by text_config.logit_scale (Aya Vision); False: it ignores the
    # config's scale (Cohere2-Vision); None: not known, so a scale other than 1 counts as a non-linear head.
    logit_scale: bool | None = None
    # False: the model rewrites lm_head's output beyond a scale (Chameleon sets its image tokens' logits to the lowest
    # float), so logits are not rebuilt from hidden states.
    linear_head: bool = True
    # The processor returns tensors NumPy cannot hold (Llama 4's bfloat16 pixels): ask it for torch tensors.
    torch_outputs: bool = False
    # The processor takes PIL images only (Idefics2's loads each through `load_image`): PNG rows are not given to it as
    # tensors (`png.png_pixels`).
    pil_images: bool = False
    # The processor gives each image a different number of tiles and cannot stack them (PerceptionLM): the batch's
    # tiles are joined into one array in row order, the order in which the model fills the image tokens.
    ragged_tiles: bool = False
    # The model's own `generate` drops `logits_processor` (Janus's, in text mode): the backend calls the generic
    # `GenerationMixin.generate` that its text mode calls, with classifier-free guidance off as it sets it.
    generic_generate: bool = False
    # The text config's attribute giving the padded length from which a left-padded row's results differ from a
    # single run (Llama 4's `floor_scale`: its attention temperature counts padding positions); such batches stop.
    padded_limit: str = ""
    # Why the backend refuses the family: it runs, but its batched results cannot be made to equal single runs
    # (docs/models.md lists the reason). Empty: not refused.
    refused: str = ""
    # `--vision` (vision.npy): where the vision encoder's output that the projector reads is taken, and how it splits
    # into the batch's images (`backend.VISION_LAYOUTS`). `vision_input`: a module path whose first input is taken,
    # `PATH:NAME` its keyword input NAME, `PATH:output` its output. The defaults fit LLaVA-style models: one
    # (images, tokens, D) tensor into `multi_modal_projector`, one image per row.
    vision_input: str = "model.multi_modal_projector"
    vision_layout: str = "batched"
    # Why `--vision` is refused for the family (no continuous vision output reaches the language model); empty: not.
    vision_refused: str = ""


_GRID = {"vision_input": "model.visual.merger", "vision_layout": "grid"}  # Qwen-VL: the blocks' output, t*h*w patches
# GLM-4V: the post-layernorm of the vision blocks (its downsampling convolution and merger are the projector)
_GLM_GRID = {"vision_input": "model.visual.post_layernorm:output", "vision_layout": "grid"}
_CROPS = {"vision_layout": "crops"}  # LLaVA-NeXT style: each image's base image and any-resolution crops
_SUBIMAGES = {"vision_input": "model.connector", "vision_layout": "subimages"}  # Idefics: real sub-images, patch mask
_TOKENS = {"vision_layout": "image_tokens"}  # crops or patches of all images in one sequence, split by image tokens


QUIRKS: dict[str, Quirks] = {
    "qwen2_vl": Quirks(needs=("torchvision",), image_placeholder=_QWEN_IMAGE, **_GRID),
    "qwen2_5_vl": Quirks(needs=("torchvision",), image_placeholder=_QWEN_IMAGE, **_GRID),
    "qwen3_vl": Quirks(needs=("torchvision",), image_placeholder=_QWEN_IMAGE, **_GRID),
    "qwen3_vl_moe": Quirks(needs=("torchvision",), image_placeholder=_QWEN_IMAGE, **_GRID),
    "qwen3_5": Quirks(needs=("torchvision",), image_placeholder=_QWEN_IMAGE, **_GRID),
    "qwen3_5_moe": Quirks(needs=("torchvision",), image_placeholder=_QWEN_IMAGE, **_GRID),
    # Their processors hold a video processor, which transformers builds on torchvision.
    "llava_onevision": Quirks(needs=("torchvision",), **_CROPS),
    "internvl": Quirks(needs=("torchvision",), **_TOKENS),
    "gemma4": Quirks(needs=("torchvision",), vision_input="model.embed_vision", **_TOKENS),
    "video_llava": Quirks(needs=("torchvision",)),
    "molmo2": Quirks(needs=("torchvision",), vision_layout="num_crops"),
    "llava_next_video": Quirks(needs=("torchvision",), **_CROPS),
    "glm4v": Quirks(needs=("torchvision",), image_placeholder=_GLM_IMAGE, **_GLM_GRID),
    "glm4v_moe": Quirks(needs=("torchvision",), image_placeholder=_GLM_IMAGE, **_GLM_GRID),
    "glm46v": Quirks(needs=("torchvision",), image_placeholder=_GLM_IMAGE, **_GLM_GRID),
    "aya_vision": Quirks(logit_scale=True, **_TOKENS),
    "cohere2_vision": Quirks(logit_scale=False, **_TOKENS),
    "llama4": Quirks(torch_outputs=True, padded_limit="floor_scale", vision_input="multi_modal_projector",
                      **_TOKENS),
    "chameleon": Quirks(chat_template=False, image_placeholder="<image>", linear_head=False,
                        vision_refused="its images enter as discrete VQ tokens of the text vocabulary: no projector "
                        "reads a continuous vision-encoder output"),
    # Kosmos-2's processor places its image tokens itself. Its first-token logits can be matched, but not the rest.
    "kosmos-2": Quirks(
        chat_template=False,
        image_placeholder="",
        refused="its own generate shifts the positions of the tokens it generates by the row's left padding, so in "
        "a batch every token after the first differs from a single run",
    ),
    # Their vision towers are timm models (checked before anything loads, so the error names the package).
    # FastVLM: its hybrid tower's last state, flattened to (B, tokens, D), into `multi_modal_projector` (the default).
    "fast_vlm": Quirks(needs=("timm",)),
    # Gemma 3n: the tower's soft tokens (scaled by sqrt(D)) embedded by `embed_vision`, which also embeds the hard
    # vision token ids (its `input_ids` calls, not taken).
    "gemma3n": Quirks(needs=("timm",), vision_input="model.embed_vision:inputs_embeds"),
    # PerceptionLM: every tile of the batch's images in row order, as many per row as its image tokens say.
    "perception_lm": Quirks(needs=("timm",), ragged_tiles=True, **_TOKENS),
    "smolvlm": Quirks(needs=("torchvision", "num2words"), **_SUBIMAGES),
    # InstructBLIP's processor inserts its query tokens itself, so its raw prompt needs no image text.
    # BLIP-2 / InstructBLIP: the vision model's last state (CLS and patches) that the Q-Former cross-attends to.
    "instructblip": Quirks(chat_template=False, image_placeholder="", nested_language_model=True, qformer_text=True,
                           vision_input="qformer:encoder_hidden_states"),
    "blip-2": Quirks(chat_template=False, image_placeholder="", vision_input="qformer:encoder_hidden_states"),
    "instructblipvideo": Quirks(chat_template=False, nested_language_model=True, qformer_text=True),
    # PaliGemma returns training labels whenever it returns token_type_ids; they would only add a loss.
    "paligemma": Quirks(chat_template=False, drop_outputs=("labels",)),
    "llava_next": Quirks(**_CROPS),
    # LFM2-VL: the vision tower's state; its projector reads each image's patches in whole downsampling blocks
    "lfm2_vl": Quirks(vision_input="model.vision_tower:output", vision_layout="blocks"),
    "idefics2": Quirks(pil_images=True, **_SUBIMAGES),
    "idefics3": Quirks(**_SUBIMAGES),
    "mistral3": Quirks(**_TOKENS),  # the patches of all images in one sequence (the projector merges them 2x2)
    "mllama": Quirks(vision_layout="tiles"),  # (B, images, tiles, tokens, D): the real tiles (aspect_ratio_mask)
    "janus": Quirks(vision_input="model.aligner", generic_generate=True),
    "deepseek_vl": Quirks(vision_input="model.aligner"),
    "ovis2": Quirks(vision_input="model.visual_embeddings_table", **_TOKENS),  # the visual tokenizer's soft tokens
}


# The model types that pass the family checks (the exact tiny families of `lvlmlp.testing`; tests/extraction/test_families.py
# keeps this set equal to them). Any other model type runs, with a warning that nothing checked it.
CHECKED: frozenset[str] = frozenset({
    "aya_vision", "blip-2", "chameleon", "cohere2_vision", "deepseek_vl", "fast_vlm", "gemma3", "gemma3n", "gemma4",
    "glm46v", "glm4v", "glm4v_moe", "idefics2", "idefics3", "instructblip", "internvl", "janus", "lfm2_vl", "llama4",
    "llava", "llava_next", "llava_next_video", "llava_onevision", "mistral3", "mllama", "molmo2", "ovis2", "paligemma",
    "perception_lm", "qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe", "smolvlm",
    "video_llava", "vipllava",
})


def quirks_of(model_type: str) -> Quirks:
    """The quirks of a `config.model_type` (the defaults for a family without a row)."""
    return QUIRKS.get(model_type, Quirks())
