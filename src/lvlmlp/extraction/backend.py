"""The model backend: load any `AutoModelForImageTextToText` checkpoint and run it on (image, question) batches.

Everything family-specific lives here, so the rest of lvlmlp sees one interface:

* `prompt(question)` renders the default prompt (chat template of one user turn: image, then text;
  preceded by a system turn when `system_prompt` is given);
* `encode(images, questions)` builds one left-padded batch that gives every row the same result as running it
  alone (left padding; position ids counted over real tokens, as `generate` does; InstructBLIP's Q-Former text
  right-padded);
* `prefill(batch)` is a single forward pass returning the raw logits of the first generated token, and optionally the
  hidden state(s) at that position;
* `generate(batch, max_new_tokens=K)` is greedy decoding returning the raw logits of each generated token.

Batched results equal single-row results to float rounding (the tests check < 1e-4 in float32 for every family).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import hashlib
import importlib.util
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.families import CHECKED, quirks_of

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise LvlmlpError(f"--device: unknown device {device!r} ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LvlmlpError(f"--device: {device!r} asked for, but CUDA is not available here")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bfloat16 halves memory on GPUs at no accuracy cost for probing; CPUs are slow in it, so float32 there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise LvlmlpError(f"--dtype: unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


# The Auto classes a checkpoint's own code may register its model under (its config's auto_map), in the order
# tried: only the first is the usual one; the others are how Molmo, Phi-4-multimodal, MiniCPM-V and mPLUG-Owl's
# ports register theirs (docs/models.md).
REMOTE_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoModel")

_REMOTE_ADVICE = ("pass --trust-remote-code (a run config: trust_remote_code: true) to run it (that code then runs "
                  "with your rights: read it first)")


LAYER_SHORTHANDS = ("quartiles",)


def num_layers_of(config: Any) -> int:
    """The language model's decoder layer count from a checkpoint's config."""
    return int(config.get_text_config().num_hidden_layers)


def quartile_layers(num_layers: int) -> list[int]:
    """HALP's layers {0, L/4, L/2, 3L/4, L} as indices into `output_hidden_states` (0 = embeddings, L = the last
    decoder layer's output after the final norm), rounded down, duplicates (L < 4) removed: L=32 -> [0, 8, 16, 24, 32],
    L=28 -> [0, 7, 14, 21, 28], L=2 -> [0, 1, 2]."""
    return sorted({0, num_layers // 4, num_layers // 2, (3 * num_layers) // 4, num_layers})


def resolve_layer_spec(spec: str, num_layers: int) -> list[int]:
    """A named layer set (`LAYER_SHORTHANDS`) for a model of `num_layers` decoder layers."""
    if spec == "quartiles":
        return quartile_layers(num_layers)
    raise LvlmlpError(f"--layers: unknown layer set {spec!r}; give integers such as 8,16,-1 or "
                      f"{' / '.join(LAYER_SHORTHANDS)}")


# `--vision`: how the vision encoder's output that the projector reads splits into the batch's images (one per row),
# by the `vision_layout` of the family's quirks (`families.Quirks`). Each takes the tensors the capture recorded
# (one per call of the module; most models call it once per batch) and returns (B, D) float32 means.
VISION_LAYOUTS = ("batched", "crops", "subimages", "grid", "image_tokens", "num_crops", "tiles", "blocks")


def _pool_vision(calls: list[torch.Tensor], layout: str, batch: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
    """(B, D): the captured projector input mean-pooled over each image's tokens (one image per row)."""
    rows = int(batch["input_ids"].shape[0])
    captured = calls[0]
    if layout == "batched":  # (B, ..., D)
        _check_units(captured.shape[0], rows, "images")
        return captured.float().reshape(rows, -1, captured.shape[-1]).mean(dim=1)
    if layout == "crops":  # LLaVA-NeXT: each image's crop count, as the model computes it from the image size
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                           patch_size=config.vision_config.image_size)
                 for size in batch["image_sizes"]]
        return _split_mean(captured, crops)
    if layout == "subimages":
        return _pool_subimages(captured, batch, int(config.vision_config.patch_size))
    if layout == "grid":  # (patches of every image, D): each image's t*h*w patches, in batch order
        return _split_mean(captured, batch["image_grid_thw"].prod(dim=-1).tolist())
    if layout == "image_tokens":  # crops or patches of every image, as many per image as its image tokens say
        every = torch.cat(calls)  # a model that encodes image by image calls the module once per image
        return _split_mean(every, _image_token_shares(every.shape[0], batch, config))
    if layout == "num_crops":  # Molmo2: the processor's crop count of each image
        return _split_mean(captured, batch["image_num_crops"].tolist())
    if layout == "tiles":  # Mllama: (B, images, tiles, tokens, D); only the image's real tiles (aspect_ratio_mask)
        _check_units(captured.shape[0], rows, "images")
        weights = batch["aspect_ratio_mask"].to(captured.device).float()[..., None, None]  # (B, images, tiles, 1, 1)
        tokens = captured.shape[3]
        return (captured.float() * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * tokens)
    if layout == "blocks":
        return _pool_blocks(captured, batch, config)
    raise LvlmlpError(f"--vision: unknown vision layout {layout!r} (one of {', '.join(VISION_LAYOUTS)})")


