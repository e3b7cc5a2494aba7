"""The OpenAI chat-completions request, checked: one user message with one image and a question.

`ChatRequest` is the request body (pydantic; unknown fields such as `user` or `stream_options` are accepted and
ignored). `read_prompt` turns its messages into the (image, question) pair the backend and the probe work on, and
raises `ApiError` with the HTTP status and a one-line message for everything a client can get wrong.

Only a single user turn is served: the probe was trained on the first-token logits of the backend's one-turn prompt
(image, then question), and its verdict means nothing for another prompt shape.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from lvlmlp.data import load_image, to_rgb  # to_rgb: the same conversion as an image read from a manifest
from lvlmlp.errors import LvlmlpError

# Media types a data URL may carry, and the PIL formats that may be inside (a PNG sent as image/jpeg is fine).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
PIL_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "MPO"}


class ApiError(Exception):
    """An error answered in the OpenAI schema: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None  # a few clients send the URL itself


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    # allow_inf_nan=False: JSON's NaN / Infinity (Python's json reads them) are refused, never compared.
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool = False
    n: Literal[1] | None = 1  # one choice per request: n > 1 is refused rather than silently answered once
    stop: None = None  # stop sequences are not implemented: refused rather than ignored
    logprobs: Literal[False] | None = None


@dataclass(frozen=True)
class Limits:
    """What one request may send (the server's flags). `max_image_pixels` bounds an image as decoded and as the
    model's processor would resize it (`processed`: `Backend.processed_pixels`, set by `create_app`), both checked
    from the image's header before any pixel is decoded: one request's image then takes at most about 40 bytes a
    pixel of it in the processor (under 1 GB at the default 4096x4096; docs/serve.md)."""

    max_image_bytes: int = 10 << 20
    max_image_pixels: int = 4096 * 4096
    max_prompt_chars: int = 8000
    allow_local_images: bool = False
    processed: Callable[[int, int], int] | None = None


