"""png_pixels: a PNG decoded by libspng gives `load_image`'s pixels exactly, or the file goes PIL's way (None)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, PngImagePlugin

from lvlmlp.data import load_image
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction import loader
from lvlmlp.extraction.backend import Backend
from lvlmlp.extraction.png import png_pixels

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (37, 53, 4), dtype=np.uint8)


def _info(kind: bytes, data: bytes) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add(kind, data)
    return info


def _kinds() -> dict[str, tuple[Image.Image, dict]]:
    rgb = Image.fromarray(PIXELS[..., :3])
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    return {
        "RGB": (rgb, {}),
        "RGBA": (Image.fromarray(PIXELS, "RGBA"), {}),
        "L": (Image.fromarray(PIXELS[..., 0]), {}),
        "LA": (rgb.convert("LA"), {}),
        "P": (palette, {}),
        "P, 4 bits": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), {}),
        "P, transparent": (palette, {"transparency": 5}),
        "RGB, transparent": (rgb, {"transparency": (1, 2, 3)}),
        "L, transparent": (Image.fromarray(PIXELS[..., 0]), {"transparency": 7}),
        "1 bit": (Image.fromarray(PIXELS[..., 0] > 128), {}),
        "interlaced": (rgb, {"interlace": 1}),
        "gamma": (rgb, {"pnginfo": _info(b"gAMA", (45455).to_bytes(4, "big"))}),
        "sRGB": (rgb, {"pnginfo": _info(b"sRGB", b"\x00")}),
        "ICC profile": (rgb, {"icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()}),
        "text": (rgb, {"pnginfo": _info(b"tEXt", b"Comment\x00a comment")}),
    }


# PIL's way: a transparent colour (processors paint it white), grey with alpha (imagecodecs does not decode it)
PIL_WAY = {"P, transparent", "RGB, transparent", "L, transparent", "LA"}


@pytest.mark.parametrize("kind", list(_kinds()))
def test_every_8_bit_colour_type_decodes_to_load_images_pixels(tmp_path: Path, kind: str) -> None:
    image, options = _kinds()[kind]
    path = tmp_path / "im.png"
    image.save(path, **options)
    got = png_pixels(path, lambda w, h: None)
    if kind in PIL_WAY:
        assert got is None
        return
    want = torch.from_numpy(np.asarray(load_image(path)).copy()).permute(2, 0, 1)
    assert got is not None and got.dtype == torch.uint8
    assert got.shape == want.shape == (3, 37, 53) and torch.equal(got, want)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, body) of each chunk of a PNG file's bytes."""
    out, pos = [], 8
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def png_file(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file of these (kind, body) chunks, each with its right checksum."""
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big") for kind, body in chunks)


def _by_hand(colour_type: int, depth: int, rng: np.random.Generator, interlaced: bool = False) -> bytes:
    """A PNG of random samples written here (not by PIL's encoder): `depth` bits a sample, rows of packed samples
    with filter type 0, a palette of random colours for colour type 3; Adam7 passes when `interlaced`."""
    w, h = int(rng.integers(5, 40)), int(rng.integers(1, 30))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    samples = rng.integers(0, 1 << depth, (h, w * channels), dtype=np.uint32).astype(">u2" if depth == 16 else np.uint8)
    per = max(1, 8 // depth)  # samples a byte, the first in the high bits

    def scanlines(part: np.ndarray) -> bytes:  # (rows, samples): an empty pass has none at all
        if part.size == 0:
            return b""
        part = part.reshape(part.shape[0], -1)
        if depth == 16:  # two bytes a sample, the high one first
            part = np.ascontiguousarray(part).view(np.uint8)
        padded = np.zeros((part.shape[0], -(-part.shape[1] // per) * per), np.uint16)
        padded[:, : part.shape[1]] = part
        shifts = np.maximum(8 - depth * (np.arange(per) + 1), 0)
        packed = (padded.reshape(part.shape[0], -1, per) << shifts).sum(-1).astype(np.uint8)
        return np.concatenate([np.zeros((part.shape[0], 1), np.uint8), packed], axis=1).tobytes()

    pixels = samples.reshape(h, w, channels)
    if interlaced:  # Adam7: seven passes of sub-images, each its own scanlines
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        raw = b"".join(scanlines(pixels[y0::dy, x0::dx]) for x0, y0, dx, dy in passes)
    else:
        raw = scanlines(samples)
    chunks = [(b"IHDR", w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([depth, colour_type, 0, 0, int(interlaced)]))]
    if colour_type == 3:
        chunks.append((b"PLTE", rng.integers(0, 256, 3 << depth, dtype=np.uint8).tobytes()))
    return png_file([*chunks, (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])


@pytest.mark.parametrize(("colour_type", "depth"), [(0, 1), (0, 2), (0, 4), (0, 8), (3, 1), (3, 2), (3, 4), (3, 8),
                                                    (2, 8), (6, 8), (4, 8), (0, 16), (2, 16), (4, 16), (6, 16)])
@pytest.mark.parametrize("interlaced", [False, True])
def test_files_written_by_hand_decode_to_load_images_pixels(tmp_path: Path, colour_type: int, depth: int,
                                                            interlaced: bool) -> None:
    """Every colour type and bit depth, from files not written by PIL: grey of 1-4 bits scaled as PIL scales it,
    palettes looked up, alpha dropped; grey with alpha (colour type 4) and 16 bits a sample (which imagecodecs would
    give as uint16 for RGB and RGBA) go PIL's way."""
    rng = np.random.default_rng(colour_type * 16 + depth + 100 * interlaced)
    for i in range(5):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_by_hand(colour_type, depth, rng, interlaced))
        want = torch.from_numpy(np.asarray(load_image(path)).copy()).permute(2, 0, 1)
        got = png_pixels(path, lambda w, h: None)
        assert got is None if colour_type == 4 or depth == 16 else torch.equal(got, want)


def _damaged(data: bytes, rng: np.random.Generator) -> bytes:
    """`data` damaged one of the ways files are: bytes changed anywhere, the file cut short, the image data changed
    under a checksum written anew (as a faulty encoder would), a header field changed under a new checksum (the low
    bytes of the width and height only: a size in the millions would only make the test slow)."""
    out = bytearray(data)
    how = int(rng.integers(0, 4))
    if how == 0:
        for _ in range(int(rng.integers(1, 4))):
            out[int(rng.integers(8, len(out)))] = int(rng.integers(0, 256))
        return bytes(out)
    if how == 1:
        return bytes(out[: int(rng.integers(8, len(out)))])
    chunks = png_chunks(data)
    at = next(i for i, (kind, _) in enumerate(chunks) if kind == (b"IDAT" if how == 2 else b"IHDR"))
    body = bytearray(chunks[at][1])
    body[int(rng.integers(0, len(body))) if how == 2 else int(rng.choice([3, 7, 8, 9, 10, 11, 12]))] = int(
        rng.integers(0, 256))
    chunks[at] = (chunks[at][0], bytes(body))
    return png_file(chunks)


def test_damaged_files_decode_to_load_images_pixels_or_go_pils_way(tmp_path: Path) -> None:
    """Whatever the damage, a file png_pixels decodes is one PIL reads, to the same pixels, and none crashes the
    process (torchvision's libpng decoder did on some). Most of these files PIL refuses; pyspng, whose libspng checks
    no checksum, decodes 186 of them into pixels."""
    rng = np.random.default_rng(7)
    path, decoded, refused = tmp_path / "im.png", 0, 0
    for i in range(600):
        colour_type, depth = [(0, 1), (0, 8), (2, 8), (3, 4), (3, 8), (6, 8)][i % 6]
        path.write_bytes(_damaged(_by_hand(colour_type, depth, rng, interlaced=i % 4 == 0), rng))
        got = png_pixels(path, lambda w, h: None)
        try:
            want = torch.from_numpy(np.asarray(load_image(path)).copy()).permute(2, 0, 1)
        except LvlmlpError:
            want, refused = None, refused + 1
        assert got is None or (want is not None and torch.equal(got, want)), i
        decoded += got is not None
    assert decoded > 0 and refused > 400


def _pil_way(tmp_path: Path) -> dict[str, Path]:
    """Files png_pixels leaves to PIL, each written here."""
    rgb = Image.fromarray(PIXELS[..., :3])
    paths = {name: tmp_path / f"{i}.png" for i, name in enumerate(
        ["16 bits", "EXIF rotation", "EXIF rotation as text", "XMP rotation", "animation", "JPEG", "narrow",
         "truncated", "bad text checksum", "no IEND", "IHDR not first", "chunk length over 2**31"])}
    Image.fromarray(PIXELS[..., 0].astype(np.int32) * 257).convert("I;16").save(paths["16 bits"])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: PIL turns it upright
    rgb.save(paths["EXIF rotation"], exif=exif)
    raw = exif.tobytes().hex()  # ImageMagick's way: the EXIF block as hex in a text chunk
    rgb.save(paths["EXIF rotation as text"],
             pnginfo=_info(b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(f"\nexif\n{len(raw) // 2}\n{raw}".encode())))
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    rgb.save(paths["XMP rotation"], pnginfo=_info(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode()))
    rgb.save(paths["animation"], save_all=True, append_images=[Image.fromarray(PIXELS[..., 1:])])
    rgb.save(paths["JPEG"], format="JPEG")
    Image.fromarray(PIXELS[:, :3, :3]).save(paths["narrow"])  # 3 px wide: processors would guess the colour axis
    rgb.save(tmp_path / "whole.png", pnginfo=_info(b"tEXt", b"Comment\x00a comment"))
    whole = (tmp_path / "whole.png").read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    chunks = png_chunks(whole)
    bad = bytearray(png_file(chunks))
    text_at = bad.index(b"tEXt")
    bad[text_at + 4] ^= 1  # the comment's first byte: its checksum no longer matches
    paths["bad text checksum"].write_bytes(bytes(bad))
    paths["no IEND"].write_bytes(png_file(chunks[:-1]))
    paths["IHDR not first"].write_bytes(png_file([chunks[1], chunks[0], *chunks[2:]]))
    # PNG lengths are unsigned and under 2**31; read as signed, 0xFFFFFFF4 would be -12 and loop on the same chunk
    paths["chunk length over 2**31"].write_bytes(png_file(chunks[:1]) + b"\xff\xff\xff\xf4IDAT" + bytes(16))
    return paths


def test_files_it_is_not_sure_of_go_pils_way(tmp_path: Path) -> None:
    paths = _pil_way(tmp_path)
    for name, path in paths.items():
        assert png_pixels(path, lambda w, h: None) is None, name
    assert png_pixels(tmp_path / "missing.png", lambda w, h: None) is None
    for rotated in ("EXIF rotation", "EXIF rotation as text", "XMP rotation"):  # what the PIL way does: upright
        assert load_image(paths[rotated]).size == (37, 53), rotated
    with pytest.raises(LvlmlpError, match="row 't': unreadable image"):
        load_image(paths["truncated"], "t")


def test_the_backends_check_and_pils_pixel_limit_send_an_image_pils_way(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "im.png"
    Image.fromarray(PIXELS[..., :3]).save(path)
    seen = []
    assert png_pixels(path, lambda w, h: seen.append((w, h)) or "too large") is None
    assert seen == [(53, 37)]  # the header's size, before any decoding
    assert png_pixels(path, lambda w, h: None) is not None
    # The check sees the header's full 32-bit width and height (header-only files: nothing to decode after it).
    ihdr = png_chunks(path.read_bytes())[0][1]
    for size in ((1 << 24) + 100, 1), (5, (1 << 24) + 7):  # under PIL's pixel limit
        huge = tmp_path / "huge.png"
        huge.write_bytes(png_file([(b"IHDR", size[0].to_bytes(4, "big") + size[1].to_bytes(4, "big") + ihdr[8:]),
                               (b"IEND", b"")]))
        seen.clear()
        assert png_pixels(huge, lambda w, h: seen.append((w, h))) is None and seen == [size]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 53 * 37)  # PIL warns over its limit, not at it
    assert png_pixels(path, lambda w, h: None) is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 53 * 37 - 1)  # over it: that is PIL's way to say
    assert png_pixels(path, lambda w, h: None) is None


