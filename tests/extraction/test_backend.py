"""Backend: for every family, a padded batch gives each row exactly what the model's own `generate` gives that row
alone (straight through the processor, no lvlmlp code in the reference path)."""

from __future__ import annotations

import gc
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
from lvlmlp.extraction import backend as backend_module
from lvlmlp.extraction.backend import Backend, quartile_layers
from lvlmlp.extraction.families import quirks_of
from lvlmlp.study.config import load_config
from lvlmlp.testing import FAMILIES, SPECS, tiny_manifest, tiny_remote_checkpoint

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
    # PNG rows reach the processor as uint8 (3, H, W) tensors of their pixels (extraction/png.py): the same batch.
    # Idefics2's processor takes PIL images only; Video-LLaVA's image processor is not a torchvision one.
    assert be.tensor_images == (family not in ("idefics2", "video_llava"))
    if be.tensor_images:
        pixels = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
        as_tensors = be.encode(pixels, QUESTIONS)
        assert as_tensors.keys() == batch.keys() and all(torch.equal(as_tensors[k], batch[k]) for k in batch)

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


def test_loading_holds_the_garbage_collector_off_and_leaves_it_as_it_was(tiny_ckpt, monkeypatch) -> None:
    """Its full passes over the heap that importing and loading build cost 0.3 s of the start-up."""
    states = []
    weights_hash = backend_module._weights_hash  # called by the constructor, which imports and loads the processor
    monkeypatch.setattr(backend_module, "_weights_hash", lambda path: states.append(gc.isenabled()) or weights_hash(path))
    load = AutoModelForImageTextToText.from_pretrained.__func__  # called by load_weights
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained",
                        classmethod(lambda cls, *a, **k: states.append(gc.isenabled()) or load(cls, *a, **k)))
    assert gc.isenabled()
    Backend(tiny_ckpt("llava"), device="cpu")
    assert states == [False, False] and gc.isenabled()
    light = Backend(tiny_ckpt("llava"), device="cpu", load_model=False)
    assert states == [False] * 3 and gc.isenabled()
    light.load_weights()  # on its own, later (extract: after its data-loader workers have started)
    assert states == [False] * 4 and gc.isenabled() and light.model is not None
    gc.disable()  # a caller that had switched it off finds it off
    try:
        Backend(tiny_ckpt("llava"), device="cpu")
        assert states == [False] * 6 and not gc.isenabled()
    finally:
        gc.enable()


def test_a_backend_without_its_weights_prepares_the_same_batches_and_loads_them_later(tiny_ckpt) -> None:
    full = Backend(tiny_ckpt("llava"), device="cpu")
    light = Backend(tiny_ckpt("llava"), device="cpu", load_model=False)
    assert light.model is None and light.vocab_size is None and light.max_length == full.max_length == 512
    images = _images()
    want = full.encode(images, QUESTIONS)
    got = light.encode(images, QUESTIONS)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    light.load_weights()
    assert (light.vocab_size, light.eos_ids, light.pad_id) == (full.vocab_size, full.eos_ids, full.pad_id)
    assert torch.equal(light.prefill(got)["logits"], full.prefill(want)["logits"])


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


# --trust-remote-code: a checkpoint whose model code ships with its weights (its config's `auto_map`) is refused with
# a one-line error naming the flag, and runs with it, recorded in the run's manifest, whether its code registers
# AutoModelForImageTextToText or only AutoModelForCausalLM. The checkpoints (`lvlmlp.testing.tiny_remote_checkpoint`):
# a tiny LLaVA's weights under a model class of its own, in a modeling file saved beside them.


@pytest.fixture(scope="module")
def remote(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny LLaVA, the same weights as a remote-code checkpoint registering AutoModelForImageTextToText)."""
    base = tiny_ckpt("llava")
    root = tmp_path_factory.mktemp("remote")
    return base, tiny_remote_checkpoint(base, root, "tiny_remote", "tiny_remote", "AutoModelForImageTextToText")


@pytest.fixture(scope="module")
def remote_lm(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the tiny LLaVA, the same weights under a model type whose own code registers AutoModelForCausalLM only, as
    Molmo's, Phi-4-multimodal's and mPLUG-Owl's ports do)."""
    base = tiny_ckpt("llava")
    root = tmp_path_factory.mktemp("remote_lm")
    return base, tiny_remote_checkpoint(base, root, "tiny_remote_lm", "tiny_remote_lm", "AutoModelForCausalLM")


