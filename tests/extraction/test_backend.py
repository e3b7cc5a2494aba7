"""Backend: for every family, a padded batch gives each row exactly what the model's own `generate` gives that row
alone (straight through the processor, no lvlmlp code in the reference path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend, quartile_layers
from lvlmlp.extraction.families import quirks_of
from lvlmlp.study.config import load_config
from lvlmlp.testing import FAMILIES, SPECS, tiny_manifest

# Families the backend runs (and must run exactly), and families it refuses with a reason (docs/models.md).
EXACT = [f for f in FAMILIES if not quirks_of(SPECS[f].model_type).refused]
REFUSED = [f for f in FAMILIES if quirks_of(SPECS[f].model_type).refused]

TOL = 1e-4
# Different image shapes (so LLaVA-NeXT, Qwen and Idefics3/SmolVLM rows get different numbers of image tokens) and
# question lengths (so every row is padded differently).
SIZES = [(40, 30), (20, 60), (64, 64), (33, 17)]
QUESTIONS = [
    "is there a cat ?",
    "what color is the car in this picture ?",
    "yes",
    "how many people are there on the beach today ?",
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _reference_prompt(processor, question: str, placeholder: str | None = None) -> str:
    """The contract's default prompt, written out independently of the backend."""
    if not getattr(processor, "chat_template", None):
        # The question as it is (InstructBLIP, PaliGemma), after the image placeholder the family's quirks name
        # where its processor needs one in the text (Chameleon).
        return (placeholder or "") + question
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)


def _single(be: Backend, image: Image.Image, question: str, k: int):
    """One sample alone: the processor, then the model's own greedy `generate` with raw logits."""
    inputs = be.processor(
        images=[[image]], text=[_reference_prompt(be.processor, question, be.quirks.image_placeholder)],
        return_tensors="pt"
    ).to(be.model.dtype)  # floating inputs in the model's dtype, as model cards do (Llama 4's pixels are bfloat16)
    inputs.pop("labels", None)
    return be.model.generate(
        **inputs,
        max_new_tokens=k,
        do_sample=False,
        output_logits=True,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("family", EXACT)
def test_batch_equals_single_runs(tiny_ckpt, family: str) -> None:
    be = Backend(tiny_ckpt(family), device="cpu")
    images = _images()
    batch = be.encode(images, QUESTIONS)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every row ends at the last column

    layers = [0, 1, -1]
    pre = be.prefill(batch, hidden=True, layers=layers)
    gen = be.generate(batch, max_new_tokens=3, hidden=True, layers=layers)
    hidden_size = be.model.config.get_text_config().hidden_size
    assert pre["logits"].shape == (4, be.vocab_size) and pre["logits"].dtype == torch.float32
    assert pre["hidden"].shape == (4, hidden_size)
    assert pre["layers"].shape == (4, len(layers), hidden_size)
    assert gen["logits"].shape == (4, 3, be.vocab_size) and gen["sequences"].shape == (4, 3)
    assert (gen["hidden"] - pre["hidden"]).abs().max() < TOL and (
        gen["layers"] - pre["layers"]
    ).abs().max() < TOL

    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        ref = _single(be, image, question, 3)
        ref_logits = torch.stack(ref.logits, dim=1)[0]
        n = ref_logits.shape[0]
        new_ids = ref.sequences[0, -n:]
        assert (pre["logits"][i] - ref_logits[0]).abs().max() < TOL, f"{family} row {i}: prefill logits"
        assert int(gen["n_tokens"][i]) == n
        assert (gen["logits"][i, :n] - ref_logits).abs().max() < TOL, f"{family} row {i}: generate logits"
        assert gen["sequences"][i, :n].tolist() == new_ids.tolist()
        assert gen["responses"][i] == be.tokenizer.decode(new_ids, skip_special_tokens=True).strip()
        # output_hidden_states of the single run, at its last prompt position (first step of generate)
        states = ref.hidden_states[0]
        if states[0].dim() == 4:  # Gemma 3n: each layer's AltUp streams, stacked; its active stream is the first
            assert be.model.config.get_text_config().altup_active_idx == 0
            states = [s[0] for s in states]
        for j, layer in enumerate(layers):
            assert (pre["layers"][i, j] - states[layer][0, -1]).abs().max() < TOL, (
                f"{family} row {i} layer {layer}"
            )

    if be.head_is_linear():
        assert (be.logits_from_hidden(pre["hidden"]) - pre["logits"]).abs().max() < TOL
    else:
        # Gemma 2's and Gemma 3n's logit soft-capping; Chameleon's image tokens forced to the lowest logit
        assert getattr(be.model.config.get_text_config(), "final_logit_softcapping", None) or not be.quirks.linear_head
        with pytest.raises(LvlmlpError, match="not linear"):
            be.logits_from_hidden(pre["hidden"])


@pytest.mark.parametrize("family", EXACT)
def test_the_image_reaches_the_text(tiny_ckpt, family: str) -> None:
    """Two images of one size under one question give different first-token logits: the tiny checkpoint really
    reads its image (a gate initialised closed, as Mllama's cross-attention gates are, would hide it)."""
    be = Backend(tiny_ckpt(family), device="cpu")
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(2)]
    logits = be.prefill(be.encode(images, [QUESTIONS[0]] * 2))["logits"]
    assert (logits[0] - logits[1]).abs().max() > 1e-3


