"""POST /predict bodies -> uint8 (28, 28) images, with a 4xx and a plain reason for anything else.

Accepted: an image file as the raw body (``image/*`` or ``application/octet-stream``); ``multipart/form-data``
with one ``file`` or up to ``max_images`` ``files``; JSON ``{"pixels": 28x28}`` or ``{"images": [28x28, ...]}``
(numbers in [0, 255], white on black; dark on light is inverted). Serve does not limit request bodies, so the
size is checked here: from Content-Length before reading, and again while reading a body sent without one.
Images are decoded in a worker thread (tiny ones in place), after the pixels all of them declare are checked
against a per-request budget, so a request of large images neither blocks the replica's event loop nor exhausts
its memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from digits_ray.inference.images import ImageError, ImageLimits, declared_pixels, image_to_mnist, pixels_to_mnist
from digits_ray.schema import IMAGE_SIZE
from digits_ray.serve.settings import ServeSettings

ACCEPTED = (
    "POST an image file as the body (Content-Type image/png, image/jpeg, ... or application/octet-stream); "
    "multipart/form-data with a 'file' field (one image) or 'files' fields (a batch); or application/json "
    f'{{"pixels": {IMAGE_SIZE}x{IMAGE_SIZE} numbers in [0, 255]}} or {{"images": [such arrays]}}'
)
INLINE_DECODE_PIXELS = 128 * 128  # images declaring at most this many pixels in all decode on the event loop


class RequestError(Exception):
    """A request the server refuses: HTTP status and what was wrong (the response adds what is accepted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def body(self) -> dict[str, str]:
        return {"error": str(self), "accepted": ACCEPTED}


@dataclass
class Parsed:
    images: list[np.ndarray]
    batch: bool  # the client sent a batch form ('files' or "images"): the answer is a list


async def read_body(headers: Any, stream: AsyncIterator[bytes], limit: int) -> bytes:
    declared = headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise RequestError(400, f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise RequestError(413, f"the body is {int(declared):,} bytes; the limit is {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(payloads: Sequence[tuple[str, bytes]], settings: ServeSettings) -> list[np.ndarray]:
    """(label, encoded image) pairs -> framed images."""
    limits = ImageLimits(settings.max_image_pixels)
    images = []
    for label, data in payloads:
        try:
            images.append(image_to_mnist(data, limits))
        except ImageError as err:
            raise RequestError(422 if data else 400, f"{label}{err}") from None
    return images


async def decode(payloads: Sequence[tuple[str, bytes]], settings: ServeSettings) -> list[np.ndarray]:
    """Check the pixels the images declare (headers only), then decode them: in a worker thread, unless they
    are so small that the hop to a thread would cost more than decoding (a 28x28 PNG decodes in tens of
    microseconds, the replica's profile showed the hop costing more)."""
    total = sum(declared_pixels(data) for _, data in payloads)
    if total > settings.max_request_pixels:
        raise RequestError(413, f"the images declare {total:,} pixels in all; at most {settings.max_request_pixels:,} "
                                f"per request are accepted")
    if total <= INLINE_DECODE_PIXELS:
        return _decode(payloads, settings)
    return await asyncio.to_thread(_decode, payloads, settings)


def _count(n: int, settings: ServeSettings) -> None:
    if n == 0:
        raise RequestError(422, "the batch is empty: send at least one image")
    if n > settings.max_images:
        raise RequestError(413, f"{n} images in one request; at most {settings.max_images} are accepted")


def from_json(body: bytes, settings: ServeSettings) -> Parsed:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, integers over 4300 digits, deep nesting
        raise RequestError(400, f"the body is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(payload, dict) or len(set(payload) & {"pixels", "images"}) != 1:
        got = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise RequestError(422, f'JSON must be an object with "pixels" (one image) or "images" (a batch); got {got}')
    single = "pixels" in payload
    images = [payload["pixels"]] if single else payload["images"]
    if not isinstance(images, list):
        raise RequestError(422, f'"images" must be a list of {IMAGE_SIZE}x{IMAGE_SIZE} arrays')
    if not single:
        _count(len(images), settings)
    parsed = []
    for i, pixels in enumerate(images):
        try:
            parsed.append(pixels_to_mnist(pixels))
        except ImageError as err:
            raise RequestError(422, f"{'' if single else f'images[{i}]: '}{err}") from None
    return Parsed(parsed, batch=not single)


async def from_multipart(headers: Any, body: bytes, settings: ServeSettings) -> Parsed:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def replay() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(headers, replay(), max_files=settings.max_images, max_fields=8,
                             max_part_size=settings.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise RequestError(413 if "Too many" in str(err) else 400, f"bad multipart body: {err}") from None
    items = form.multi_items()
    names = sorted({name for name, _ in items})
    if names not in (["file"], ["files"]):
        raise RequestError(422, f"multipart fields must be 'file' (one image) or 'files' (a batch); got {names}")
    if names == ["file"] and len(items) != 1:
        raise RequestError(422, f"'file' holds one image; got {len(items)}: use 'files' for a batch")
    _count(len(items), settings)
    payloads = []
    for i, (name, value) in enumerate(items):
        if not isinstance(value, UploadFile):
            raise RequestError(422, f"field {name!r} #{i} is text, not a file upload")
        payloads.append((f"{value.filename or name} #{i}: ", await value.read()))
    return Parsed(await decode(payloads, settings), batch=names == ["files"])


async def parse(headers: Any, stream: AsyncIterator[bytes], settings: ServeSettings) -> Parsed:
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    raw_image = content_type.startswith("image/") or content_type in ("application/octet-stream", "")
    if not (raw_image or content_type in ("application/json", "multipart/form-data")):
        raise RequestError(415, f"Content-Type {content_type!r} is not accepted")
    body = await read_body(headers, stream, settings.max_body_bytes)
    if not body:
        raise RequestError(400, "the body is empty")
    if content_type == "application/json":
        return from_json(body, settings)
    if content_type == "multipart/form-data":
        return await from_multipart(headers, body, settings)
    return Parsed(await decode([("", body)], settings), batch=False)
