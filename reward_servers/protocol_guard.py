"""Request hardening shared by the reward servers in this folder (protocol ``raygrpo.reward/v1``).

It imports nothing from raygrpo: copy it next to a copied ``template_server.py``. Every limit bounds
what a request can cost *before* the server pays it, and every refusal names the limit:

* **Token**: checked from the headers; without the right one the answer is 401 before a byte of the
  body is read.
* **Body size**: over ``max_request_bytes`` is a 413: from ``Content-Length`` before reading, else as
  soon as the running count passes the limit.
* After a 401 or 413 sent before the body was read, uvicorn reads the rest of the body and drops it,
  without the app and without keeping it, so that a client that sends its whole body before reading
  (httpx, raygrpo's client) still sees the status: an asyncio client whose connection is closed while
  it sends gets a reset instead, and retries. Only bodies declared at most ``DISCARD_FACTOR`` x
  ``max_request_bytes`` long are dropped like that; for larger ones, or chunked ones that declare no
  length, the answer closes the connection.
* **Body time**: the whole body must arrive within ``body_timeout_s`` of the server starting to read
  it; a client that stalls or trickles gets a 408 and the connection is closed.
* **JSON**: parsed here, not by FastAPI: text that is not JSON, or JSON nested deeper than the parser's
  recursion limit (``[[[[...``), is a 400, never a 500.
* **Decoded size**: an image's width and height come from its PNG header, a video's width, height and
  frame count from its MP4 tables (PyAV reads them without decoding a frame). One image or video
  frame over ``max_image_pixels``, or all media of a request together over ``max_request_pixels``
  (videos count frames x width x height), is a 413 before anything is decoded. (A 105 KB PNG can
  declare 9000x9000 pixels and take gigabytes to decode.) raygrpo's client halves a batch refused
  with 413, so a request that is too large only in total is still scored, in smaller requests; an
  item too large on its own fails alone, with the message.

Use :func:`read_score_request` in the ``POST /v1/score`` handler, then :func:`open_items` (in a
worker thread: it base64-decodes) before decoding anything, and :func:`open_references` for a reward that
reads the items' optional ``reference`` images; :func:`add_server_flags` and
:func:`run` give every server the same command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import ipaddress
import json
import os
import secrets
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from pydantic import BaseModel, ValidationError

PROTOCOL = "raygrpo.reward/v1"
MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DISCARD_FACTOR = 4  # a refused body up to 4 x max_request_bytes is read and dropped, a longer one cut off


@dataclass(frozen=True)
class Limits:
    """What one request may cost a server; every field must be positive."""

    max_request_bytes: int = 64 * MiB
    """Largest request body. Base64 makes media about 4/3 of their file size."""
    body_timeout_s: float = 60.0
    """Seconds the whole body may take to arrive, from when the server starts reading it."""
    max_image_pixels: int = 4096 * 4096
    """Largest image, or video frame: width x height."""
    max_request_pixels: int = 1 << 28
    """All media of one request together, videos as frames x width x height (2**28 pixels are 768 MiB as RGB)."""

    def __post_init__(self) -> None:
        for field in fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"Limits.{field.name} must be positive, got {getattr(self, field.name)!r}")


# ------------------------------------------------------------------------------------------------
# The request: token, body, JSON, envelope
# ------------------------------------------------------------------------------------------------


def require_token(request: Request, token: str | None, limits: Limits) -> None:
    """401 unless ``Authorization: Bearer <token>`` (no check when ``token`` is None). Reads headers only."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not reveal how many leading characters were right.
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
        headers = {"WWW-Authenticate": "Bearer", **_unread_body_headers(request, limits)}
        raise HTTPException(401, "missing or wrong bearer token", headers=headers)