def test_llama4_padded_batches_stop_where_its_attention_temperature_counts_padding(tiny_ckpt, tmp_path) -> None:
    """Llama 4's global layers scale queries by a temperature that grows from position `floor_scale - 1` on, counted
    over the padded sequence: a padded row there differs from its single run (shown without lvlmlp, on the tiny
    checkpoint with floor_scale 8), so the backend stops such batches instead of running them."""
    import json
    import shutil

    from transformers import AutoModelForImageTextToText

    path = tmp_path / "llama4"
    shutil.copytree(tiny_ckpt("llama4"), path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["floor_scale"] = 8
    (path / "config.json").write_text(json.dumps(config))
    be = Backend(path, device="cpu")
    images, questions = _images()[:2], QUESTIONS[:2]
    batch = be.encode(images, questions)
    padded = batch["attention_mask"][0] == 0
    assert padded.any() and batch["input_ids"].shape[1] > 8
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    with torch.no_grad():
        pos = be.generation_position_ids(batch)
        batched = model(**batch, position_ids=pos).logits[0, -1]
        single = model(**be.encode(images[:1], questions[:1])).logits[0, -1]
    assert (batched - single).abs().max() > 1e-3  # the padded row is off
    want = (f"{path}: a padded llama4 batch reaches position {batch['input_ids'].shape[1] - 1}, from 7 on padded rows "
            "differ from single runs (floor_scale, see docs/models.md); use --batch-size 1")
    with pytest.raises(LvlmlpError) as err:
        be.prefill(batch)
    assert str(err.value) == want
    with pytest.raises(LvlmlpError):
        be.generate(batch, max_new_tokens=2)
    alone = be.prefill(be.encode(images[:1], questions[:1]))["logits"][0]  # no padding: runs, as the model does
    assert (alone - single).abs().max() < TOL


@pytest.mark.parametrize("family", REFUSED)
def test_refused_families_differ_as_their_reason_says(tiny_ckpt, family: str) -> None:
    """A refusal is not a guess: the family's own processor and `generate`, without lvlmlp, give a left-padded row
    other tokens than that row alone (Kosmos-2: the first step agrees, the later ones do not)."""
    from transformers import AutoModelForImageTextToText

    path = tiny_ckpt(family)
    reason = quirks_of(SPECS[family].model_type).refused
    with pytest.raises(LvlmlpError) as err:
        Backend(path, device="cpu")
    assert str(err.value) == f"{path}: {SPECS[family].model_type} models are refused: {reason} (see docs/models.md)"

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    images = _images()
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    batch = processor(images=images, text=QUESTIONS, padding=True, return_tensors="pt")
    batched = torch.stack(model.generate(**batch, **kwargs).logits, dim=1)
    gaps = []
    for i, (image, question) in enumerate(zip(images, QUESTIONS)):
        single = torch.stack(model.generate(**processor(images=image, text=question, return_tensors="pt"),
                                            **kwargs).logits, dim=1)[0]
        assert (batched[i, 0] - single[0]).abs().max() < TOL  # the first token agrees
        gaps.append(float((batched[i, 1:] - single[1:]).abs().max()))
    padded = batch["attention_mask"].sum(1) < batch["attention_mask"].shape[1]
    assert all(gap > 1e-2 for gap, pad in zip(gaps, padded) if pad), gaps  # the later ones do not, where padded
    assert all(gap < TOL for gap, pad in zip(gaps, padded) if not pad), gaps


def test_bfloat16_pixels_go_through_extract_workers_exactly(tiny_ckpt, tmp_path: Path) -> None:
    """Llama 4's processor makes bfloat16 pixels, which NumPy cannot hold: `extract`, whose worker processes hand
    batches over as NumPy arrays, still gives each row what the model's own generate gives it alone."""
    import json

    from lvlmlp import open_run
    from lvlmlp.cli import main

    path = tiny_ckpt("llama4")
    be = Backend(path, device="cpu")
    assert be.quirks.torch_outputs and be.processor(images=_images()[:1], text=[be.prompt("yes")],
                                                    return_tensors="pt")["pixel_values"].dtype == torch.bfloat16
    rows = []
    for i, image in enumerate(_images()):
        image.save(tmp_path / f"{i}.png")
        rows.append({"id": f"r{i}", "image": str(tmp_path / f"{i}.png"), "question": QUESTIONS[i]})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["extract", "--model", str(path), "--data", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "run"),
            "--batch-size", "4", "--workers", "1", "--device", "cpu", "--store-dtype", "float32", "--no-progress"]
    assert main(argv) == 0
    run = open_run(tmp_path / "run")
    for i, image in enumerate(_images()):
        ref = torch.stack(_single(be, image, QUESTIONS[i], 1).logits, dim=1)[0, 0]
        assert np.abs(run.logits(0)[i] - ref.numpy()).max() < TOL, i


