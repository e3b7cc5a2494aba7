"""PNG files decoded straight into the uint8 (3, H, W) tensors that torchvision-backed image processors work on.

PNG is lossless, so every correct decoder gives the same pixels: libspng (through imagecodecs) gives exactly what
`data.load_image` gives through PIL, for files of at most 8 bits a sample in any colour type but grey with alpha
(which imagecodecs does not decode), interlaced or not, whatever their gamma or colour-profile chunks say (neither
decoder applies them). Files whose PIL image carries more than its pixels (an orientation, in an EXIF chunk or in
text; an animation; a transparent colour) go PIL's way, as does any file this module is not sure of: a broken chunk,
an image over PIL's pixel limit or refused by the backend's check, a decoder error. That way is the reference, and
its errors name the row. tests/extraction/test_png.py compares the two ways for every colour type and bit depth,
and on damaged files.

Why: on the tiny test model a row's preparation took 0.40 ms, of which PIL's opening and decoding of a 100 px PNG
0.10; libspng takes 0.035 and the processor's conversion of a PIL image is not needed (docs/benchmarks.md, fifth
pass). Why libspng through imagecodecs: it checks the image data (zlib's Adler-32, and the checksums of the chunks
it reads past) and reports a damaged file as an error, where torchvision's libpng decoder crashed the process
(fourth pass) and pyspng, which turns libspng's checks off, decoded damaged data that PIL refuses. JPEG stays with
PIL: its decoders may round differently."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

try:  # the `vision` extra's; without it every file goes PIL's way
    from imagecodecs import SPNG, spng_decode
except ImportError:  # pragma: no cover - installed wherever the tests run
    SPNG = spng_decode = None

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# An EXIF orientation, which PIL applies; an animation, whose frames PIL chooses between; a transparent colour, which
# PIL keeps in the RGB image's `info` and transformers' processors then paint white (PIL's is the reference).
_PIL_WAY = {b"eXIf", b"acTL", b"tRNS"}
# Text chunks PIL reads an orientation from as well (ImageMagick's EXIF as hex text, XMP's tiff:Orientation).
_TEXT = {b"tEXt", b"zTXt", b"iTXt"}
_ORIENTING = (b"Raw profile type exif\0", b"XML:com.adobe.xmp\0")  # keywords, which end at a zero byte


def png_pixels(path: str | Path, check: Callable[[int, int], str | None]) -> torch.Tensor | None:
    """The image at `path` as a uint8 (3, H, W) RGB tensor equal to `load_image`'s pixels, or None where the file
    is not a PNG this module decodes exactly (then `load_image` is the way). `check(width, height)` is the backend's
    header check; an image it refuses goes PIL's way too, which refuses it with the row's name."""
    if SPNG is None or not SPNG.available:
        return None
    try:
        with open(path, "rb") as f:
            if f.read(8) != _SIGNATURE:  # not a PNG: nothing more is read
                return None
            data = _SIGNATURE + f.read()
    except OSError:
        return None
    size = _header(data)
    limit = Image.MAX_IMAGE_PIXELS  # over it PIL warns or refuses: its way says so
    # A width of 4 or less (1, 3 and 4 are channel counts too) leaves image processors to guess which axis of a
    # (3, H, W) tensor holds the colours.
    if size is None or size[0] <= 4 or (limit and size[0] * size[1] > limit) or check(*size):
        return None
    try:
        pixels = torch.from_numpy(spng_decode(data))  # uint8: (H, W) grey, (H, W, 3) RGB or palette, (H, W, 4) RGBA
    except RuntimeError:  # imagecodecs' SpngError: a damaged file (PIL's way names it) or grey with alpha, which
        return None  # it does not decode
    if pixels.ndim == 2:  # grey (of 1 to 8 bits, scaled to 8 as PIL does) as RGB: three equal channels
        return pixels.expand(3, -1, -1).contiguous()
    return pixels[..., :3].permute(2, 0, 1)  # RGBA: the alpha dropped, as PIL's convert("RGB") does


def _header(data: bytes) -> tuple[int, int] | None:
    """(width, height) when the chunks after the 8-byte signature are whole up to IEND, IHDR first and not of 16
    bits a sample, no chunk leaves the decoders to differ, and every chunk but the image data has its right
    checksum (PIL refuses a bad one; libspng would drop it and go on)."""
    pos, size, view = 8, None, memoryview(data)
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data) or kind in _PIL_WAY or (pos == 8) != (kind == b"IHDR"):
            return None
        if kind in _TEXT and data.startswith(_ORIENTING, pos + 8):
            return None
        # The image data libspng checks itself: zlib's Adler-32, and every chunk's checksum but the last's (not read
        # once the image is whole; PIL checks none of them): intact data under a wrong one decodes as PIL's does.
        if kind != b"IDAT" and zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            return None
        if kind == b"IHDR":
            if length != 13 or data[pos + 16] == 16:  # 16 bits a sample: PIL scales them its own way
                return None
            size = struct.unpack_from(">II", data, pos + 8)
        if kind == b"IEND":
            return size
        pos = end
    return None
