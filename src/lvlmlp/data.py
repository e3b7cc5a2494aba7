"""Data stage: the JSON-lines manifest (README, Extracting) and image loading.

A row is a plain dict: `id` (str), `image` (absolute path), `question` (str), optional `label` (int) and
`split` (str); every other field is metadata kept as it is. Task adapters produce the same rows.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from lvlmlp.errors import LvlmlpError

log = logging.getLogger("lvlmlp")
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")  # reprs such as <_io.BytesIO object at 0x7f...>


def read_manifest(path: str | Path) -> list[dict]:
    """Read and validate a manifest; image paths become absolute (relative ones are taken from its folder)."""
    path = Path(path)
    if not path.is_file():
        raise LvlmlpError(f"{path}: manifest not found")
    rows = []
    for _, row in iter_json_lines(path):
        if "image" in row and isinstance(row["image"], str) and row["image"]:
            image = Path(row["image"]).expanduser()
            row["image"] = str(image if image.is_absolute() else _absolute(path.parent / image))
        rows.append(row)
    if not rows:
        raise LvlmlpError(f"{path}: the manifest has no rows")
    return validate_rows(rows, str(path))


def _absolute(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a symlink loop: the row fails (or is skipped) when its image is checked
        return Path(os.path.abspath(path))


def iter_json_lines(path: str | Path, context: str = "") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line, streamed (files of many GB never load whole); a line that is
    not a JSON object is a one-line error naming `context` (e.g. the task), the file and the line."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LvlmlpError(
                    f"{context}{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise LvlmlpError(f"{context}{path}:{lineno}: line is not JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise LvlmlpError(f"{context}{path}:{lineno}: line is not a JSON object")
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict]:
    return [obj for _, obj in iter_json_lines(path)]


def write_jsonl(path: str | Path, items: Iterable[dict]) -> None:
    """Write JSON lines atomically (a temporary file renamed into place): readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, default=str) + "\n")
    os.replace(tmp, path)


class ValidRows(list):
    """Rows that `validate_rows` accepted. A selection of them is valid too (`selected`): a manifest or a task is
    checked whole once, when it is read, and the rows it hands on are not checked again."""


def selected(rows: list[dict], kept: Iterable[dict]) -> list[dict]:
    """`kept` (some of `rows`, or copies of them with fields added) as a list that stays valid when `rows` were."""
    return ValidRows(kept) if isinstance(rows, ValidRows) else list(kept)


def validate_rows(rows: list[dict], source: str) -> ValidRows:
    """Check ids, questions and labels up front, so no model time is spent on a manifest that will fail; rows
    already checked (`ValidRows`) are returned as they are."""
    if isinstance(rows, ValidRows):
        return rows
    seen: set[str] = set()
    for i, row in enumerate(rows):
        rid = row.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            row["id"] = rid = str(rid)  # numeric ids are common in benchmark files; ids are strings
        if not isinstance(rid, str) or not rid:
            raise LvlmlpError(f"{source}: row {i + 1} has no string 'id'")
        if rid in seen:
            raise LvlmlpError(f"{source}: duplicate id {rid!r}")
        seen.add(rid)
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise LvlmlpError(f"{source}: row {rid!r}: missing or empty 'question'")
        if not isinstance(row.get("image"), str) or not row["image"]:
            raise LvlmlpError(f"{source}: row {rid!r}: missing 'image'")
        label = row.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
            raise LvlmlpError(f"{source}: row {rid!r}: 'label' must be an int, got {label!r}")
    return ValidRows(rows)


def check_images_exist(rows: Iterable[dict], source: str) -> list[tuple[str, str]]:
    """Return (id, message) for each row whose image file is missing (cheap: one stat each, no decoding)."""
    # os.path.isfile, not Path.is_file: building a Path costs 3 us, four times the stat (256 rows: 0.9 ms -> 0.2).
    return [(row["id"], f"{source}: row {row['id']!r}: {_missing(Path(row['image']))}")
            for row in rows if not os.path.isfile(row["image"])]


def _missing(path: Path) -> str:
    if path.is_symlink():
        return f"image is a broken or looping symbolic link: {path}"
    if path.exists():
        return f"image is not a regular file: {path}"
    return f"image not found: {path}"