def test_generate_pads_rows_that_stop_early(tiny_ckpt) -> None:
    be = Backend(tiny_ckpt("llava"), device="cpu")
    batch = be.encode(_images(), QUESTIONS)
    free = be.generate(batch, max_new_tokens=4)
    # Declare row 0's second token the end of sequence: row 0 stops after it, the others go on unchanged.
    eos = int(free["sequences"][0, 1])
    stopped = be.generate(batch, max_new_tokens=4, eos_token_id=eos)
    for i in range(4):
        row = free["sequences"][i].tolist()
        n = row.index(eos) + 1 if eos in row else 4
        assert int(stopped["n_tokens"][i]) == n
        assert stopped["sequences"][i, :n].tolist() == row[:n]
        assert (stopped["logits"][i, :n] - free["logits"][i, :n]).abs().max() < TOL
        assert (stopped["logits"][i, n:] == 0).all()
        assert (stopped["sequences"][i, n:] == be.tokenizer.pad_token_id).all()
    assert int(stopped["n_tokens"][0]) <= 2


def test_prompt_template_and_raw_prompt(tiny_ckpt) -> None:
    path = tiny_ckpt("llava")
    templated = Backend(path, device="cpu", prompt_template="Q: {question} A:")
    assert templated.prompt("is it red ?") == "USER: <image>\nQ: is it red ? A: ASSISTANT:"
    raw = Backend(path, device="cpu", prompt_template="Q: {question} A:", raw_prompt=True)
    assert raw.prompt("is it red ?") == "<image>Q: is it red ? A:"  # the image placeholder is still needed
    assert Backend(path, device="cpu", raw_prompt=True).prompt("<image> first") == "<image> first"
    with pytest.raises(LvlmlpError, match="prompt-template"):
        Backend(path, device="cpu", prompt_template="no placeholder")


