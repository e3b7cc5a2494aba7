"""Write the coverage table of docs/models.md from the family registry (`lvlmlp.testing.SPECS`, `QUIRKS`).

Every `model_type` that transformers registers under `AutoModelForImageTextToText` gets one row:

* **exact**: a tiny checkpoint of the family is in `lvlmlp.testing.SPECS`, so tests/extraction/test_backend.py runs it through
  the family checks (batched, left-padded extraction equals each row alone through `generate(output_logits=True)`
  within 1e-4, first token and first K tokens, responses, hidden states); the suite fails if one does not pass.
* **refused**: its `Quirks.refused` gives the reason; `lvlmlp extract` (any `Backend`) stops with that reason.
* **guided decoding**, **finetuning**: `checked` when tests/steering/test_guard.py forces the template on the
  flagged rows (the others decode as without the guard, the raw logits unchanged) and tests/study/test_finetune.py
  checks the training batch against generation and runs one LoRA step (finite loss, exactly the targeted weights
  changed), which they do for every family the backend runs; the LoRA targets where the default names are not in
  the language model (`Family.lora_targets`).
* **left out**: no tiny checkpoint, with the reason from `LEFT_OUT` (OCR-only, video-only, encoder-decoder captioner,
  robot-action, a package not installed here, or not tried yet); such a model still loads and runs unchecked.

    python scripts/models_table.py           # rewrite the table in docs/models.md
    python scripts/models_table.py --check   # exit 1 if docs/models.md differs (tests/extraction/test_families.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
BEGIN = "<!-- models table: written by scripts/models_table.py from the family registry; do not edit by hand -->"
END = "<!-- end of models table -->"

# model_type -> (family as people call it, example hub ids). Every model type with a tiny checkpoint needs a row.
NAMES: dict[str, tuple[str, str]] = {
    "llava": ("LLaVA-1.5", "llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf"),
    "llava_next": ("LLaVA-NeXT (1.6)", "llava-hf/llava-v1.6-mistral-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf"),
    "qwen2_vl": ("Qwen2-VL", "Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2_5_vl": ("Qwen2.5-VL", "Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct"),
    "instructblip": ("InstructBLIP", "Salesforce/instructblip-vicuna-7b"),
    "idefics3": ("Idefics3", "HuggingFaceM4/Idefics3-8B-Llama3"),
    "smolvlm": ("SmolVLM, SmolVLM2", "HuggingFaceTB/SmolVLM-Instruct, HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
    "paligemma": ("PaliGemma, PaliGemma 2", "google/paligemma-3b-mix-224, google/paligemma2-3b-mix-224"),
    "gemma3": ("Gemma 3", "google/gemma-3-4b-it, google/gemma-3-27b-it"),
    "llava_onevision": ("LLaVA-OneVision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf, "
                        "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    "idefics2": ("Idefics2", "HuggingFaceM4/idefics2-8b"),
    "mistral3": ("Mistral Small 3.1 / 3.2 (Mistral 3)", "mistralai/Mistral-Small-3.1-24B-Instruct-2503"),
    "qwen3_vl": ("Qwen3-VL", "Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen3-VL-8B-Instruct"),
    "internvl": ("InternVL 3 / 3.5 (-hf ports)", "OpenGVLab/InternVL3-1B-hf, OpenGVLab/InternVL3-8B-hf"),
    "aya_vision": ("Aya Vision", "CohereForAI/aya-vision-8b"),
    "mllama": ("Llama 3.2 Vision (Mllama)", "meta-llama/Llama-3.2-11B-Vision-Instruct"),
    "glm4v": ("GLM-4.1V", "zai-org/GLM-4.1V-9B-Thinking"),
    "vipllava": ("VipLLaVA", "llava-hf/vip-llava-7b-hf"),
    "llava_next_video": ("LLaVA-NeXT-Video (images)", "llava-hf/LLaVA-NeXT-Video-7B-hf"),
    "blip-2": ("BLIP-2 (OPT)", "Salesforce/blip2-opt-2.7b"),
    "lfm2_vl": ("LFM2-VL", "LiquidAI/LFM2-VL-1.6B"),
    "qwen3_vl_moe": ("Qwen3-VL MoE", "Qwen/Qwen3-VL-30B-A3B-Instruct"),
    "glm4v_moe": ("GLM-4.5V", "zai-org/GLM-4.5V"),
    "qwen3_5": ("Qwen3.5", "Qwen/Qwen3.5-27B"),
    "qwen3_5_moe": ("Qwen3.5 MoE", "Qwen/Qwen3.5-35B-A3B"),
    "video_llava": ("Video-LLaVA (images)", "LanguageBind/Video-LLaVA-7B-hf"),
    "janus": ("Janus, Janus-Pro", "deepseek-community/Janus-Pro-1B, deepseek-community/Janus-Pro-7B"),
    "deepseek_vl": ("DeepSeek-VL", "deepseek-community/deepseek-vl-1.3b-chat"),
    "ovis2": ("Ovis2", "thisisiron/Ovis2-1B-hf"),
    "molmo2": ("Molmo2", "allenai/Molmo2-4B, allenai/Molmo2-8B"),
    "kosmos-2": ("Kosmos-2", "microsoft/kosmos-2-patch14-224"),
    "llama4": ("Llama 4", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
    "chameleon": ("Chameleon", "facebook/chameleon-7b"),
    "gemma4": ("Gemma 4", "google/gemma-4-e2b-it, google/gemma-4-12B-it"),
    "glm46v": ("GLM-4.6V", "zai-org/GLM-4.6V"),
    "cohere2_vision": ("Command A Vision (Cohere2-Vision)", "CohereLabs/command-a-vision-07-2025"),
    "fast_vlm": ("FastVLM", "KamilaMila/FastVLM-7B"),
    "perception_lm": ("PerceptionLM", "facebook/Perception-LM-1B, facebook/Perception-LM-8B"),
    "gemma3n": ("Gemma 3n", "google/gemma-3n-E2B-it, google/gemma-3n-E4B-it"),
}

# What the checks cover beyond "exact", or where a hub checkpoint differs from the tiny one.
NOTES: dict[str, str] = {
    "paligemma": "no chat template (the question as it is); PaliGemma 2 soft-caps its logits, so they are not "
    "rebuilt from hidden states",
    "instructblip": "Vicuna variants; the Flan-T5 variants have an encoder-decoder text model and are not checked",
    "blip-2": "OPT variants; the Flan-T5 variants have an encoder-decoder text model and are not checked; "
    "no chat template",
    "aya_vision": "logits are `lm_head` times `logit_scale`; rebuilt from hidden states with the scale",
    "cohere2_vision": "its config's `logit_scale` is not applied by the model (the checks confirm it)",
    "mllama": "cross-attention: the image is not in the token sequence",
    "qwen3_5": "hybrid text model: Gated DeltaNet (linear attention) and full-attention layers",
    "qwen3_5_moe": "hybrid linear / full attention, mixture-of-experts text model",
    "qwen3_vl_moe": "mixture-of-experts text model (4 experts, 2 per token, in the tiny checkpoint)",
    "glm4v_moe": "mixture-of-experts text model (4 routed experts, 2 per token, and a shared one)",
    "llava_next_video": "image input only (lvlmlp reads images)",
    "janus": "understanding path (its image-generation head is not used); its own `generate` drops logits "
    "processors, so lvlmlp calls the generic one it wraps (with guidance off), and guided decoding and "
    "`lvlmlp serve` run",
    "ovis2": "visual tokenizer: image features are soft mixtures of a visual vocabulary",
    "molmo2": "native transformers port (the remote-code Molmo 1 checkpoints are not covered)",
    "kosmos-2": "first-token logits alone could be matched; tests/extraction/test_backend.py shows the later tokens differ",
    "llama4": "bfloat16 pixels from its processor, widened exactly to float32 between processes; a padded batch "
    "that reaches position 8191 (`floor_scale` - 1) stops: from there its attention temperature counts the padding "
    "(`--batch-size 1` runs it; `lvlmlp serve` decodes such a batch's requests one at a time)",
    "chameleon": "images as VQ tokens of the text vocabulary; no chat template; the model sets image tokens' logits "
    "to the lowest float, so logits are not rebuilt from hidden states",
    "video_llava": "image input only (lvlmlp reads images)",
    "fast_vlm": "FastViTHD tower (a timm model; the tiny checkpoint has one block per stage)",
    "perception_lm": "a thumbnail plus aspect-ratio tiles per image, joined across the batch in row order (its "
    "processor cannot stack images with different tile counts)",
    "gemma3n": "hidden states are each layer's active AltUp stream (the final norm reads a mix of all four); "
    "soft-capped logits, not rebuilt from hidden states; the audio tower is not used",
}

_OCR = "OCR-only: reads text out of documents, no question answering to probe"
_ENC_DEC = "encoder-decoder: the answer comes from a decoder reading an encoder, not checked"
_NEW = "not tried yet"
# model_type -> why it has no tiny checkpoint. Every image-text-to-text model type without one needs a row.
LEFT_OUT: dict[str, str] = {
    "apertus1p5": _NEW,
    "aria": "tried: its processor always crops images to 980 px, too large for a tiny checkpoint; not checked",
    "blip": "captioner / VQA classifier (BLIP-1): encoder-decoder text side, no chat generation",
    "cohere_compass": _NEW,
    "cosmos3_edge": _NEW,
    "cosmos3_omni": _NEW,
    "deepseek_ocr2": _OCR,
    "deepseek_vl_hybrid": f"{_NEW} (DeepSeek-VL 7B: DeepSeek-VL plus a high-resolution SAM tower)",
    "diffusion_gemma": "block-diffusion decoding: no left-to-right first token to probe",
    "dots3_note": _NEW,
    "emu3": f"{_NEW} (images as VQ tokens)",
    "ernie4_5_vl_moe": f"{_NEW} (mixture-of-experts text model)",
    "evolla": "protein-text model, not an image model",
    "exaone4_5": _NEW,
    "florence2": f"{_ENC_DEC}; task-prompted captioner / OCR",
    "fuyu": f"{_NEW} (its processor pads and tensorises by itself, returning torch lists)",
    "gemma4_unified": _NEW,
    "git": "captioner (GIT): no chat template or question answering to probe",
    "glm5_next": _NEW,
    "glm_ocr": _OCR,
    "glmga": _NEW,
    "got_ocr2": _OCR,
    "granite4_vision": _NEW,
    "granite_docling": f"{_OCR} (document conversion)",
    "hunyuan_vl": f"{_OCR} (HunyuanOCR)",
    "hy_v4_vl": _NEW,
    "hyperclovax_vision_v2": _NEW,
    "idefics": f"{_NEW} (IDEFICS 1: Flamingo-style gated cross-attention)",
    "inkling2": _NEW,
    "inkling2_loop": _NEW,
    "inkling_mm_model": _NEW,
    "instructblipvideo": "video-only",
    "kimi_k25": _NEW,
    "kosmos-2.5": _OCR,
    "lfm3_vl": _NEW,
    "lighton_ocr": _OCR,
    "llava_onevision1_5": _NEW,
    "minicpm_ocr": _OCR,
    "minicpmv4_6": _NEW,
    "minicpmv4_7": _NEW,
    "minimax_m3_vl": _NEW,
    "mistral4": _NEW,
    "mistral_large4": _NEW,
    "muse_glimmer": _NEW,
    "muse_spark": _NEW,
    "nemotron_h_omni": f"{_NEW} (omni model: audio, video and images)",
    "ovis2_5": _NEW,
    "paddleocr_vl": _OCR,
    "pi0": "robot-action model: predicts actions, not text",
    "pi05": "robot-action model: predicts actions, not text",
    "pix2struct": f"{_ENC_DEC}; screenshot parser / captioner",
    "pp_chart2table": f"{_OCR} (chart to table)",
    "pp_formulanet": f"{_OCR} (formula recognition); {_ENC_DEC}",
    "qianfan_ocr": _OCR,
    "qwen2_5_omni_thinker": f"{_NEW} (omni model: audio, video and images)",
    "qwen3_omni_moe_thinker": f"{_NEW} (omni model: audio, video and images)",
    "qwen4_exp": _NEW,
    "shieldgemma2": "image-safety classifier (Gemma 3 scoring policies through its own processor), not a "
    "question answerer",
    "step3p7": _NEW,
    "t5gemma2": _ENC_DEC,
    "udop": f"{_ENC_DEC}; document understanding",
    "unlimited_ocr": _OCR,
    "video_llama_3": f"{_NEW} (video-first; its image checkpoints take images)",
    "vision-encoder-decoder": f"{_ENC_DEC}; generic captioner / OCR wrapper",
}


def rows() -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    """(checked rows: family, model_type, hub ids, status, guided decoding, finetuning, notes), (left-out rows:
    model_type, why)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from lvlmlp.extraction.families import quirks_of
    from lvlmlp.testing import SPECS

    built = sorted({spec.model_type for spec in SPECS.values()}, key=list(NAMES).index)
    lora = {spec.model_type: spec.lora_targets for spec in SPECS.values()}
    checked = []
    for model_type in built:
        family, hub_ids = NAMES[model_type]
        refused = quirks_of(model_type).refused
        status = f"refused: {refused}" if refused else "exact"
        # tests/steering/test_guard.py and tests/study/test_finetune.py run every family the backend runs.
        guided = "no (refused)" if refused else "checked"
        finetuning = "no (refused)" if refused else "checked"
        if lora[model_type] and not refused:
            finetuning += f" with `--lora-targets {','.join(lora[model_type])}` (no `o_proj`)"
        needs = quirks_of(model_type).needs
        notes = [NOTES[model_type]] if model_type in NOTES else []
        notes += [f"needs {' and '.join(needs)}"] if needs else []
        vision_refused = quirks_of(model_type).vision_refused  # `extract --vision` (docs/signals.md)
        notes += [f"`--vision` refused: {vision_refused}"] if vision_refused else []
        checked.append((family, f"`{model_type}`", hub_ids, status, guided, finetuning, "; ".join(notes)))
    left = [(f"`{t}`", LEFT_OUT[t]) for t in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES) if t not in built]
    return checked, left


def render() -> str:
    """The table block of docs/models.md, markers included."""
    checked, left = rows()
    lines = [BEGIN, "", "| family | `model_type` | example hub ids | status | guided decoding | finetuning | notes |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in checked]
    lines += ["", f"Left out ({len(left)} of the {len(checked) + len(left)} `AutoModelForImageTextToText` model "
              "types: lvlmlp does not stop them, but nothing checks them):", "", "| `model_type` | why |", "|---|---|"]
    lines += [f"| {model_type} | {why} |" for model_type, why in left]
    return "\n".join([*lines, "", END])


def current(doc: str) -> str:
    """The table block now in `doc` ('' when it has none)."""
    if BEGIN not in doc or END not in doc:
        return ""
    return doc[doc.index(BEGIN) : doc.index(END) + len(END)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/models.md is not up to date")
    args = parser.parse_args(argv)
    doc = DOC.read_text()
    table = render()
    if args.check:
        if current(doc) != table:
            print(f"{DOC}: the models table is out of date; run python scripts/models_table.py", file=sys.stderr)
            return 1
        return 0
    if not current(doc):
        raise SystemExit(f"{DOC}: no table markers ({BEGIN!r} ... {END!r}) to write between")
    DOC.write_text(doc.replace(current(doc), table))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
