"""Serve any raygrpo reward over HTTP protocol ``raygrpo.reward/v1``.

Usage::

    python reward_servers/serve_builtin.py --kind jpeg_compressibility --params '{"quality": 95}' \\
        --host 127.0.0.1 --port 8000 [--token-env NAME] [--max-batch 64] [--max-request-mb 64]

Useful to run a reward in a separate process or on another machine (raygrpo's trainer then uses
``kind: http``), and as the reference implementation of the server side of the protocol; the
client side is ``raygrpo/reward/http.py``. :func:`create_app` wraps an already built
:class:`~raygrpo.reward.builtin.Reward` in a FastAPI app, for tests and for embedding.

What the server guarantees (and clients rely on):

* Media: ``image/png`` always; ``video/mp4`` too when the reward scores videos ``[N, F, H, W, 3]``
  (``frame_average``, e.g. ``--kind frame_average --params '{"reward": {"kind": "brightness"}}'``).
  An MP4 is decoded to its frames (all of them; the reward picks which to score), and videos of
  different shapes are scored as separate batches.
* ``POST /v1/score`` answers 200 whenever the request is well formed, with one result per item,
  ids echoed: an item that cannot be decoded or scored gets ``score: null`` and an ``error``, so one
  bad image never costs its batch. A reward that raises fails only the items it was scoring.
* Malformed requests get a 4xx with a ``detail`` saying what is wrong, never a 500: 400 (not JSON,
  wrong ``protocol``, duplicate ids), 401 (token missing or wrong), 413 (more items than
  ``max_batch`` or a body over ``max_request_bytes``), 422 (fields of the wrong type).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import ipaddress
import json
import os
import secrets
import sys
from collections import defaultdict
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from raygrpo.reward.builtin import Reward, make_reward
from raygrpo.reward.http import PROTOCOL, ScoreItem, ScoreRequest, ScoreResult, ServerInfo
from raygrpo.reward.media import decode_mp4
from raygrpo.reward.models.video import FrameAverage

MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_MEDIA_TYPES = ["image/png"]
VIDEO_MEDIA_TYPES = ["image/png", "video/mp4"]
MEDIA_TYPES = IMAGE_MEDIA_TYPES  # of a reward that scores images only

# A request refused early (401, 413) is still read to its end, up to this many bytes: a server that
# answers and closes while the client is still sending makes many clients see a connection reset
# instead of the status, and a reset is retried where a 401 or 413 is not.
_DRAIN_LIMIT = 256 * MiB


def media_types_for(reward: Reward) -> list[str]:
    """What ``reward`` can score: videos only if it accepts ``[N, F, H, W, 3]`` arrays."""
    return list(VIDEO_MEDIA_TYPES if isinstance(reward, FrameAverage) else IMAGE_MEDIA_TYPES)


def create_app(
    reward: Reward,
    *,
    name: str,
    token: str | None = None,
    max_batch: int = 64,
    max_request_bytes: int = 64 * MiB,
    media_types: list[str] | None = None,
) -> FastAPI:
    """A FastAPI app serving ``reward`` over protocol v1.

    ``token``: the bearer token clients must send to ``POST /v1/score`` (None: no auth). Health and
    info stay open, as load balancers and the client's readiness check expect. ``media_types``:
    what ``/v1/info`` advertises and ``/v1/score`` accepts (default: :func:`media_types_for`).
    """
    if max_batch < 1 or max_request_bytes < 1:
        raise ValueError("max_batch and max_request_bytes must be positive")
    app = FastAPI(title=f"raygrpo reward server: {name}", version=PROTOCOL)
    accepted = list(media_types) if media_types is not None else media_types_for(reward)
    info = ServerInfo(name=name, media_types=accepted, max_batch=max_batch)

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def get_info() -> dict[str, Any]:
        return info.model_dump()

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        if token is not None and not _authorized(request.headers.get("authorization"), token):
            await _drain(request)
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        body = await _read_body(request, max_request_bytes)
        payload = _parse_request(body, max_batch)
        # Decoding and scoring are CPU (or GPU) work; off the event loop, health checks and other
        # requests still get answers meanwhile.
        results = await run_in_threadpool(score_items, reward, payload.items, accepted)
        return {"request_id": payload.request_id, "results": [r.model_dump() for r in results]}

    return app


def score_items(reward: Reward, items: list[ScoreItem], media_types: list[str] | None = None) -> list[ScoreResult]:
    """One result per item, in order; decoding and scoring failures become per-item errors.

    ``media_types``: those accepted (default :func:`media_types_for`); others are per-item errors.
    """
    accepted = media_types if media_types is not None else media_types_for(reward)
    results: dict[str, ScoreResult] = {}
    by_shape: dict[tuple[int, ...], list[tuple[ScoreItem, np.ndarray]]] = defaultdict(list)
    for item in items:
        if item.media_type not in accepted:
            error = f"unsupported media_type {item.media_type!r}; this server accepts {accepted}"
            results[item.id] = ScoreResult(id=item.id, error=error)
            continue
        try:
            image = decode_video(item.data) if item.media_type == "video/mp4" else decode_png(item.data)
        except ValueError as exc:
            results[item.id] = ScoreResult(id=item.id, error=str(exc))
            continue
        by_shape[image.shape].append((item, image))
    # raygrpo rewards take one [N, H, W, 3] (or [N, F, H, W, 3]) array, so media of different
    # shapes are scored as separate batches.
    for group in by_shape.values():
        images = np.stack([image for _, image in group])
        prompts = [item.prompt for item, _ in group]
        try:
            values, valid, errors = reward.score_with_errors(images, prompts)
        except Exception as exc:  # noqa: BLE001 - a failing reward fails its items, not the server
            values, valid, errors = [None] * len(group), [False] * len(group), [f"reward raised {type(exc).__name__}: {exc}"] * len(group)
        for (item, _), value, ok, error in zip(group, values, valid, errors):
            if ok and np.isfinite(value):
                results[item.id] = ScoreResult(id=item.id, score=float(value))
            else:
                results[item.id] = ScoreResult(id=item.id, error=error or "non-finite score")
    return [results[item.id] for item in items]


def decode_png(data: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 from base64 PNG bytes; ValueError saying what is wrong otherwise."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data is not valid base64: {exc}") from None
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError("data is not a PNG file (bad signature)")
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            image.load()
            # Alpha is dropped, palette and grey images expanded: rewards see RGB only.
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files (and bombs)
        raise ValueError(f"cannot decode PNG: {type(exc).__name__}: {exc}") from None


def decode_video(data: str) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 from base64 MP4 bytes; ValueError saying what is wrong otherwise."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data is not valid base64: {exc}") from None
    return decode_mp4(raw)


def _authorized(header: str | None, token: str) -> bool:
    scheme, _, given = (header or "").partition(" ")
    # compare_digest: the time taken must not reveal how many leading characters were right.
    return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode())


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request)
        raise HTTPException(413, f"request body of {int(declared)} bytes exceeds this server's limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # also covers chunked bodies, which declare no length
        size += len(chunk)
        if size > limit:
            await _drain(request)
            raise HTTPException(413, f"request body exceeds this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request) -> None:
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > _DRAIN_LIMIT:
                return
    except Exception:  # noqa: BLE001 - stream already consumed or client gone: nothing left to drain
        return


def _parse_request(body: bytes, max_batch: int) -> ScoreRequest:
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise HTTPException(400, f"request body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise HTTPException(400, "request body must be a JSON object")
    if payload.get("protocol") != PROTOCOL:
        raise HTTPException(400, f"unsupported protocol {payload.get('protocol')!r}; this server speaks {PROTOCOL!r}")
    items = payload.get("items")
    if isinstance(items, list) and len(items) > max_batch:
        raise HTTPException(413, f"batch of {len(items)} items exceeds this server's max_batch of {max_batch} (see GET /v1/info)")
    try:
        request = ScoreRequest.model_validate(payload)
    except ValidationError as exc:
        problems = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()[:20]]
        raise HTTPException(422, {"message": "request does not match protocol v1", "errors": problems}) from None
    ids = [item.id for item in request.items]
    if len(set(ids)) != len(ids):
        raise HTTPException(400, "item ids must be unique within a request")
    return request


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, help="reward kind, as in a raygrpo config (e.g. jpeg_compressibility)")
    parser.add_argument("--params", default="{}", help="the reward's params as a JSON object")
    parser.add_argument("--name", help="name reported by /v1/info (default: the kind)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-env", help="NAME of an environment variable holding the bearer token clients must send")
    parser.add_argument("--max-batch", type=int, default=64, help="most items per request")
    parser.add_argument("--max-request-mb", type=float, default=64, help="largest request body, MiB")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    try:
        params = json.loads(args.params)
    except ValueError as exc:
        parser.error(f"--params is not JSON: {exc}")
    if not isinstance(params, dict):
        parser.error("--params must be a JSON object")
    if args.kind == "http":
        parser.error("--kind http would make this server a proxy to another one; serve a reward that scores pixels")
    try:
        reward = make_reward(args.kind, params)
    except ValueError as exc:
        parser.error(str(exc))
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"environment variable {args.token_env!r} (--token-env) is not set or empty")
    if token is None and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without a token; anyone who can reach it can use it", file=sys.stderr)

    import uvicorn

    limit = int(args.max_request_mb * MiB)
    app = create_app(reward, name=args.name or args.kind, token=token, max_batch=args.max_batch, max_request_bytes=limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