def test_prompt_without_chat_template(tiny_ckpt) -> None:
    assert Backend(tiny_ckpt("instructblip"), device="cpu").prompt("is it red ?") == "is it red ?"
    # PaliGemma's processor would add the image token itself (with a warning); the backend gives it.
    assert Backend(tiny_ckpt("paligemma"), device="cpu").prompt("is it red ?") == "<image>is it red ?"


def test_metadata_and_dtype(tiny_ckpt) -> None:
    path = tiny_ckpt("llava")
    be = Backend(path, device="cpu", dtype="bfloat16")
    assert be.family == "llava" and be.model_id == str(path) and be.revision is None
    assert be.dtype == torch.bfloat16 and be.device == torch.device("cpu")
    assert be.weights_hash == Backend(path, device="cpu").weights_hash and len(be.weights_hash) == 64
    batch = be.encode(_images()[:2], QUESTIONS[:2])
    assert batch["pixel_values"].dtype == torch.bfloat16
    assert be.prefill(batch)["logits"].dtype == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(LvlmlpError, match="CUDA is not available"):
            Backend(path, device="cuda")
    with pytest.raises(LvlmlpError, match="--dtype"):
        Backend(path, device="cpu", dtype="float64")
    with pytest.raises(LvlmlpError, match="2 images for 1 questions"):
        be.encode(_images()[:2], QUESTIONS[:1])
    with pytest.raises(LvlmlpError, match="layer 5 out of range"):
        be.prefill(batch, layers=[5])


def test_loading_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(LvlmlpError, match="no such model folder") as err:
        Backend(missing)
    assert str(missing) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LvlmlpError, match="no config.json") as err:
        Backend(empty)
    assert str(empty) in str(err.value)

    # A real text-only checkpoint.
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = tmp_path / "llama"
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(text_only)
    with pytest.raises(LvlmlpError, match="'llama' is not a vision-language") as err:
        Backend(text_only)
    assert str(text_only) in str(err.value)

    with pytest.raises(LvlmlpError, match="no-such-org/no-such-model"):
        Backend("no-such-org/no-such-model")  # offline in tests, and not in the cache


def test_quirk_rows_name_real_image_text_to_text_model_types():
    # A misspelt model_type in the quirks table would silently give that family the defaults.
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from lvlmlp.extraction.families import QUIRKS, Quirks, quirks_of

    assert sorted(set(QUIRKS) - set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)) == []
    assert quirks_of("llava") == Quirks() and quirks_of("paligemma").drop_outputs == ("labels",)


# `layers: quartiles` (issue 30): HALP's layer set {0, L/4, L/2, 3L/4, L}, resolved per family from the model's own
# layer count (extract `--layers quartiles`, the config key `extract.layers: quartiles`).

def _expected(n_layers: int) -> list[int]:
    # written out independently: the k-th quarter of L, floored, for k = 0..4, each index once
    out: list[int] = []
    for k in range(5):
        index = int(np.floor(k * n_layers / 4))
        if index not in out:
            out.append(index)
    return out


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4, 7, 8, 28, 32, 40, 80])
def test_quartile_layers_formula(n_layers: int) -> None:
    assert quartile_layers(n_layers) == _expected(n_layers)


def test_quartile_layers_of_the_usual_sizes() -> None:
    assert quartile_layers(32) == [0, 8, 16, 24, 32]  # LLaVA-1.5-7B (Vicuna-7B)
    assert quartile_layers(28) == [0, 7, 14, 21, 28]  # Qwen2.5-VL-7B
    assert quartile_layers(2) == [0, 1, 2]  # the tiny checkpoints