@pytest.mark.parametrize("width", [4, 5])
def test_images_up_to_4_pixels_wide_go_pils_way(tmp_path: Path, width: int) -> None:
    """A processor given a (3, H, 1-4) tensor would have to guess which axis holds the colours."""
    path = tmp_path / "im.png"
    Image.fromarray(PIXELS[:, :width, :3]).save(path)
    got = png_pixels(path, lambda w, h: None)
    assert got is None if width == 4 else torch.equal(got, torch.from_numpy(PIXELS[:, :width, :3]).permute(2, 0, 1))


def test_a_batch_of_png_and_other_rows_equals_the_pil_way(tiny_ckpt, tmp_path: Path, monkeypatch) -> None:
    """`_prepare` with tensors for PNG rows gives the batch (and the failures) of PIL images for every row: the
    processor's output is the reference, since it reads more of a PIL image than its pixels (a transparent colour).
    The PNG rows do reach the processor as tensors, and only where the backend takes them."""
    be = Backend(tiny_ckpt("llava"), device="cpu")
    assert be.tensor_images
    kinds, broken = _kinds(), _pil_way(tmp_path)
    rows = []
    for i, name in enumerate(kinds):
        image, options = kinds[name]
        image.save(tmp_path / f"row{i}.png", **options)
        rows.append({"id": f"r{i}", "image": str(tmp_path / f"row{i}.png"), "question": "what is it?"})
    rows += [{"id": f"x-{name}", "image": str(broken[name]), "question": "and this?"}
             for name in ("JPEG", "EXIF rotation", "EXIF rotation as text", "XMP rotation", "truncated")]
    given: list[list[str]] = []  # the kind of each image the processor was given, a list per batch
    collate = be.collate
    monkeypatch.setattr(be, "collate", lambda images, questions: (
        given.append([type(im).__name__ for im in images]), collate(images, questions))[1])
    tensors = loader._prepare(be, rows)
    be.tensor_images = False
    pil = loader._prepare(be, rows)
    assert given[0][0] == "Tensor" and "Tensor" not in given[1]
    assert tensors[0] == pil[0] and len(tensors[0]) == len(kinds) + 4  # the truncated file fails, the same way
    assert tensors[2] == pil[2] and [row_id for row_id, _ in pil[2]] == ["x-truncated"]
    assert tensors[1].keys() == pil[1].keys() and all(torch.equal(tensors[1][k], pil[1][k]) for k in pil[1])


def test_without_imagecodecs_every_file_goes_pils_way(tmp_path: Path, monkeypatch) -> None:
    """imagecodecs comes with the `vision` extra: where it is missing (or built without libspng), nothing is decoded
    here and `load_image` reads every file."""
    from lvlmlp.extraction import png

    path = tmp_path / "im.png"
    Image.fromarray(PIXELS[..., :3]).save(path)
    assert png_pixels(path, lambda w, h: None) is not None
    monkeypatch.setattr(png, "SPNG", None)
    assert png_pixels(path, lambda w, h: None) is None
    monkeypatch.setattr(png, "SPNG", type("SPNG", (), {"available": False}))
    assert png_pixels(path, lambda w, h: None) is None