def _unread_body_headers(request: Request, limits: Limits) -> dict[str, str]:
    """Headers of an answer sent before the body is read: close the connection unless uvicorn may drop the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= DISCARD_FACTOR * limits.max_request_bytes:
        return {}
    return {"Connection": "close"}


async def read_body(request: Request, limits: Limits) -> bytes:
    """The whole body, or 413 (too large) / 408 (too slow) as soon as either is certain."""
    limit = limits.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        detail = f"request body of {int(declared)} bytes exceeds this server's max_request_bytes of {limit} bytes"
        raise HTTPException(413, detail, headers=_unread_body_headers(request, limits))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout_s
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), timeout=max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            # Closing the connection (not keep-alive) is what frees the server from a stalled client.
            detail = f"request body not received within this server's body_timeout_s of {limits.body_timeout_s:g} s"
            raise HTTPException(408, detail, headers={"Connection": "close"}) from None
        if message["type"] == "http.disconnect":
            raise HTTPException(400, "client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:  # chunked bodies declare no length
            detail = f"request body exceeds this server's max_request_bytes of {limit} bytes"
            raise HTTPException(413, detail, headers=_unread_body_headers(request, limits))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """The decoded JSON; 400 for anything else, deep nesting included."""
    try:
        return json.loads(body)
    except RecursionError:
        raise HTTPException(400, "request JSON is nested too deeply to parse (protocol v1 requests are a few levels deep)") from None
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise HTTPException(400, f"request body is not JSON: {exc}") from None


RequestModel = TypeVar("RequestModel", bound=BaseModel)


async def read_score_request(
    request: Request, model: type[RequestModel], *, token: str | None, max_batch: int, limits: Limits
) -> RequestModel:
    """The body of ``POST /v1/score`` validated as ``model`` (a pydantic model with ``protocol`` and ``items``).

    Checked in order, so the cheapest refusal comes first: token (401), body size and time (413,
    408), JSON (400), protocol (400), item count (413), field types (422), unique item ids (400).
    """
    require_token(request, token, limits)
    payload = parse_json(await read_body(request, limits))
    if not isinstance(payload, dict):
        raise HTTPException(400, "request body must be a JSON object")
    if payload.get("protocol") != PROTOCOL:
        raise HTTPException(400, f"unsupported protocol {payload.get('protocol')!r}; this server speaks {PROTOCOL!r}")
    items = payload.get("items")
    if isinstance(items, list) and len(items) > max_batch:
        raise HTTPException(413, f"batch of {len(items)} items exceeds this server's max_batch of {max_batch} (see GET /v1/info)")
    try:
        parsed = model.model_validate(payload)
    except ValidationError as exc:
        problems = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()[:20]]
        raise HTTPException(422, {"message": "request does not match protocol v1", "errors": problems}) from None
    except RecursionError:  # a deep value below the JSON parser's limit can still exhaust the validator's
        raise HTTPException(400, "request JSON is nested too deeply to validate") from None
    ids = [item.id for item in parsed.items]
    if len(set(ids)) != len(ids):
        raise HTTPException(400, "item ids must be unique within a request")
    return parsed


# ------------------------------------------------------------------------------------------------
# Media: size from the header, then decode
# ------------------------------------------------------------------------------------------------


class Item(Protocol):
    id: str
    media_type: str
    data: str


class _BadMedia(ValueError):
    """A file this module refuses with its own message (not re-wrapped as a decoder error)."""


@dataclass(frozen=True)
class Media:
    """One item's PNG or MP4 file, its size read from the header; nothing decoded until :meth:`decode`."""

    media_type: str
    raw: bytes
    width: int
    height: int
    frames: int  # 1 for an image

    @property
    def pixels(self) -> int:
        return self.frames * self.width * self.height

    def describe(self) -> str:
        size = f"{self.width}x{self.height}"
        return f"image of {size}" if self.media_type == "image/png" else f"video of {self.frames} frames of {size}"

    def decode(self) -> np.ndarray:
        """``[H, W, 3]`` uint8 for an image, ``[F, H, W, 3]`` for a video; ValueError for a corrupt file."""
        return _decode_png(self) if self.media_type == "image/png" else _decode_mp4(self)