def _deeper(ckpt: Path, out: Path, n_layers: int) -> Path:
    """A copy of a tiny checkpoint with `n_layers` decoder layers (the new layers initialised, then saved)."""
    shutil.copytree(ckpt, out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config"]["num_hidden_layers"] = n_layers
    cfg["text_config"].pop("layer_types", None)  # one entry per layer; rebuilt by the config class
    cfg_path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(out)
    model.save_pretrained(out)
    return out


def _config_layers(ckpt: Path) -> int:
    return int(json.loads((ckpt / "config.json").read_text())["text_config"]["num_hidden_layers"])


def test_quartile_layers_resolved_per_family_from_the_config(tiny_ckpt, tmp_path: Path) -> None:
    """Two tiny families of different depths: each gets its own indices, read without loading the weights."""
    llava = tiny_ckpt("llava")
    qwen = _deeper(tiny_ckpt("qwen2_5_vl"), tmp_path / "qwen8", 8)
    assert _config_layers(llava) == 2 and _config_layers(qwen) == 8
    assert Backend(llava, load_model=False).resolve_layers("quartiles") == [0, 1, 2]
    assert Backend(qwen, load_model=False).resolve_layers("quartiles") == [0, 2, 4, 6, 8]
    with pytest.raises(LvlmlpError, match=r"^--layers: unknown layer set 'halves'; give integers such as 8,16,-1 "
                                          r"or quartiles$"):
        Backend(llava, load_model=False).resolve_layers("halves")


def test_extract_layers_quartiles_equals_plain_transformers(tiny_ckpt, tmp_path: Path) -> None:
    """`extract --layers quartiles` on an 8-layer Qwen2.5-VL stores layers [0, 2, 4, 6, 8]: the hidden states at the
    last prompt position of a plain transformers forward, row by row (tolerance 1e-4: batch of 3 vs one row)."""
    qwen = _deeper(tiny_ckpt("qwen2_5_vl"), tmp_path / "qwen8", 8)
    manifest = tiny_manifest(tmp_path / "data")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:3]
    data = manifest.parent / "three.jsonl"  # image paths are relative to the manifest
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["extract", "--model", str(qwen), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--layers", "quartiles",
                 "--no-progress"]) == 0
    run = open_run(out)
    assert run.manifest["layers"] == [0, 2, 4, 6, 8]
    backend = Backend(qwen, device="cpu", dtype="float32")
    for i, row in enumerate(rows):
        from PIL import Image

        batch = backend.encode([Image.open(manifest.parent / row["image"]).convert("RGB")], [row["question"]])
        with torch.inference_mode():
            states = backend.model(**batch, output_hidden_states=True, return_dict=True).hidden_states
        for layer in (0, 2, 4, 6):  # 8: the last state, after the final norm (as `hidden`)
            np.testing.assert_allclose(run.layer(layer)[i], states[layer][0, -1].numpy(), atol=1e-4, rtol=0)
    # a re-run with the same spelling is recognised as finished (resolved from the config, no weights loaded)
    assert main(["extract", "--model", str(qwen), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--layers", "quartiles",
                 "--no-progress"]) == 0


def test_quartile_layers_config_key(tmp_path: Path) -> None:
    base = {"model": "m", "data_root": "d.jsonl", "out": "o", "task": "jsonl"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, "extract": {"layers": "quartiles"}}))
    assert load_config(path).extract.layers == "quartiles"
    path.write_text(yaml.safe_dump({**base, "extract": {"layers": "halves"}}))
    with pytest.raises(LvlmlpError, match=r"^config: extract.layers: expected one of quartiles, got 'halves'$"):
        load_config(path)
    path.write_text(yaml.safe_dump({**base, "extract": {"layers": 5}}))
    with pytest.raises(LvlmlpError, match=r"^config: extract.layers: expected a list of integers or one of "
                                          r"quartiles, got 5$"):
        load_config(path)


def test_cli_refuses_an_unknown_layer_set(tmp_path: Path, capsys) -> None:
    manifest = tiny_manifest(tmp_path / "data")
    assert main(["extract", "--model", str(tmp_path / "no-model"), "--data", str(manifest), "--out",
                 str(tmp_path / "o"), "--layers", "8,x"]) == 2
    assert "--layers: expected comma-separated integers such as 8,16,-1 or quartiles, got '8,x'" in \
        capsys.readouterr().err
