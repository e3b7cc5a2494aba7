"""Image intake and bad requests: an image whose processed size would take gigabytes is refused from its header,
before any pixel is decoded (server and extraction alike), and every malformed request is a 4xx naming its part.

Peak memory is read from the kernel (VmHWM of this process, reset through /proc/self/clear_refs): the server runs in
a thread of this process, the extraction with `--workers 0`. The tiny LLaVA's processor scales the shorter side to
28 pixels, so a 200000x1 PNG (a few hundred bytes) would become 28x5600000 pixels: gigabytes of float32.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size

from lvlmlp import open_run
from lvlmlp.cli import main
from lvlmlp.data import MAX_PROCESSED_PIXELS, load_image
from lvlmlp.errors import LvlmlpError
from lvlmlp.extraction.backend import Backend
from lvlmlp.serve import ServeConfig, create_app, load_engine
from tests.serve.test_serve import _post, data_url, message, running, world  # noqa: F401 - world: the module's fixture


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident size


def _peak_growth_mb(before: int) -> float:
    return (_vm("VmHWM") - before) / 1024


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB
    raise AssertionError(key)


def _png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    """The server with its default limits (4096x4096 pixels), no API key."""
    engine = load_engine(world["ckpt"], world["probe"], template="I cannot answer.", device="cpu")
    with running(create_app(engine, ServeConfig(model_id="m", default_max_tokens=2))) as url:
        yield url


def test_a_200000x1_png_is_refused_from_its_header_with_bounded_memory(world, server):  # noqa: F811
    png = _png_bytes((200_000, 1))
    assert len(png) < 2000 and 200_000 < MAX_PROCESSED_PIXELS  # small, and under --max-image-pixels as decoded
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    _reset_peak()
    before = _vm("VmRSS")
    response = _post(server, {"model": "m", "messages": message(url, "what is it ?")}, key=None)
    growth = _peak_growth_mb(before)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["message"] == (
        "messages[0].content[0].image_url: the image is 200000x1 pixels, which the model's processor would resize "
        f"to about {28 * 5_600_000} pixels; at most {MAX_PROCESSED_PIXELS} (--max-image-pixels): crop or pad an "
        "image of such an aspect ratio")
    assert growth < 100, f"the request took {growth:.0f} MB"  # the processor alone would take gigabytes
    # The estimate is the processor's resize: transformers' own rule makes a 2x100 image 28x1400 (shortest edge 28).
    backend = world["backend"]
    assert backend.processor.image_processor.size.shortest_edge == 28
    rule = get_resize_output_image_size(np.zeros((100, 2, 3), np.uint8), size=28, default_to_square=False,
                                        input_data_format="channels_last")
    assert backend.processed_pixels(2, 100) == rule[0] * rule[1] == 28 * 1400
    # An image of an ordinary shape is answered.
    ok = _post(server, {"model": "m", "messages": message(data_url(Image.new("RGB", (300, 40))), "what ?")}, key=None)
    assert ok.status_code == 200, ok.text


def test_bad_numbers_nesting_and_base64_are_4xx_naming_the_field(world, server):  # noqa: F811
    good = data_url(load_image(world["rows"][0]["image"]))

    def body(**kw):
        return {"model": "m", "messages": message(good, "what ?"), **kw}

    cases = [
        (body(seed=2**70, temperature=1), "seed: Input should be less than or equal to 18446744073709551615"),
        (body(seed=-(2**70)), "seed: Input should be greater than or equal to -9223372036854775808"),
        (body(max_tokens=2**70), f"max_tokens {2**70} is above this server's limit"),
        (body(temperature=2**70), "temperature: Input should be less than or equal to 2"),
        (body(messages=message("data:image/png;base64,abcde", "what ?")), "broken base64"),
        (body(messages=message("data:image/png;base64," + "A" * 5, "what ?")), "broken base64"),
    ]
    for payload, text in cases:
        response = _post(server, payload, key=None)
        assert response.status_code == 400 and text in response.json()["error"]["message"], (text, response.text)
    raw = [
        (json.dumps(body()).replace('"model"', '"temperature": NaN, "model"'), "temperature: "),
        (json.dumps(body()).replace('"model"', '"top_p": Infinity, "model"'), "top_p: "),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (json.dumps(body()).replace("what ?", "what \\ud800?"), "the question is not valid Unicode"),
        ('{"model": "m", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested too deeply"),
    ]
    for text_body, text in raw:
        response = _post(server, None, key=None, raw=text_body.encode())
        assert response.status_code == 400 and text in response.json()["error"]["message"], (text, response.text)
        assert "\n" not in response.json()["error"]["message"]
    # A PNG whose header declares a zero-width image: PIL refuses it on opening (a 400, not a 500).
    png = bytearray(_png_bytes((4, 4)))
    png[16:20] = (0).to_bytes(4, "big")  # IHDR width
    response = _post(server, body(messages=message("data:image/png;base64," + base64.b64encode(png).decode(),
                                                   "what ?")), key=None)
    assert response.status_code == 400, response.text
    assert "not a readable image/png image" in response.json()["error"]["message"]


def test_extraction_refuses_or_skips_a_100000x1_png_without_decoding_it(world, tmp_path, capsys):  # noqa: F811
    (tmp_path / "thin.png").write_bytes(_png_bytes((100_000, 1)))
    Image.new("RGB", (30, 20), "red").save(tmp_path / "ok.png")
    rows = [{"id": "ok", "image": "ok.png", "question": "what is it ?"},
            {"id": "thin", "image": "thin.png", "question": "what is it ?"}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["extract", "--model", str(world["ckpt"]), "--data", str(tmp_path / "data.jsonl"), "--device", "cpu",
            "--no-progress", "--workers", "0"]
    capsys.readouterr()
    _reset_peak()
    before = _vm("VmRSS")
    assert main([*base, "--out", str(tmp_path / "fail")]) == 2
    growth = _peak_growth_mb(before)
    err = capsys.readouterr().err.strip()
    assert err == (f"lvlmlp: error: {tmp_path / 'data.jsonl'}: row 'thin': {tmp_path / 'thin.png'}: the image is "
                   f"100000x1 pixels, which the model's processor would resize to about {28 * 2_800_000} pixels "
                   f"(aspect ratio 100000:1), more than {MAX_PROCESSED_PIXELS}; crop or pad it"), err
    assert growth < 200, f"the extraction took {growth:.0f} MB"
    assert main([*base, "--out", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    run = open_run(tmp_path / "skip")
    assert run.ids == ["ok"] and [f["id"] for f in run.failures] == ["thin"]
    # load_image's check sees the header's size before decoding; without a check the image loads as it is.
    with pytest.raises(LvlmlpError, match="row 'thin': .*: too wide"):
        load_image(tmp_path / "thin.png", "thin", check=lambda w, h: "too wide" if w > 10 * h else None)
    assert load_image(tmp_path / "ok.png", "ok", check=Backend.oversized.__get__(world["backend"])).size == (30, 20)


def test_clip_features_refuse_or_skip_a_100000x1_png_too(tmp_path):
    """The CLIP baseline's processor scales the shorter side as well (32 pixels in the tiny CLIP): the same check."""
    from lvlmlp.extraction.clip_features import extract_clip, tiny_clip

    (tmp_path / "thin.png").write_bytes(_png_bytes((100_000, 1)))
    Image.new("RGB", (30, 20), "red").save(tmp_path / "ok.png")
    rows = [{"id": "ok", "image": str(tmp_path / "ok.png"), "question": "what is it ?"},
            {"id": "thin", "image": str(tmp_path / "thin.png"), "question": "what is it ?"}]
    model = tiny_clip(tmp_path / "clip")
    _reset_peak()
    before = _vm("VmRSS")
    with pytest.raises(LvlmlpError, match=r"clip: row 'thin': .*thin.png: the image is 100000x1 pixels, which the "
                                          rf"model's processor would resize to about {32 * 3_200_000} pixels"):
        extract_clip(model, rows, {"image": tmp_path / "fail"}, device="cpu", progress=False)
    assert _peak_growth_mb(before) < 200
    runs = extract_clip(model, rows, {"image": tmp_path / "skip"}, device="cpu", on_error="skip", progress=False)
    assert runs["image"].ids == ["ok"] and [f["id"] for f in runs["image"].failures] == ["thin"]


def test_a_backend_without_its_own_check_refuses_images_over_the_pixel_bound():
    """A `--backend` class need not say what its processor makes of an image: the decoded size is bounded then."""
    from lvlmlp.data import MAX_PROCESSED_PIXELS, image_check, too_many_pixels

    class Plain:  # a protocol backend (docs/backends.md) without `oversized`
        pass

    assert image_check(Plain()) is too_many_pixels
    assert too_many_pixels(4096, 4096) is None and MAX_PROCESSED_PIXELS == 4096 * 4096
    assert too_many_pixels(100000, 200) == "100000x200 pixels: over the 16,777,216 an image may have"

    class Own:
        def oversized(self, width: int, height: int) -> str | None:
            return "mine"

    own = Own()
    assert image_check(own)(1, 1) == "mine"