def open_media(media_type: str, data: str) -> Media:
    """Base64-decode ``data`` and read its header; ValueError saying what is wrong with the file."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data is not valid base64: {exc}") from None
    if media_type == "image/png":
        width, height = _png_size(raw)
        return Media(media_type, raw, width, height, 1)
    if media_type == "video/mp4":
        return Media(media_type, raw, *_mp4_size(raw))
    raise ValueError(f"unsupported media_type {media_type!r}")


def open_items(items: Sequence[Item], accepted: Sequence[str], limits: Limits) -> dict[str, Media | str]:
    """Each item's :class:`Media`, or the error that fails that item alone; 413 when over the pixel limits.

    Nothing is decoded yet: the 413 comes first, from the headers. Run it in a worker thread.
    """
    opened: dict[str, Media | str] = {}
    for item in items:
        if item.media_type not in accepted:
            opened[item.id] = f"unsupported media_type {item.media_type!r}; this server accepts {list(accepted)}"
            continue
        try:
            opened[item.id] = open_media(item.media_type, item.data)
        except ValueError as exc:
            opened[item.id] = str(exc)
    _check_pixels({item_id: m for item_id, m in opened.items() if isinstance(m, Media)}, limits, "media")
    return opened


def open_references(items: Sequence[Item], limits: Limits) -> dict[str, Media | str]:
    """Each item's optional ``reference`` (base64 PNG of the image an edit or image-to-video item was made from) as
    :class:`Media`, or the error that fails that item alone; items without one are left out. 413 when over the pixel
    limits, which bound a request's references as they bound its media, on their own. Run it in a worker thread."""
    opened: dict[str, Media | str] = {}
    for item in items:
        reference = getattr(item, "reference", None)
        if reference is None:
            continue
        try:
            opened[item.id] = open_media("image/png", reference)
        except ValueError as exc:
            opened[item.id] = f"reference: {exc}"
    _check_pixels({item_id: m for item_id, m in opened.items() if isinstance(m, Media)}, limits, "references")
    return opened


def _check_pixels(media: dict[str, Media], limits: Limits, what: str) -> None:
    """413 when one image (video frame) is over ``max_image_pixels`` or all of ``media`` over ``max_request_pixels``."""
    for item_id, m in media.items():
        if m.width * m.height > limits.max_image_pixels:
            raise HTTPException(
                413, f"item {item_id!r}: {m.describe()} has {m.width * m.height} pixels per image, over this server's "
                f"max_image_pixels of {limits.max_image_pixels}; refused before decoding",
            )  # fmt: skip
    total = sum(m.pixels for m in media.values())
    if total > limits.max_request_pixels:
        largest_id = max(media, key=lambda i: media[i].pixels)
        raise HTTPException(
            413, f"the {what} of this request hold {total} pixels (videos: frames x width x height), over this server's "
            f"max_request_pixels of {limits.max_request_pixels}; the largest is item {largest_id!r}, "
            f"{media[largest_id].describe()}; send fewer items per request",
        )  # fmt: skip


def _png_size(raw: bytes) -> tuple[int, int]:
    # Width and height sit at fixed offsets in the IHDR chunk, which PNG requires to come first.
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError("data is not a PNG file (bad signature)")
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise ValueError("cannot decode PNG: no IHDR header")
    width, height = struct.unpack(">II", raw[16:24])
    if width == 0 or height == 0:
        raise ValueError(f"cannot decode PNG: header says {width}x{height}")
    return width, height


def _decode_png(media: Media) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(media.raw), formats=["PNG"]) as image:
            if image.size != (media.width, media.height):
                raise _BadMedia(f"cannot decode PNG: Pillow reads {image.size}, the header {(media.width, media.height)}")
            image.load()
            # Alpha is dropped, palette and grey images expanded: rewards see RGB only.
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except _BadMedia:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for corrupt files
        raise ValueError(f"cannot decode PNG: {type(exc).__name__}: {exc}") from None


