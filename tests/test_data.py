"""Manifest validation and image loading: every PIL mode becomes the RGB image a person would see."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lvlmlp import LvlmlpError
from lvlmlp.data import check_images_exist, check_rows, load_image, read_manifest


def _write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_manifest_resolves_images_and_keeps_metadata(tmp_path):
    m = _write(tmp_path / "m.jsonl", [{"id": "a", "image": "img/a.png", "question": "Q?", "label": 1, "x": [1]},
                                      {"id": 7, "image": "/abs/b.png", "question": "R?"}])
    rows = read_manifest(m)
    assert rows[0] == {"id": "a", "image": str(tmp_path / "img" / "a.png"), "question": "Q?", "label": 1, "x": [1]}
    assert rows[1]["id"] == "7" and rows[1]["image"] == "/abs/b.png"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": "a", "image": "a.png", "question": "Q"}', "{not json"], r"m.jsonl:2: line is not JSON"),
        ([{"id": "a", "image": "a.png", "question": "Q"}, {"id": "a", "image": "b.png", "question": "Q"}],
         "duplicate id 'a'"),
        ([{"id": "a", "image": "a.png", "question": "  "}], "row 'a': missing or empty 'question'"),
        ([{"id": "a", "image": "a.png"}], "row 'a': missing or empty 'question'"),
        ([{"id": "a", "question": "Q"}], "row 'a': missing 'image'"),
        ([{"id": "a", "image": "a.png", "question": "Q", "label": "yes"}], "row 'a': 'label' must be an int"),
    ],
)
def test_manifest_errors_name_the_row(tmp_path, lines, message):
    with pytest.raises(LvlmlpError, match=message):
        read_manifest(_write(tmp_path / "m.jsonl", lines))


def test_image_modes_become_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    cases = {
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((6, 5), 255, np.uint8)])),
        "p.png": Image.fromarray(rgb).quantize(16),
        "l.png": Image.fromarray(rgb[..., 0]),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "i16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = load_image(tmp_path / name, name)
        assert out.mode == "RGB" and out.size == (5, 6), name
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgb)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "l.png"))[..., 1], rgb[..., 0])
    # 16-bit values are scaled, not clipped at 255 (which would give a white image)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "i16.png"))[..., 0], rgb[..., 0])


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (8, 4), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (4, 8)


def test_the_row_check_names_every_image_that_is_not_a_regular_file(tmp_path):
    """One stat a row, before any model work: missing files, folders, broken links and unencodable paths are named
    (the first one stops a run that may not skip rows); a link to an image is an image."""
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "ok.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    names = ["ok.png", "nope.png", "folder.png", "link.png", "dangling.png"]
    rows = [{"id": f"r{i}", "image": str(tmp_path / name), "question": "Q?"} for i, name in enumerate(names)]
    rows.append({"id": "nul", "image": "a\0b.png", "question": "Q?"})
    assert check_images_exist(rows, "m.jsonl") == [
        ("r1", f"m.jsonl: row 'r1': image not found: {tmp_path / 'nope.png'}"),
        ("r2", f"m.jsonl: row 'r2': image is not a regular file: {tmp_path / 'folder.png'}"),
        ("r4", f"m.jsonl: row 'r4': image is a broken or looping symbolic link: {tmp_path / 'dangling.png'}"),
        ("nul", "m.jsonl: row 'nul': image not found: a\0b.png"),
    ]
    with pytest.raises(LvlmlpError, match=r"^m.jsonl: row 'r1': image not found: "):
        check_rows(rows, "m.jsonl")
    check_rows(rows, "m.jsonl", on_error="skip")  # skipped rows are the extraction's to record


def test_missing_truncated_and_garbage_images(tmp_path):
    with pytest.raises(LvlmlpError, match=r"row 'x': image not found: .*nope.png"):
        load_image(tmp_path / "nope.png", "x")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(LvlmlpError, match=r"row 'y': unreadable image .*cut.jpg"):
        load_image(tmp_path / "cut.jpg", "y")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(LvlmlpError, match=r"row 'z': unreadable image"):
        load_image(tmp_path / "junk.png", "z")