def read_prompt(request: ChatRequest, limits: Limits) -> tuple[Image.Image, str]:
    """The request's image (RGB) and question, or an `ApiError` naming the part at fault."""
    if len(request.messages) != 1 or request.messages[0].role != "user":
        roles = ", ".join(m.role for m in request.messages)
        raise ApiError(400, f"messages: this server answers one user message (an image and a question), as its "
                            f"probe was trained on; got the roles [{roles}]", param="messages")
    content = request.messages[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    texts: list[str] = []
    images: list[tuple[int, str]] = []
    for i, part in enumerate(parts):
        where = f"messages[0].content[{i}]"
        if part.type == "text":
            texts.append(part.text or "")
        elif part.type == "image_url":
            if part.image_url is None:
                raise ApiError(400, f"{where}: an image_url part needs image_url.url", param=where)
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append((i, url))
        else:
            raise ApiError(400, f"{where}: unsupported content type {part.type!r} (use text and image_url)",
                           param=where)
    if not images:
        raise ApiError(400, "messages[0]: no image; send one image_url part (a data:image/...;base64 URL)",
                       param="messages")
    if len(images) > 1:
        raise ApiError(400, f"messages[0]: {len(images)} images; this server takes exactly one per request",
                       param="messages")
    question = "\n".join(t for t in texts if t)
    if not question.strip():
        raise ApiError(400, "messages[0]: no question text; send a text part beside the image", param="messages")
    try:
        question.encode("utf-8")  # JSON's \ud800 escapes give lone surrogates, which no tokenizer takes
    except UnicodeEncodeError as err:
        raise ApiError(400, f"messages[0]: the question is not valid Unicode (a lone surrogate at character "
                            f"{err.start})", param="messages") from None
    if len(question) > limits.max_prompt_chars:
        raise ApiError(400, f"messages[0]: the question has {len(question)} characters; this server accepts at most "
                            f"{limits.max_prompt_chars} (--max-prompt-chars)", param="messages",
                       code="context_length_exceeded")
    index, url = images[0]
    return read_image(url, limits, f"messages[0].content[{index}].image_url"), question


def read_image(url: str, limits: Limits, where: str) -> Image.Image:
    """A data URL (base64) or, with `allow_local_images`, a local path or file:// URL; never a remote fetch."""
    if url.startswith("data:"):
        return _decode_data_url(url, limits, where)
    if url.startswith(("http://", "https://", "ftp://")):
        raise ApiError(400, f"{where}: remote image URLs are never fetched; send the image inline as a data URL "
                            "(data:image/png;base64,...)", param=where)
    if not limits.allow_local_images:
        raise ApiError(400, f"{where}: not a data URL; local image paths are served only with --allow-local-images",
                       param=where)
    path = Path(url.removeprefix("file://"))
    if path.is_file() and path.stat().st_size > limits.max_image_bytes:
        raise ApiError(413, f"{where}: the image file has {path.stat().st_size} bytes; at most "
                            f"{limits.max_image_bytes} (--max-image-bytes)", param=where)
    too_large: list[str] = []

    def check(width: int, height: int) -> str | None:  # from the header, before decoding
        too_large[:] = [message] if (message := _pixels_problem(width, height, limits, where)) else []
        return too_large[0] if too_large else None

    try:
        return load_image(path, where, check=check)
    except LvlmlpError as err:
        if too_large:
            raise ApiError(413, too_large[0], param=where) from None
        raise ApiError(400, str(err), param=where) from None


def _decode_data_url(url: str, limits: Limits, where: str) -> Image.Image:
    header, sep, payload = url[len("data:"):].partition(",")
    media_type, *params = header.split(";")
    media_type = media_type.strip().lower()
    if not sep or "base64" not in params:
        raise ApiError(400, f"{where}: expected a base64 data URL (data:image/png;base64,...)", param=where)
    if media_type not in IMAGE_TYPES:
        raise ApiError(415, f"{where}: unsupported image type {media_type or 'none'!r} "
                            f"(supported: {', '.join(IMAGE_TYPES)})", param=where)
    # 4 base64 characters carry 3 bytes: refuse before decoding what would be too large anyway.
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, f"{where}: the image has about {len(payload) * 3 // 4} bytes; at most "
                            f"{limits.max_image_bytes} (--max-image-bytes)", param=where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: broken base64 in the data URL", param=where) from None
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ApiError(400, f"{where}: the data is not a readable {media_type} image", param=where) from None
    except Image.DecompressionBombError as err:
        raise ApiError(413, f"{where}: {err}", param=where) from None
    except Exception as err:  # noqa: BLE001 - a corrupt header: PIL raises several types (SyntaxError, struct.error)
        raise ApiError(400, f"{where}: the data is not a readable {media_type} image ({_first_line(err)})",
                       param=where) from None
    if image.format not in PIL_FORMATS:
        raise ApiError(415, f"{where}: unsupported image format {image.format} "
                            f"(supported: {', '.join(sorted(PIL_FORMATS))})", param=where)
    _check_pixels(image, limits, where)  # before decoding the pixels: a small file can hold a huge image
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as err:  # noqa: BLE001 - PIL raises several types for truncated or corrupt data
        raise ApiError(400, f"{where}: the image cannot be decoded ({_first_line(err)})", param=where) from None
    return to_rgb(image)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _pixels_problem(w: int, h: int, limits: Limits, where: str) -> str | None:
    if w * h > limits.max_image_pixels:
        return f"{where}: the image is {w}x{h} pixels; at most {limits.max_image_pixels} pixels (--max-image-pixels)"
    processed = limits.processed(w, h) if limits.processed is not None else w * h
    if processed > limits.max_image_pixels:
        return (f"{where}: the image is {w}x{h} pixels, which the model's processor would resize to about "
                f"{processed} pixels; at most {limits.max_image_pixels} (--max-image-pixels): crop or pad an image "
                "of such an aspect ratio")
    return None


def _check_pixels(image: Image.Image, limits: Limits, where: str) -> None:
    problem = _pixels_problem(*image.size, limits, where)
    if problem:
        raise ApiError(413, problem, param=where)