def _mp4_size(raw: bytes) -> tuple[int, int, int]:
    import av  # only servers that accept video need PyAV

    try:
        # Opening reads the container's tables (the moov box), not the frames.
        with av.open(io.BytesIO(raw), mode="r") as container:
            if not container.streams.video:
                raise _BadMedia("MP4 has no video stream")
            stream = container.streams.video[0]
            width, height, frames = stream.codec_context.width, stream.codec_context.height, stream.frames
    except _BadMedia:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types (InvalidDataError, ...) for bad files
        raise ValueError(f"cannot decode MP4: {type(exc).__name__}: {exc}") from None
    if width <= 0 or height <= 0:
        raise ValueError("cannot decode MP4: its header gives no frame size")
    if frames <= 0:
        raise ValueError("MP4 header gives no frame count (a fragmented MP4?), so its size cannot be checked; send a plain MP4")
    return width, height, frames


def _decode_mp4(media: Media) -> np.ndarray:
    import av

    # Allocated once at the size the header declared (and the limits allowed); the file cannot make it grow.
    video = np.empty((media.frames, media.height, media.width, 3), np.uint8)  # [F, H, W, 3]
    count = 0
    try:
        with av.open(io.BytesIO(media.raw), mode="r") as container:
            for frame in container.decode(container.streams.video[0]):
                if (frame.width, frame.height) != (media.width, media.height):
                    raise _BadMedia(f"MP4 frame {count} is {frame.width}x{frame.height}, its header says {media.width}x{media.height}")
                if count == media.frames:
                    raise _BadMedia(f"MP4 holds more frames than the {media.frames} its header declares")
                video[count] = frame.to_ndarray(format="rgb24")  # [H, W, 3]
                count += 1
    except _BadMedia:
        raise
    except Exception as exc:  # noqa: BLE001 - PyAV raises many types for corrupt streams
        raise ValueError(f"cannot decode MP4: {type(exc).__name__}: {exc}") from None
    if count == 0:
        raise ValueError("MP4 has no decodable frames")
    return video[:count]


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_server_flags(parser: argparse.ArgumentParser, *, max_batch: int) -> None:
    """``--host --port --token-env --max-batch --log-level`` and one flag per :class:`Limits` field."""
    defaults = Limits()
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-env", help="NAME of an environment variable holding the bearer token clients must send")
    parser.add_argument("--max-batch", type=int, default=max_batch, help=f"most items per request (default {max_batch})")
    parser.add_argument("--max-request-mb", type=float, default=defaults.max_request_bytes / MiB,
                        help="largest request body, MiB (default 64)")  # fmt: skip
    parser.add_argument("--body-timeout-s", type=float, default=defaults.body_timeout_s,
                        help="seconds a request body may take to arrive before a 408 (default 60)")  # fmt: skip
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help="largest image or video frame, width x height (default 4096*4096)")  # fmt: skip
    parser.add_argument("--max-request-pixels", type=int, default=defaults.max_request_pixels,
                        help="all media of one request, videos as frames x width x height (default 2**28)")  # fmt: skip
    parser.add_argument("--log-level", default="info")


def limits_from_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Limits:
    try:
        return Limits(
            max_request_bytes=int(args.max_request_mb * MiB), body_timeout_s=args.body_timeout_s,
            max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))


def token_from_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The token in the variable ``--token-env`` names (never the token itself on the command line)."""
    if not args.token_env:
        return None
    token = os.environ.get(args.token_env)
    if not token:
        parser.error(f"environment variable {args.token_env!r} (--token-env) is not set or empty")
    return token


def run(app: FastAPI, args: argparse.Namespace, *, token: str | None) -> None:
    """Serve ``app`` with uvicorn on ``--host``/``--port``."""
    import uvicorn

    if token is None and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without a token; anyone who can reach it can use it", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