def test_refused_without_the_flag_naming_it(remote, tmp_path, capsys) -> None:
    _, ckpt = remote
    message = (f"{ckpt}: the checkpoint ships its own model code; pass --trust-remote-code (a run config: "
               "trust_remote_code: true) to run it (that code then runs with your rights: read it first)")
    with pytest.raises(LvlmlpError) as err:
        Backend(ckpt, device="cpu")
    assert str(err.value) == message
    manifest = tiny_manifest(tmp_path / "data", n_train=2, n_test=0)
    capsys.readouterr()
    code = main(["extract", "--model", str(ckpt), "--data", str(manifest), "--out", str(tmp_path / "run"),
                 "--no-progress"])
    assert code == 2 and capsys.readouterr().err.strip() == f"lvlmlp: error: {message}"
    assert not (tmp_path / "run").exists()


def test_runs_with_the_flag_and_records_it(remote, tmp_path) -> None:
    """The remote class is LLaVA's: with the flag, extraction equals the tiny LLaVA's, and the manifest says so."""
    base, ckpt = remote
    manifest = tiny_manifest(tmp_path / "data", n_train=6, n_test=0)
    common = ["--data", str(manifest), "--batch-size", "3", "--device", "cpu", "--store-dtype", "float32",
              "--max-new-tokens", "2", "--no-progress"]
    assert main(["extract", "--model", str(ckpt), "--trust-remote-code", "--out", str(tmp_path / "remote"),
                 *common]) == 0
    assert main(["extract", "--model", str(base), "--out", str(tmp_path / "native"), *common]) == 0
    remote_run, native = open_run(tmp_path / "remote"), open_run(tmp_path / "native")
    assert remote_run.manifest["trust_remote_code"] is True and remote_run.manifest["family"] == "tiny_remote"
    assert "trust_remote_code" not in native.manifest  # other runs' manifests are as they were
    for t in range(2):
        np.testing.assert_allclose(remote_run.logits(t), native.logits(t), atol=1e-5, rtol=0)
    assert remote_run.responses == native.responses
    # The finished run is recognised again with the flag (the manifest's settings include it).
    assert main(["extract", "--model", str(ckpt), "--trust-remote-code", "--out", str(tmp_path / "remote"),
                 *common]) == 0


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModel"])
def test_own_code_registering_only_another_auto_class_loads_through_it(remote_lm, tiny_ckpt, tmp_path, capsys,
                                                                        auto_class) -> None:
    """A checkpoint whose code registers AutoModelForCausalLM (Molmo, Phi-4-multimodal) or AutoModel (MiniCPM-V)
    only, no AutoModelForImageTextToText: refused without the flag naming it; with it, loaded through the class
    auto_map names, extraction equal to the same weights under the built-in LLaVA class, the flag and the Auto class
    in the manifest."""
    if auto_class == "AutoModelForCausalLM":
        base, ckpt = remote_lm
    else:
        base = tiny_ckpt("llava")
        ckpt = tiny_remote_checkpoint(base, tmp_path / "own", "tiny_remote_lm", "tiny_remote_lm", auto_class)
    manifest = tiny_manifest(tmp_path / "data", n_train=6, n_test=0)
    common = ["--data", str(manifest), "--batch-size", "4", "--device", "cpu", "--store-dtype", "float32",
              "--max-new-tokens", "3", "--hidden", "--no-progress"]
    capsys.readouterr()
    assert main(["extract", "--model", str(ckpt), "--out", str(tmp_path / "refused"), *common]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lvlmlp: error: {ckpt}: the checkpoint ships its own model code; pass --trust-remote-code (a run config: "
        "trust_remote_code: true) to run it (that code then runs with your rights: read it first)")
    assert not (tmp_path / "refused").exists()
    backend = Backend(ckpt, device="cpu", dtype="float32", trust_remote_code=True)
    assert backend.auto_class == auto_class
    # transformers built the checkpoint's own class (from its file, through the Auto class), not LLaVA's
    assert type(backend.model).__name__ == "TinyRemoteLmForConditionalGeneration"
    assert type(backend.model).__module__.endswith("tiny_remote_lm")
    assert main(["extract", "--model", str(ckpt), "--trust-remote-code", "--out", str(tmp_path / "remote"),
                 *common]) == 0
    assert main(["extract", "--model", str(base), "--out", str(tmp_path / "native"), *common]) == 0
    remote_run, native = open_run(tmp_path / "remote"), open_run(tmp_path / "native")
    assert remote_run.manifest["trust_remote_code"] is True
    assert remote_run.manifest["auto_class"] == auto_class
    assert remote_run.manifest["family"] == "tiny_remote_lm" and native.manifest["family"] == "llava"
    assert "auto_class" not in native.manifest
    for t in range(3):
        np.testing.assert_allclose(remote_run.logits(t), native.logits(t), atol=1e-5, rtol=0)
    np.testing.assert_allclose(remote_run.hidden(), native.hidden(), atol=1e-5, rtol=0)
    assert remote_run.responses == native.responses and list(remote_run.n_tokens) == list(native.n_tokens)


def test_run_config_trust_remote_code(remote_lm, tmp_path, capsys) -> None:
    """`lvlmlp run`'s `trust_remote_code: true` loads the checkpoint as the flag does (its runs equal the built-in
    class's extraction, the manifest says so); without it the run stops naming the key, before any folder."""
    base, ckpt = remote_lm
    manifest = tiny_manifest(tmp_path / "data", n_train=6, n_test=4)
    config = tmp_path / "remote.yaml"
    config.write_text(json.dumps({"model": str(ckpt), "data_root": str(manifest), "device": "cpu", "dtype": "float32",
                                  "splits": {"train": "train", "test": "test"}, "n_boot": 0,
                                  "extract": {"store_dtype": "float32"}}))
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(tmp_path / "refused"), "--no-progress"]) == 2
    assert "pass --trust-remote-code (a run config: trust_remote_code: true)" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "runs").exists()
    assert main(["run", str(config), "--set", "trust_remote_code=true", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert main(["extract", "--model", str(base), "--data", str(manifest), "--split", "test", "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--out", str(tmp_path / "native"),
                 "--no-progress"]) == 0
    run, native = open_run(tmp_path / "out" / "runs" / "default-test"), open_run(tmp_path / "native")
    assert run.manifest["trust_remote_code"] is True and run.manifest["auto_class"] == "AutoModelForCausalLM"
    assert run.ids == native.ids
    np.testing.assert_allclose(run.logits(0), native.logits(0), atol=1e-5, rtol=0)


def test_own_code_without_a_loadable_model_class_is_refused(remote, tmp_path) -> None:
    import shutil

    _, ckpt = remote
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    config = json.loads((other / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": config["auto_map"]["AutoConfig"],
                          "AutoModelForSequenceClassification": "tiny_remote.TinyRemoteForConditionalGeneration"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(LvlmlpError) as err:
        Backend(other, device="cpu", trust_remote_code=True)
    assert str(err.value) == (f"{other}: its own code registers no model class lvlmlp can load (only AutoConfig, "
                              "AutoModelForSequenceClassification; lvlmlp loads AutoModelForImageTextToText, "
                              "AutoModelForCausalLM, AutoModel)")


# `--vision` (issue 30): the vision encoder's output that the projector reads, mean-pooled over the image's tokens,
# stored as vision.npy (N, D) and read by `open_run(...).vision()` / `--feature vision`; checked on every tiny family
# but Chameleon (refused in one line: no continuous vision output) and Kosmos-2 (refused as a family): LLaVA, LLaVA-NeXT,
# Qwen2-VL, Qwen2.5-VL, PaliGemma (1 and 2), Idefics3, SmolVLM, InstructBLIP, BLIP-2, Mllama, FastVLM, Gemma 3n and
# PerceptionLM against their vision towers called directly (Gemma 3n's tolerance scaled as its features are), the
# others against each image alone through the model (tolerance 1e-5: a batch of 3 against one image at a time,
# float32).

def _rows(tmp_path: Path, n: int = 3, first: tuple[int, int] | None = None) -> tuple[Path, list[dict]]:
    manifest = tiny_manifest(tmp_path / "data")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:n]
    # other image sizes in one batch: Qwen's patch grids and LLaVA-NeXT's crop counts then differ between rows
    sizes = [(64, 24), (40, 90)] if first is None else [first, (64, 24), (40, 90)]
    for row, size in zip(rows[1:] if first is None else rows, sizes):
        path = manifest.parent / row["image"]
        Image.open(path).convert("RGB").resize(size).save(path)
    data = manifest.parent / "some.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, rows


def _plain_vision(ckpt: Path, image: Image.Image) -> np.ndarray:
    """The projector's input computed with the model's public modules from the image processor's pixels alone,
    mean-pooled over the image's tokens."""
    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    pixels = AutoProcessor.from_pretrained(ckpt).image_processor(images=[image], return_tensors="pt")
    cfg = model.config
    with torch.inference_mode():
        if cfg.model_type in ("llava", "llava_next"):
            pv = pixels["pixel_values"]
            if pv.dim() == 5:  # LLaVA-NeXT: (1, crops, 3, H, W), the base image and its crops, one image
                pv = pv[0]
            out = model.model.vision_tower(pv, output_hidden_states=True)
            feats = out.hidden_states[cfg.vision_feature_layer]
            if cfg.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]  # the CLS token is not given to the projector
            return feats.reshape(-1, feats.shape[-1]).mean(dim=0).numpy()  # over every crop's patches
        if cfg.model_type in ("idefics3", "smolvlm"):  # the tiny processor's sub-images hold pixels everywhere
            pv = pixels["pixel_values"][0]
            return model.model.vision_model(pixel_values=pv).last_hidden_state.reshape(-1, cfg.vision_config
                                                                                        .hidden_size).mean(0).numpy()
        if cfg.model_type in ("instructblip", "blip-2"):  # every token the Q-Former cross-attends to, CLS included
            return model.vision_model(pixel_values=pixels["pixel_values"]).last_hidden_state[0].mean(dim=0).numpy()
        if cfg.model_type == "mllama":  # (1, 1, tiles, tokens, D), the layers side by side; the image's real tiles
            out = model.model.vision_model(pixel_values=pixels["pixel_values"],
                                           aspect_ratio_ids=pixels["aspect_ratio_ids"],
                                           aspect_ratio_mask=pixels["aspect_ratio_mask"])
            tiles = out.last_hidden_state[0, 0][pixels["aspect_ratio_mask"][0, 0].bool()]
            return tiles.reshape(-1, tiles.shape[-1]).mean(dim=0).numpy()
        if cfg.model_type == "fast_vlm":  # its hybrid tower's (1, D, h, w) state, every position a token
            return model.model.vision_tower(pixels["pixel_values"]).last_hidden_state[0].flatten(1).mean(dim=1).numpy()
        if cfg.model_type == "gemma3n":  # the same state, scaled by sqrt(D) as the model does before embed_vision
            state = model.model.vision_tower(pixel_values=pixels["pixel_values"], do_pooling=False).last_hidden_state
            return (state[0].flatten(1).mean(dim=1) * cfg.vision_config.hidden_size ** 0.5).numpy()
        if cfg.model_type == "perception_lm":  # (1, tiles, 3, H, W): every tile of the image, without the CLS token
            state = model.model.vision_tower(pixels["pixel_values"][0]).last_hidden_state
            state = state[:, 1:] if cfg.vision_use_cls_token else state
            return state.reshape(-1, state.shape[-1]).mean(dim=0).numpy()
        if cfg.model_type == "paligemma":
            return model.model.vision_tower(pixels["pixel_values"]).last_hidden_state[0].mean(dim=0).numpy()
        out = model.model.visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        return out.last_hidden_state.mean(dim=0).numpy()  # the blocks' output, before the patch merger


@pytest.mark.parametrize("family, new_tokens", [("llava", 0), ("llava", 2), ("qwen2_vl", 0), ("qwen2_5_vl", 2),
                                                ("paligemma", 0), ("paligemma2", 2), ("llava_next", 0),
                                                ("idefics3", 0), ("smolvlm", 2), ("instructblip", 2),
                                                ("blip-2", 0), ("mllama", 2), ("fast_vlm", 0), ("gemma3n", 2),
                                                ("perception_lm", 2)])
def test_vision_equals_plain_transformers(tiny_ckpt, tmp_path: Path, family: str, new_tokens: int) -> None:
    ckpt = tiny_ckpt(family)
    data, rows = _rows(tmp_path)
    out = tmp_path / "run"
    assert main(["extract", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--vision",
                 "--max-new-tokens", str(new_tokens), "--prompt-template", "{question}", "--no-progress"]) == 0
    run = open_run(out)
    assert run.manifest["vision"] is True
    assert run.vision().shape[0] == 3
    for i, row in enumerate(rows):
        image = Image.open(data.parent / row["image"]).convert("RGB")
        expected = _plain_vision(ckpt, image)
        assert run.vision().shape[1] == expected.shape[0]
        # Gemma 3n's tower is convolutional (timm MobileNetV5), whose float32 rounding differs by batch size in
        # proportion to its activations, and the model scales its output by sqrt(D) (45 here) before the projector:
        # its tolerance is 2e-5 of the largest feature (about 1e-3 on features up to 70), the others' 1e-5 absolute.
        atol = 2e-5 * float(np.abs(expected).max()) if family == "gemma3n" else 1e-5
        np.testing.assert_allclose(run.vision()[i], expected, atol=atol, rtol=0, err_msg=f"{family} row {i}")
    # the feature view and a probe on it
    assert main(["probe", "train", "--run", str(out), "--feature", "vision", "--out", str(tmp_path / "probe")]) == 0
    spec = json.loads((tmp_path / "probe" / "probe.json").read_text())["feature_spec"]
    assert (spec["kind"], spec["dim"]) == ("vision", expected.shape[0])


# The module whose input (or `:output`, or keyword) is the vision encoder's output that the projector reads, per
# family, written here from each model's code apart from the quirks; one image alone, all of it mean-pooled (but for
# LFM2-VL's patches outside whole blocks, which the model does not read).
PLAIN_MODULE = {
    "gemma3": "model.multi_modal_projector", "llava_onevision": "model.multi_modal_projector",
    "idefics2": "model.connector", "mistral3": "model.multi_modal_projector", "qwen3_vl": "model.visual.merger",
    "internvl": "model.multi_modal_projector", "aya_vision": "model.multi_modal_projector",
    "glm4v": "model.visual.post_layernorm:output",
    "vipllava": "model.multi_modal_projector", "llava_next_video": "model.multi_modal_projector",
    "lfm2_vl": "model.vision_tower:output", "cohere2_vision": "model.multi_modal_projector",
    "gemma4": "model.embed_vision", "video_llava": "model.multi_modal_projector", "janus": "model.aligner",
    "deepseek_vl": "model.aligner", "ovis2": "model.visual_embeddings_table",
    "molmo2": "model.multi_modal_projector", "llama4": "multi_modal_projector",
    "qwen3_5": "model.visual.merger", "qwen3_vl_moe": "model.visual.merger", "glm4v_moe":
    "model.visual.post_layernorm:output", "qwen3_5_moe": "model.visual.merger", "glm46v":
    "model.visual.post_layernorm:output",
}


def _plain_module_vision(ckpt: Path, family: str, image: Image.Image, question: str) -> np.ndarray:
    """One image alone through the model's own forward (the processor's inputs for that one row, no padding), the
    tensor `PLAIN_MODULE` names recorded by a hook of this test, mean-pooled over every token the model reads."""
    from lvlmlp.extraction.backend import Backend

    be = Backend(ckpt, device="cpu", dtype="float32", prompt_template="{question}")
    batch = be.encode([image], [question])
    path, _, part = PLAIN_MODULE[family].partition(":")
    seen: list[torch.Tensor] = []
    module = be.model.get_submodule(path)
    if part == "output":
        handle = module.register_forward_hook(lambda m, a, out: seen.append(getattr(out, "last_hidden_state", out)))
    else:
        handle = module.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw[part] if part else (a[0] if a else next(iter(kw.values())))),
            with_kwargs=True)
    with torch.inference_mode():
        be.model(**batch)
    handle.remove()
    # Ovis2 also embeds its image indicator token ids with the table: the soft tokens are the float inputs
    x = torch.cat([t for t in seen if t.is_floating_point()]).float()
    if family == "lfm2_vl":  # (tiles, patches, D) of (h, w) patch grids; the projector reads whole 2x2 blocks
        f = be.config.downsample_factor
        x = torch.cat([t[: h * w].reshape(h, w, -1)[: h // f * f, : w // f * f].reshape(-1, t.shape[-1])
                       for t, (h, w) in zip(x, batch["spatial_shapes"].tolist())])
    return x.reshape(-1, x.shape[-1]).mean(dim=0).numpy()


@pytest.mark.parametrize("family", sorted(PLAIN_MODULE))
def test_vision_of_every_family_equals_its_rows_alone(tiny_ckpt, tmp_path: Path, family: str) -> None:
    """A batch of 3 rows of other image sizes (other crop counts, patch grids, tiles) equals each image alone
    through the model, to 1e-5 absolute (float32); the families whose layout needs no generated token are checked
    on a prefill, the others (and every third family) with 2 generated tokens."""
    ckpt = tiny_ckpt(family)
    # Idefics2 pads a batch's pixels and encodes every patch holding a real pixel: a 32 px image (patch 7) is read as
    # 5 x 5 patches in a batch and 4 x 4 alone, by the model itself; a 28 px one is the same both ways.
    data, rows = _rows(tmp_path, first=(28, 28) if family == "idefics2" else None)
    out = tmp_path / "run"
    new_tokens = 2 if sorted(PLAIN_MODULE).index(family) % 3 == 0 else 0
    assert main(["extract", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--store-dtype", "float32", "--batch-size", "3", "--vision",
                 "--max-new-tokens", str(new_tokens), "--prompt-template", "{question}", "--no-progress"]) == 0
    vision = open_run(out).vision()
    assert vision.shape[0] == 3
    for i, row in enumerate(rows):
        image = Image.open(data.parent / row["image"]).convert("RGB")
        expected = _plain_module_vision(ckpt, family, image, row["question"])
        assert vision.shape[1] == expected.shape[0]
        np.testing.assert_allclose(vision[i], expected, atol=1e-5, rtol=0, err_msg=f"{family} row {i}")


def test_unsupported_family_is_refused(tiny_ckpt, tmp_path: Path, capsys) -> None:
    data, _ = _rows(tmp_path, 2)
    out = tmp_path / "run"
    ckpt = tiny_ckpt("chameleon")
    capsys.readouterr()  # building the checkpoint prints progress
    assert main(["extract", "--model", str(ckpt), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--vision", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lvlmlp: error: --vision: not available for model family 'chameleon': its images enter as discrete VQ "
        "tokens of the text vocabulary: no projector reads a continuous vision-encoder output")
    assert not (out / "manifest.json").exists()


def test_a_run_without_vision_has_none(tiny_ckpt, tmp_path: Path) -> None:
    data, _ = _rows(tmp_path, 2)
    out = tmp_path / "run"
    assert main(["extract", "--model", str(tiny_ckpt("llava")), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0
    run = open_run(out)
    assert "vision" not in run.manifest
    with pytest.raises(Exception, match="this run has no 'vision' array"):
        run.vision()


def test_subimage_pooling_skips_padding_images_and_empty_patches() -> None:
    """Idefics3/SmolVLM pooling on a hand-made batch: a padding (all-zero) sub-image is not a row's image, and a
    patch without pixels (pixel_attention_mask 0 over it) is not averaged; checked with plain loops."""
    from lvlmlp.extraction.backend import _pool_subimages

    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 2, 3, 4, 4, generator=gen) + 0.1
    pixels[1, 1] = 0.0  # row 1 has one real sub-image
    pam = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    pam[0, 1, :, 2:] = False  # row 0's second sub-image: its right half is padding (patches 1 and 3 of 2x2)
    captured = torch.randn(3, 4, 5, generator=gen)  # 3 real sub-images, 2x2 patches of 2 px, D = 5
    got = _pool_subimages(captured, {"pixel_values": pixels, "pixel_attention_mask": pam}, 2)
    row0 = [captured[0, p] for p in range(4)] + [captured[1, p] for p in (0, 2)]
    row1 = [captured[2, p] for p in range(4)]
    expected = torch.stack([sum(row0) / len(row0), sum(row1) / len(row1)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_quirks_naming_a_missing_module_or_a_wrong_layout_are_refused(tiny_ckpt, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The vision hook is data (`Quirks.vision_input` / `vision_layout`): a row that names a module the model lacks
    is refused before any row is read, and a layout that does not fit the captured tensor stops the batch in one
    line rather than pool the wrong rows (LLaVA-NeXT's crops read as one image per row)."""
    import dataclasses

    from lvlmlp.errors import LvlmlpError
    from lvlmlp.extraction import families
    from lvlmlp.extraction.backend import Backend

    data, rows = _rows(tmp_path)
    images = [Image.open(data.parent / r["image"]).convert("RGB") for r in rows]
    monkeypatch.setitem(families.QUIRKS, "llava", dataclasses.replace(families.QUIRKS.get("llava", families.Quirks()),
                                                                      vision_input="model.no_projector"))
    be = Backend(tiny_ckpt("llava"), device="cpu", dtype="float32")
    with pytest.raises(LvlmlpError) as err:
        be.check_vision()
    assert str(err.value) == ("--vision: the llava model has no module 'model.no_projector' (its quirks' "
                              "vision_input); the vision output cannot be taken")
    monkeypatch.setitem(families.QUIRKS, "llava_next", dataclasses.replace(families.QUIRKS["llava_next"],
                                                                           vision_layout="batched"))
    be = Backend(tiny_ckpt("llava_next"), device="cpu", dtype="float32")
    batch = be.encode(images, [r["question"] for r in rows])
    with pytest.raises(LvlmlpError) as err:
        be.prefill(batch, vision=True)
    crops = int((batch["pixel_values"].flatten(2).abs().sum(-1) > 0).sum())  # the real ones; padding crops are 0
    assert crops > 3 and str(err.value) == (f"--vision: the captured vision output holds {crops} images for a batch "
                                            "of 3 rows; the family's vision layout does not fit this model")


def test_every_tiny_family_is_checked_or_refused() -> None:
    """A family added to `lvlmlp.testing.SPECS` gets its --vision check here (a `PLAIN_MODULE` entry) or a refusal
    (`Quirks.vision_refused`, or the family refused as a whole)."""
    from lvlmlp.extraction.families import quirks_of
    from lvlmlp.testing import SPECS

    direct = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma", "idefics3", "smolvlm", "instructblip",
              "blip-2", "mllama", "fast_vlm", "gemma3n", "perception_lm"}  # the first test
    types = {spec.model_type for spec in SPECS.values()}
    refused = {t for t in types if quirks_of(t).vision_refused or quirks_of(t).refused}
    assert refused == {"chameleon", "kosmos-2"}
    assert types - refused == direct | set(PLAIN_MODULE)
    assert not (direct & set(PLAIN_MODULE)) and not (refused & set(PLAIN_MODULE))