# The most pixels an image may have after the model's processor has resized it (`Backend.oversized`): at 10 (the
# LLaVA processor, measured) to 40 bytes a pixel in a processor (float32 copies), 4096x4096 pixels keep one image's
# processing under 1 GB. CLIP-style processors scale the shorter side to a fixed length, so an extreme aspect ratio
# (a 664-byte 200000x1 PNG) would otherwise grow into gigabytes; `lvlmlp serve` applies its --max-image-pixels.
MAX_PROCESSED_PIXELS = 4096 * 4096


def too_many_pixels(width: int, height: int) -> str | None:
    """The image check of a backend that has no `oversized` of its own (a `--backend` class, docs/backends.md):
    the image as decoded must hold at most `MAX_PROCESSED_PIXELS` pixels."""
    if width * height > MAX_PROCESSED_PIXELS:
        return f"{width}x{height} pixels: over the {MAX_PROCESSED_PIXELS:,} an image may have"
    return None


def image_check(backend: Any) -> Callable[[int, int], str | None]:
    """The header check `load_image` applies for `backend`: its own `oversized`, else `too_many_pixels`."""
    return getattr(backend, "oversized", None) or too_many_pixels


def load_image(path: str | Path, row_id: str = "?", check: Callable[[int, int], str | None] | None = None
               ) -> Image.Image:
    """Open any PIL-readable image as RGB: EXIF rotation applied, 16-bit and float scaled, alpha dropped.

    `check(width, height)`: called with the size the file's header declares, before any pixel is decoded; a message
    it returns refuses the image (`Backend.oversized`: what the processor would make of it is too large)."""
    path = Path(path)
    if not path.is_file():
        raise LvlmlpError(f"row {row_id!r}: {_missing(path)}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            # From bytes in memory: no file handle outlives this call, and the decoded image needs no copy.
            im = Image.open(io.BytesIO(path.read_bytes()))
            problem = check(*im.size) if check is not None else None
            if problem:
                raise LvlmlpError(f"row {row_id!r}: {path}: {problem}")
            im.load()  # decode now: truncated files fail here rather than inside the processor
        for w in caught:  # PIL's warning names no file: say which row's image is so large
            log.warning("row %r: %s: %s", row_id, path, w.message)
        ImageOps.exif_transpose(im, in_place=True)
        return to_rgb(im)
    except LvlmlpError:
        raise
    except Exception as err:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        message = _ADDRESS.sub("the file", str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise LvlmlpError(f"row {row_id!r}: unreadable image {path}: {message}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB (`load_image`'s conversion; `lvlmlp serve` applies it to uploaded images)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("RGB") clips 16-bit values at 255 (a white image); scale to 8 bits instead.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr)  # uint8 2-D -> mode "L"
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # avoids PIL's warning and keeps palette transparency meaningful
    return im if im.mode == "RGB" else im.convert("RGB")


def rows_fingerprint(rows: Iterable[dict]) -> str:
    """A hash of the rows as given (ids, images, questions, labels, metadata) to refuse mixing runs."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


ROW_META_LIMIT = 1 << 20  # bytes of JSON per row (its fields are kept with its features in the run)


def image_stamp(row: dict) -> str:
    """A row's image file as "size\0modification time" (stat only, no read), or "missing"."""
    try:
        st = os.stat(row["image"])
        return f"{st.st_size}\0{st.st_mtime_ns}"
    except (OSError, KeyError, TypeError, ValueError):
        return "missing"


def images_fingerprint(rows: Iterable[dict], stamps: dict[str, str] | None = None) -> str:
    """A hash of each row's image stamp (`image_stamp`, or the row id's in `stamps` when the caller has them): part
    of a run's identity, so that images replaced in place under a finished run are noticed instead of their old
    features reused."""
    h = hashlib.sha256()
    for row in rows:
        stamp = stamps[row["id"]] if stamps is not None else image_stamp(row)
        h.update(f"{row.get('id')}\0{stamp}\n".encode())
    return h.hexdigest()[:16]


def check_rows(rows: list[dict], source: str, on_error: str = "fail") -> None:
    """Ids, questions and labels are valid and (unless rows may be skipped) every image file exists."""
    validate_rows(rows, source)
    for row in rows:  # a row's metadata is stored in a shard's header: a clear limit, not safetensors' traceback
        size = len(json.dumps(row, default=str))
        if size > ROW_META_LIMIT:
            raise LvlmlpError(f"{source}: row {row.get('id')!r} carries {size:,} bytes of metadata, over the limit of "
                              f"{ROW_META_LIMIT:,} per row; keep large fields out of the manifest (a path to a file)")
    missing = check_images_exist(rows, source)
    if missing and on_error == "fail":
        raise LvlmlpError(missing[0][1])