def _check_units(got: int, expected: int, what: str) -> None:
    if got != expected:
        raise LvlmlpError(f"--vision: the captured vision output holds {got} {what} for a batch of {expected} rows; "
                          "the family's vision layout does not fit this model")


def _split_mean(captured: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(len(sizes), D): the mean over each consecutive block of `sizes[i]` leading entries and every token in it."""
    _check_units(captured.shape[0], int(sum(sizes)), "crops or patches")
    return torch.stack([part.float().reshape(-1, captured.shape[-1]).mean(dim=0)
                        for part in torch.split(captured, [int(n) for n in sizes], dim=0)])


def _image_token_shares(units: int, batch: dict[str, torch.Tensor], config: Any) -> list[int]:
    """How many of `units` leading entries (crops or patches, all images in batch order) belong to each row: in
    proportion to its image tokens, which the model fills from them in order (a constant number per entry)."""
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise LvlmlpError("--vision: the model's config names no image token (image_token_id), by which the "
                          "family's vision layout splits the images")
    counts = (batch["input_ids"] == int(token)).sum(dim=1).tolist()
    total = int(sum(counts))
    if total == 0 or any(c * units % total for c in counts):
        raise LvlmlpError(f"--vision: {units} vision entries do not split over the rows' image tokens {counts}")
    return [c * units // total for c in counts]


def _pool_blocks(captured: torch.Tensor, batch: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
    """LFM2-VL: (tiles, patches, D) the vision tower's state of each tile's (h, w) patch grid, padded; the projector
    reads the patches of whole `factor` x `factor` blocks (rows and columns beyond the last whole block are not), one
    image token per block. A row's tiles (an image is split into tiles and a thumbnail when large) are the next ones
    whose blocks add up to its image tokens."""
    factor = int(config.downsample_factor)
    shapes = batch["spatial_shapes"].tolist()
    _check_units(captured.shape[0], len(shapes), "tiles")
    sums, blocks = [], []
    for state, (h, w) in zip(captured, shapes):
        grid = state[: h * w].reshape(h, w, -1)[: h // factor * factor, : w // factor * factor]
        sums.append(grid.float().reshape(-1, state.shape[-1]).sum(dim=0))
        blocks.append((h // factor) * (w // factor))
    out, tile = [], 0
    for tokens in (batch["input_ids"] == int(config.image_token_id)).sum(dim=1).tolist():
        first, read = tile, 0
        while read < tokens and tile < len(blocks):
            read, tile = read + blocks[tile], tile + 1
        if read != tokens:
            raise LvlmlpError(f"--vision: the tiles' blocks do not add up to a row's {tokens} image tokens")
        out.append(torch.stack(sums[first:tile]).sum(dim=0) / (read * factor * factor))
    return torch.stack(out)


def _pool_subimages(captured: torch.Tensor, batch: dict[str, torch.Tensor], patch: int) -> torch.Tensor:
    """Idefics3 / SmolVLM: each row's real sub-images (all-zero padding images are skipped, as the model does), the
    mean over their patches that hold pixels (the model's patch attention mask from `pixel_attention_mask`)."""
    pixels = batch["pixel_values"]
    rows, per_row = pixels.shape[:2]
    flat = pixels.reshape(rows * per_row, *pixels.shape[2:])
    real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat[0].numel()
    counts = real.view(rows, per_row).sum(dim=1).tolist()
    pam = batch.get("pixel_attention_mask")
    if pam is None:
        mask = torch.ones(int(real.sum()), *flat.shape[2:], dtype=torch.bool, device=flat.device)
    else:
        mask = pam.reshape(rows * per_row, *pam.shape[2:])[real]
    sub = mask.unfold(1, patch, patch).unfold(2, patch, patch)
    weights = (sub.sum(dim=(-1, -2)) > 0).reshape(mask.shape[0], -1).float()  # (real images, patches)
    sums = (captured.float() * weights[..., None]).sum(dim=1)
    out = []
    for part, w in zip(torch.split(sums, counts), torch.split(weights.sum(dim=1), counts)):
        out.append(part.sum(dim=0) / w.sum())
    return torch.stack(out)


def load_model_config(model_id: str, trust_remote_code: bool = False) -> Any:
    """The checkpoint's config, or an LvlmlpError saying why `model_id` is not a loadable checkpoint."""
    from transformers import AutoConfig

    path = Path(model_id)
    if path.exists() and not (path / "config.json").is_file():
        raise LvlmlpError(f"{model_id}: no config.json there, not a transformers checkpoint folder")
    looks_local = path.is_absolute() or model_id.startswith((".", "~")) or model_id.count("/") > 1
    if not path.exists() and looks_local:
        raise LvlmlpError(f"{model_id}: no such model folder")
    if not path.exists():
        _check_hub_reachable(model_id)
    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise LvlmlpError(f"{model_id}: the checkpoint ships its own model code; {_REMOTE_ADVICE}") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LvlmlpError(f"{model_id}: cannot load the model config ({first})") from None


def _check_hub_reachable(model_id: str) -> None:
    """A hub id that is not cached needs the hub: say so in a second, rather than after half a minute of retries."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(model_id, "config.json"), str):
            return  # cached: from_pretrained reads it (offline too)
    except ValueError:  # not a valid repo id: from_pretrained says so below
        return
    advice = (f"download it where the hub is reachable (`hf download {model_id}`) and copy the cache "
              "(HF_HOME), or give a local checkpoint folder; set HF_HUB_OFFLINE=1 to work from the cache only")
    if constants.HF_HUB_OFFLINE:
        raise LvlmlpError(f"{model_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {advice}")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        raise LvlmlpError(f"{model_id}: not in the local Hugging Face cache and {url.hostname} is unreachable "
                          f"({err.strerror or err}); {advice}") from None


def _weight_error(model_id: str, err: Exception) -> LvlmlpError:
    """Name the weight file that cannot be read (truncated, corrupt), with the remedy."""
    from safetensors import safe_open

    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    folder = Path(model_id)
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except Exception as bad:  # noqa: BLE001 - any failure to read names this file
            reason = str(bad).strip().splitlines()[0] if str(bad).strip() else type(bad).__name__
            return LvlmlpError(f"{file}: corrupt or truncated weights ({reason}); copy or download the checkpoint again")
    return LvlmlpError(f"{model_id}: cannot load the weights ({first[:300]}); copy or download the checkpoint again")


def _check_dependencies(family: str, model_id: str) -> None:
    missing = [pkg for pkg in quirks_of(family).needs if importlib.util.find_spec(pkg) is None]
    if missing:
        raise LvlmlpError(
            f"{model_id}: {family} models need {' and '.join(missing)}; "
            f"install it with `pip install {' '.join(missing)}`"
        )


def _weights_hash(folder: Path) -> str:
    """sha256 over the weight files' names, sizes and first/last MiB: cheap, and changes whenever weights do."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder).as_posix()}\0{size}\0".encode())
        with file.open("rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def processed_pixels(processor: Any, width: int, height: int) -> int:
    """An upper estimate of the pixels a `width` x `height` image has once `processor` (a processor or an image
    processor) has resized it (at least its own): CLIP-style processors (a `shortest_edge` and no `longest_edge`)
    scale the shorter side to that length and the longer one with it; the others resize to a bounded size (fixed,
    a longest edge, a pixel budget) or refuse extreme aspect ratios themselves (Qwen2-VL)."""
    size = getattr(getattr(processor, "image_processor", processor), "size", None)

    def get(key: str) -> Any:
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    short, pixels = get("shortest_edge"), width * height
    if short and not get("longest_edge") and min(width, height) > 0:
        scale = short / min(width, height)
        return max(pixels, round(width * scale) * round(height * scale))
    return pixels


def oversized(processor: Any, width: int, height: int, max_pixels: int | None = None) -> str | None:
    """Why an image of this size (its header's) is refused before decoding, or None: it, or what `processor` would
    resize it to, has more than `max_pixels` pixels (default `data.MAX_PROCESSED_PIXELS`)."""
    from lvlmlp.data import MAX_PROCESSED_PIXELS

    limit = MAX_PROCESSED_PIXELS if max_pixels is None else max_pixels
    processed = processed_pixels(processor, width, height)
    if processed <= limit:
        return None
    if processed == width * height:
        return f"the image is {width}x{height} pixels, more than {limit} pixels"
    return (f"the image is {width}x{height} pixels, which the model's processor would resize to about "
            f"{processed} pixels (aspect ratio {max(width, height) / max(min(width, height), 1):.0f}:1), more "
            f"than {limit}; crop or pad it")


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector held off, and left as it was afterwards. Importing transformers' Auto
    classes and loading a processor and a model make millions of long-lived objects and next to no cyclic garbage;
    the collector's full passes over that growing heap took 0.3 s of the tiny model's 2.9 s start-up
    (docs/benchmarks.md, fourth pass)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _takes_tensors(processor: Any) -> bool:
    """Whether the processor's image processor is a torchvision one (`TorchvisionBackend`), so that a uint8 (3, H, W)
    tensor and a PIL image of the same pixels give it the same input."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:  # transformers without torchvision
        return False
    return isinstance(getattr(processor, "image_processor", None), TorchvisionBackend)


class Backend:
    """One loaded vision-language model with its processor; see the module docstring for the four operations."""

    @_collector_paused()
    def __init__(
        self,
        model: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        prompt_template: str | None = None,
        raw_prompt: bool = False,
        load_model: bool = True,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """`load_model=False`: config, processor, prompt and weights hash only (enough to recognise a finished run
        without loading the weights); `model` is then None and `vocab_size` unknown (None). `trust_remote_code`:
        run the checkpoint's own Python code (its config's `auto_map`), loaded through the first of
        `REMOTE_AUTO_CLASSES` it registers (`auto_class`)."""
        from transformers import AutoProcessor
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        self.model_id = str(model)
        if prompt_template is not None and "{question}" not in prompt_template:
            raise LvlmlpError(f"--prompt-template: {prompt_template!r} has no {{question}} placeholder")
        self.prompt_template = prompt_template
        self.raw_prompt = raw_prompt
        # A system turn before the user's (e.g. the llava_v1 line the original LLaVA-1.5 runs used); None: the
        # chat template's own default.
        self.system_prompt = system_prompt
        self._affixes: tuple[str, str] | tuple[()] | None = None  # chat template split around the question
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

        self.trust_remote_code = trust_remote_code
        config = load_model_config(self.model_id, trust_remote_code)
        self.config = config  # the checkpoint's config, read without the weights (layer count, ...)
        self.family: str = config.model_type
        self.quirks = quirks_of(self.family)
        auto_map = getattr(config, "auto_map", None) or {}
        # The Auto class the model loads through: AutoModelForImageTextToText, unless the checkpoint's own code
        # registers its model under another one only (Molmo, Phi-4-multimodal, MiniCPM-V: AutoModelForCausalLM or
        # AutoModel); transformers then loads the class that auto_map names.
        self.auto_class = "AutoModelForImageTextToText"
        if trust_remote_code and self.family not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and auto_map:
            self.auto_class = next((name for name in REMOTE_AUTO_CLASSES if name in auto_map), "")
            if not self.auto_class:
                raise LvlmlpError(
                    f"{self.model_id}: its own code registers no model class lvlmlp can load (only "
                    f"{', '.join(sorted(auto_map))}; lvlmlp loads {', '.join(REMOTE_AUTO_CLASSES)})"
                )
        elif self.family not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise LvlmlpError(
                f"{self.model_id}: model type {self.family!r} is not a vision-language (image-text-to-text) model"
            )
        if self.quirks.refused:
            raise LvlmlpError(
                f"{self.model_id}: {self.family} models are refused: {self.quirks.refused} (see docs/models.md)"
            )
        _check_dependencies(self.family, self.model_id)
        if self.family not in CHECKED:
            log.warning("%s: model type %r is not one of the checked families (docs/models.md): compare a few rows "
                        "with single runs before trusting batched results", self.model_id, self.family)
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id, trust_remote_code=trust_remote_code)
        except ImportError as err:
            raise LvlmlpError(
                f"{self.model_id}: cannot load the processor: {str(err).splitlines()[0]}"
            ) from None
        # PNG rows are decoded straight into tensors (`png.png_pixels`) for an image processor built on torchvision,
        # which takes them as it takes a PIL image's pixels, minus its conversion: in the checked families, whose
        # batches of tensors tests/extraction/test_backend.py compares with their batches of PIL images.
        self.tensor_images = self.family in CHECKED and not self.quirks.pil_images and _takes_tensors(self.processor)
        self.model: Any = None
        self.vocab_size: int | None = None  # known once the weights are loaded
        self.tokenizer = self.processor.tokenizer
        # Left padding keeps every row's last prompt token in the last column, where generation continues.
        self.tokenizer.padding_side = "left"
        if self.quirks.qformer_text:
            # InstructBLIP's Q-Former is a BERT with absolute positions: right padding (plus its attention mask)
            # keeps each row's question at positions 0..n-1, exactly as in a single-row run.
            self.processor.qformer_tokenizer.padding_side = "right"

        local = Path(self.model_id)
        if local.is_dir():
            self.revision: str | None = None
            self.weights_hash = _weights_hash(local)
        else:
            # A hub id: its cached snapshot folder is named by the commit, which identifies the weights exactly.
            self.revision = _hub_revision(self.model_id)
            self.weights_hash = self.revision or "unknown"
        if load_model:
            self.load_weights()

    @_collector_paused()
    def load_weights(self) -> None:
        """Load the model onto `device`: a backend built with `load_model=False` (config, processor, prompt and
        weights hash, all that preparing batches needs) becomes a full one. `extract` forks its data-loader workers
        from such a backend before calling this, so that they prepare batches while the weights load."""
        import transformers
        from safetensors import SafetensorError

        auto = getattr(transformers, self.auto_class)  # one of REMOTE_AUTO_CLASSES: never a file read by hand
        try:
            model = auto.from_pretrained(self.model_id, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # truncated, corrupt, missing files
            raise _weight_error(self.model_id, err) from None
        if not hasattr(model, "generate") or model.get_output_embeddings() is None:
            raise LvlmlpError(f"{self.model_id}: the class its own code registers as {self.auto_class} "
                              f"({type(model).__name__}) has no generating language-model head")
        self.model = model.to(self.device).eval()
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        gen = model.generation_config
        self.eos_ids: set[int] = set(_as_list(gen.eos_token_id) or _as_list(self.tokenizer.eos_token_id))
        self.pad_id: int = next(
            (i for i in (gen.pad_token_id, self.tokenizer.pad_token_id, *self.eos_ids) if i is not None), 0
        )

    # ------------------------------------------------------------------------------------------- derived identities
    def with_prompt_template(self, template: str | None) -> Backend:
        """This loaded model under another prompt template: a new backend sharing the model, processor and
        tokenizer (one load serves every prompt of a config); this one is left as it is."""
        if template is not None and "{question}" not in template:
            raise LvlmlpError(f"--prompt-template: {template!r} has no {{question}} placeholder")
        derived = copy.copy(self)
        derived.prompt_template = template
        return derived

    def renamed(self, model_id: str, weights_hash: str) -> Backend:
        """This loaded model recorded under another identity (a run's manifest names the LoRA adapter's epoch, not
        the base weights it was loaded from); shares the model; this one is left as it is."""
        derived = copy.copy(self)
        derived.model_id, derived.weights_hash = model_id, weights_hash
        return derived

    # ----------------------------------------------------------------------------------------------------- prompts
    def processed_pixels(self, width: int, height: int) -> int:
        """An upper estimate of an image's pixels once the processor has resized it (`processed_pixels`)."""
        return processed_pixels(self.processor, width, height)

    def oversized(self, width: int, height: int, max_pixels: int | None = None) -> str | None:
        """Why an image of this size is refused before decoding, or None (`oversized`)."""
        return oversized(self.processor, width, height, max_pixels)

    def prompt(self, question: str) -> str:
        """The text passed to the processor for one row (the default prompt, see module docstring)."""
        text = self.prompt_template.replace("{question}", question) if self.prompt_template else question
        template = getattr(self.processor, "chat_template", None)
        if self.raw_prompt or not template or not self.quirks.chat_template:
            placeholder = self.quirks.image_placeholder
            if placeholder is None:
                placeholder = getattr(self.processor, "image_token", "")
            # PaliGemma's processor would add the image tokens itself, with a warning; giving them is the same.
            if placeholder and getattr(self.processor, "image_token", placeholder) not in text:
                text = placeholder + text
            # Without a chat template the system text leads, separated by a space (llava_v1's separator).
            return f"{self.system_prompt} {text}" if self.system_prompt else text
        if self._affixes is None:
            self._affixes = self._template_affixes()
        if self._affixes:
            return self._affixes[0] + text + self._affixes[1]
        return self._render(text)

    def _render(self, text: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        if self.system_prompt:
            conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _template_affixes(self) -> tuple[str, str] | tuple[()]:
        """(prefix, suffix) around the question when the chat template inserts it verbatim, else ().

        Rendering the Jinja template costs as much per row as preprocessing the image; most templates paste the
        text as it is, so we render once around a sentinel. Two probes with edge whitespace and braces check that
        the template does not trim or rewrite the text; a template that does is rendered row by row."""
        sentinel = "\x00lvlmlp-question\x00"
        rendered = self._render(sentinel)
        if rendered.count(sentinel) != 1:
            return ()
        prefix, suffix = rendered.split(sentinel)
        for probe in (" a  {b}\n", "Is there a cat?"):
            if self._render(probe) != prefix + probe + suffix:
                return ()
        return prefix, suffix

    # ------------------------------------------------------------------------------------------------------ encode
    def encode(self, images: list[Image.Image], questions: list[str]) -> dict[str, torch.Tensor]:
        """One left-padded batch on `device`; floating tensors (pixels) in the model's dtype."""
        return self.to_device(self.collate(images, questions))

    def collate(self, images: list[Image.Image | torch.Tensor], questions: list[str]) -> dict[str, torch.Tensor]:
        """The processor's batch on the CPU (no device work, so data-loader processes can run it)."""
        if len(images) != len(questions):
            raise LvlmlpError(f"encode: {len(images)} images for {len(questions)} questions")
        if not images:
            raise LvlmlpError("encode: empty batch")
        texts = [self.prompt(q) for q in questions]
        # One image per row, given as a list per row: SmolVLM's processor only pairs images with prompts that way,
        # and every other processor reads it the same.
        rgb = [[im if isinstance(im, torch.Tensor) or im.mode == "RGB" else im.convert("RGB")] for im in images]
        # NumPy arrays cost less to build than tensors (and wrapping them is free); the values are the same.
        if self.quirks.torch_outputs:
            # bfloat16 pixels (Llama 4's) have no NumPy type: widened to float32, exactly, they travel as the rest.
            batch = self.processor(images=rgb, text=texts, padding=True, return_tensors="pt")
            batch = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
                     for k, v in batch.items() if isinstance(v, torch.Tensor)}
        elif self.quirks.ragged_tiles:
            # Each image's tiles are an array of their own (PerceptionLM: a thumbnail and as many tiles as its aspect
            # ratio needs), which no batch array holds. The model flattens the batch's tiles in row order and fills
            # the image tokens in that same order, so one (1, all tiles, C, H, W) array gives each row its own tiles.
            out = self.processor(images=rgb, text=texts, padding=True)
            batch = {k: np.asarray(v) for k, v in out.items() if k != "pixel_values"}
            batch["pixel_values"] = np.concatenate([np.asarray(p) for p in out["pixel_values"]])[None]
        else:
            batch = self.processor(images=rgb, text=texts, padding=True, return_tensors="np")
        for key in self.quirks.drop_outputs:
            batch.pop(key, None)
        return {k: torch.from_numpy(v) for k, v in batch.items() if isinstance(v, np.ndarray)}

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None) for k, v in batch.items()}

    # ----------------------------------------------------------------------------------------------------- prefill
    def generation_position_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The position ids `generate` would use: counted over real tokens only (so padding, even InstructBLIP's in
        mid-sequence, shifts nothing), and Qwen's 3-D multimodal positions. `GenerationMixin` owns this logic,
        including per-family overrides, so it is reused rather than copied."""
        owner = self.model.language_model if self.quirks.nested_language_model else self.model
        kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
        return owner._prepare_position_ids_for_generation(batch["input_ids"], kwargs)

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        n = self.num_layers + 1  # output_hidden_states: embeddings, then each decoder layer's output
        out = []
        for layer in layers:
            if not -n <= int(layer) < n:
                raise LvlmlpError(f"--layers: layer {layer} out of range for a {self.num_layers}-layer model")
            out.append(int(layer) % n)
        return out

    @property
    def max_length(self) -> int | None:
        """The longest input (prompt and image tokens) the language model takes, if its config says."""
        # Without the weights (data-loader workers forked before they load) the checkpoint's config says the same.
        config = self.config if self.model is None else self.model.config
        value = getattr(config.get_text_config(), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def num_layers(self) -> int:
        return num_layers_of(self.config)

    def resolve_layers(self, layers: Sequence[int] | str) -> list[int]:
        """`layers` as a list of indices into `output_hidden_states`: `"quartiles"` is HALP's {0, L/4, L/2, 3L/4, L}
        for this model's L decoder layers (`quartile_layers`); a list is checked against L."""
        if isinstance(layers, str):
            return resolve_layer_spec(layers, self.num_layers)
        self._check_layers(layers)
        return [int(x) for x in layers]

    def check_vision(self) -> None:
        """`--vision`: refuse a family without a continuous vision output (`Quirks.vision_refused`) or whose model
        lacks the module its quirks name."""
        quirks = self.quirks
        if quirks.vision_refused:
            raise LvlmlpError(f"--vision: not available for model family {self.family!r}: {quirks.vision_refused}")
        if self.model is not None:
            self._vision_module()

    def _vision_module(self) -> tuple[torch.nn.Module, str | None]:
        """The module of `Quirks.vision_input` and what of it is taken (None: its first input, "output", a keyword)."""
        path, _, part = self.quirks.vision_input.partition(":")
        try:
            return self.model.get_submodule(path), part or None
        except AttributeError:
            raise LvlmlpError(f"--vision: the {self.family} model has no module {path!r} (its quirks' vision_input); "
                              "the vision output cannot be taken") from None

    @contextlib.contextmanager
    def _vision_capture(self, want: bool) -> Any:
        """While active, every call of the quirks' module records the tensor taken (`captured`, in call order);
        decoding steps after the prefill do not run the vision tower."""
        captured: list[torch.Tensor] = []
        if not want:
            yield captured
            return
        self.check_vision()
        module, part = self._vision_module()

        def tensor(value: Any) -> torch.Tensor | None:  # a module's output may be a tuple or a ModelOutput
            if value is None or torch.is_tensor(value):
                return value
            return value[0] if isinstance(value, (tuple, list)) else getattr(value, "last_hidden_state", None)

        def keep(value: torch.Tensor | None) -> None:
            # Not a call without that input, nor one on token ids (Ovis2 embeds its image indicators there too).
            if value is not None and value.is_floating_point():
                captured.append(value.detach())

        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> None:
            keep(tensor(kwargs.get(part) if part else (args[0] if args else next(iter(kwargs.values())))))

        def hook(_module: Any, _args: tuple, output: Any) -> None:
            keep(tensor(output))

        handle = (module.register_forward_hook(hook) if part == "output"
                  else module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            yield captured
        finally:
            handle.remove()

    def _vision_result(self, captured: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not captured:
            raise LvlmlpError(f"--vision: the {self.family} vision output was not computed on this batch (no image?)")
        return _pool_vision(captured, self.quirks.vision_layout, batch, self.config)

    def padded_length_error(self, batch: dict[str, torch.Tensor], new_tokens: int) -> str | None:
        """Why a padded batch of `new_tokens` generated tokens is not run (it reaches the family's `padded_limit`,
        past which padded rows are not exact), or None. `lvlmlp serve` runs such a batch's requests one at a time."""
        if not self.quirks.padded_limit:
            return None
        limit = int(getattr(self.model.config.get_text_config(), self.quirks.padded_limit))
        mask = batch["attention_mask"]
        last = mask.shape[1] + new_tokens - 2  # the last position a forward pass computes (prompt, then new tokens)
        if bool((mask == 0).any()) and last >= limit - 1:
            return (f"{self.model_id}: a padded {self.family} batch reaches position {last}, from {limit - 1} on "
                    f"padded rows differ from single runs ({self.quirks.padded_limit}, see docs/models.md); use "
                    "--batch-size 1")
        return None

    def _check_padded_length(self, batch: dict[str, torch.Tensor], new_tokens: int) -> None:
        """Stop a padded batch that reaches the family's `padded_limit` (`padded_length_error`)."""
        error = self.padded_length_error(batch, new_tokens)
        if error:
            raise LvlmlpError(error)

    @torch.inference_mode()
    def prefill(
        self, batch: dict[str, torch.Tensor], *, hidden: bool = False, layers: Sequence[int] = (),
        vision: bool = False,
    ) -> dict[str, torch.Tensor]:
        """One forward pass. `logits`: (B, V) float32 raw logits of the first generated token; `hidden`: (B, H) the
        final-norm hidden state there; `layers`: (B, len(layers), H), indices into `output_hidden_states`
        (0 = embeddings, i = output of decoder layer i, the last one after the final norm)."""
        layer_ids = self._check_layers(layers)
        want_states = hidden or bool(layer_ids)
        self._check_padded_length(batch, 1)
        with self._vision_capture(vision) as captured:
            out = self.model(
                **batch,
                position_ids=self.generation_position_ids(batch),
                logits_to_keep=1,
                use_cache=False,
                output_hidden_states=want_states,
                return_dict=True,
            )
        result = {"logits": out.logits[:, -1, :].float()}
        if want_states:
            result.update(self._states(_hidden_states(out), hidden, layer_ids))
        if vision:
            result["vision"] = self._vision_result(captured, batch)
        return result

    def _states(
        self, states: Sequence[torch.Tensor], hidden: bool, layer_ids: list[int]
    ) -> dict[str, torch.Tensor]:
        """Hidden states at the last prompt position (the one that predicts the first generated token)."""
        if states[0].dim() == 4:
            # A stack of parallel streams per layer, (streams, batch, tokens, width): Gemma 3n's AltUp. Its active
            # stream is the one each layer computes in full (the others are predicted from it), so it is the state.
            active = getattr(self.model.config.get_text_config(), "altup_active_idx", 0)
            states = [s[active] for s in states]
        result = {}
        if hidden:
            result["hidden"] = states[-1][:, -1, :].float()
        if layer_ids:
            result["layers"] = torch.stack([states[i][:, -1, :].float() for i in layer_ids], dim=1)
        return result

    # ---------------------------------------------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(
        self,
        batch: dict[str, torch.Tensor],
        *,
        max_new_tokens: int,
        hidden: bool = False,
        layers: Sequence[int] = (),
        logits_processor: Any = None,
        vision: bool = False,
        **gen_kwargs: Any,
    ) -> dict[str, Any]:
        """Greedy decoding (unless `gen_kwargs` say otherwise). Returns `logits` (B, K, V) float32 RAW logits (before
        any logits processor), `sequences` (B, K) generated ids, `n_tokens` (B,) valid tokens per row up to and
        including EOS, `responses` (decoded, special tokens skipped), and `hidden`/`layers` at the first generated
        position when asked. K = max_new_tokens always; positions at or after a row's `n_tokens` hold pad ids and
        zero logits."""
        if max_new_tokens < 1:
            raise LvlmlpError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        layer_ids = self._check_layers(layers)
        want_states = hidden or bool(layer_ids)
        kwargs: dict[str, Any] = {"do_sample": False, "pad_token_id": self.pad_id}
        kwargs.update(gen_kwargs)
        with self._vision_capture(vision) as captured:
            out = self.model_generate(
                batch,
                max_new_tokens=max_new_tokens,
                logits_processor=logits_processor,
                output_logits=True,
                output_hidden_states=want_states,
                return_dict_in_generate=True,
                **kwargs,
            )
        steps = len(out.logits)
        bsz = batch["input_ids"].shape[0]
        # Decoder-only models return prompt + new tokens; the new ones are the last `steps` columns either way.
        new = out.sequences[:, -steps:]
        logits = torch.zeros(
            bsz, max_new_tokens, out.logits[0].shape[-1], dtype=torch.float32, device=new.device
        )
        logits[:, :steps] = torch.stack(out.logits, dim=1).float()
        sequences = torch.full((bsz, max_new_tokens), self.pad_id, dtype=new.dtype, device=new.device)
        sequences[:, :steps] = new

        eos_ids = (
            set(_as_list(kwargs["eos_token_id"])) if kwargs.get("eos_token_id") is not None else self.eos_ids
        )
        is_eos = torch.zeros_like(sequences, dtype=torch.bool)
        for eos in eos_ids:
            is_eos |= sequences == eos
        no_eos = torch.full((bsz,), steps, dtype=torch.long, device=new.device)
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), no_eos)
        n_tokens = torch.clamp(first_eos + 1, max=steps)
        valid = torch.arange(max_new_tokens, device=new.device)[None, :] < n_tokens[:, None]
        sequences = sequences.masked_fill(~valid, self.pad_id)
        logits = logits.masked_fill(~valid[:, :, None], 0.0)

        result: dict[str, Any] = {
            "logits": logits,
            "n_tokens": n_tokens.cpu(),
            "sequences": sequences,
            "responses": [
                self.tokenizer.decode(row[: int(n)], skip_special_tokens=True).strip()
                for row, n in zip(sequences.tolist(), n_tokens.tolist())
            ],
        }
        if want_states:
            result.update(self._states(out.hidden_states[0], hidden, layer_ids))
        if vision:
            result["vision"] = self._vision_result(captured, batch)
        return result

    def model_generate(self, batch: dict[str, torch.Tensor], *, max_new_tokens: int, **kwargs: Any) -> Any:
        """transformers' `generate(**batch, max_new_tokens=..., **kwargs)` with the family's quirks applied: a padded
        batch reaching its `padded_limit` stops (one line), and a model whose own `generate` drops logits processors
        (`generic_generate`) runs the generic one. Returns what transformers returns. `generate` above and
        `lvlmlp serve` (its own streamer, stopping criteria and processors) both decode through it."""
        self._check_padded_length(batch, max_new_tokens)
        generate = self.model.generate
        if self.quirks.generic_generate:  # its own generate would drop the logits processors (the probe guard)
            from transformers import GenerationMixin

            generate = functools.partial(GenerationMixin.generate, self.model, guidance_scale=None)
        return generate(**batch, max_new_tokens=max_new_tokens, **kwargs)

    # -------------------------------------------------------------------------------------------------------- head
    def head_is_linear(self) -> bool:
        """True when logits are a linear map of the final hidden state: `lm_head(final hidden)`, times the text
        config's `logit_scale` where the family's quirks say the model applies it (Aya Vision). False with Gemma
        2-style soft-capping or where the quirks say the model rewrites the head's output (Chameleon), and with a
        logit scale the quirks say nothing about (whether a model class applies its config's scale varies:
        Cohere2-Vision does not), rather than rebuild logits wrongly."""
        text_config = self.model.config.get_text_config()
        if getattr(text_config, "final_logit_softcapping", None) or not self.quirks.linear_head:
            return False
        if self.quirks.logit_scale is not None:
            return True
        return getattr(text_config, "logit_scale", 1.0) in (None, 1.0) and getattr(
            text_config, "logits_scaling", 1.0
        ) in (None, 1.0)

    @torch.inference_mode()
    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of final-norm hidden states through the model's own output head (and logit scale)."""
        if not self.head_is_linear():
            raise LvlmlpError(
                f"{self.model_id}: the {self.family} output head is not linear (logit soft-capping, rewritten "
                "logits or an unaccounted logit scale)"
            )
        head = self.model.get_output_embeddings()
        logits = head(hidden.to(head.weight.device, head.weight.dtype)).float()
        if self.quirks.logit_scale:
            logits = logits * float(self.model.config.get_text_config().logit_scale)
        return logits


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _hidden_states(out: Any) -> Sequence[torch.Tensor]:
    states = getattr(out, "hidden_states", None)
    if states is None:  # InstructBLIP keeps the language model's outputs nested
        states = out.language_model_outputs.hidden_states
    return states


def _hub_revision(model_id: str) -> str | None:
    """The commit of the cached snapshot of a hub model (`from_pretrained` has just downloaded it), if known."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True)).name
    except Exception as err:  # noqa: BLE001 - provenance is best effort; loading already succeeded
        log.debug("no hub revision for %s: %s", model_id, err)
        return None
