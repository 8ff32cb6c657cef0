"""Template reward server for raygrpo (protocol ``raygrpo.reward/v1``): copy this file, edit ``score_images``.

Self-contained on purpose: it needs only FastAPI, uvicorn, pydantic, Pillow and numpy, and never
imports raygrpo, so it can run in whatever environment your reward model needs (its own venv, its
own machine, its own CUDA). Run it::

    python template_server.py --port 8000                              # loopback only, no token
    MY_REWARD_TOKEN=... python template_server.py --token-env MY_REWARD_TOKEN --port 8000

and point raygrpo at it::

    rewards:
      - {name: mine, kind: http, params: {url: "http://127.0.0.1:8000", token_env: MY_REWARD_TOKEN}}

The protocol (do not change the endpoints or fields: raygrpo's client relies on them)::

    GET  /v1/health -> {"status": "ok"}
    GET  /v1/info   -> {"name": str, "media_types": [str], "max_batch": int}
    POST /v1/score  {"protocol": "raygrpo.reward/v1", "request_id", "policy_version",
                     "items": [{"id", "prompt", "media_type", "data": base64 PNG, "metadata"}]}
                 -> {"request_id", "results": [{"id", "score": float | null, "error": str | null, "details": {}}]}
"""

import argparse
import base64
import binascii
import io
import json
import math
import os
import secrets
import threading
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

SERVER_NAME = "template-brightness"  # shown by /v1/info; name it after your model
MAX_BATCH = 32  # most items per request; size it to what your model fits in memory at once
MAX_REQUEST_BYTES = 64 << 20  # largest request body (64 MiB)


# =============================================================================================
# EDIT HERE: replace this function with your model. Load weights once, outside the function
# (at import, or lazily on the first call), not per request.
# =============================================================================================


def score_images(images: list[Image.Image], prompts: list[str]) -> list[float]:
    """One score per image, higher is better. ``images`` are RGB PIL images, ``prompts`` their prompts.

    The example scores mean brightness in [0, 1]. Raise to fail the whole batch (every item gets
    the message); return ``float("nan")`` for an item you cannot score (it gets an error).
    """
    return [float(np.asarray(image, dtype=np.float64).mean() / 255.0) for image in images]


# =============================================================================================
# Protocol plumbing below: no need to edit.
# =============================================================================================

PROTOCOL = "raygrpo.reward/v1"
MEDIA_TYPES = ["image/png"]

# Requests may arrive concurrently; most models are not safe to call from several threads at once.
_MODEL_LOCK = threading.Lock()


class ScoreItem(BaseModel):
    id: str
    prompt: str
    media_type: Literal["image/png", "video/mp4"]
    data: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class ScoreRequest(BaseModel):
    protocol: Literal["raygrpo.reward/v1"]
    request_id: str
    policy_version: int = 0
    items: list[ScoreItem]


def create_app(*, token: str | None = None, max_batch: int = MAX_BATCH, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The app; ``token`` is the bearer token ``POST /v1/score`` requires (None: no auth)."""
    app = FastAPI(title=SERVER_NAME)

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return {"name": SERVER_NAME, "media_types": MEDIA_TYPES, "max_batch": max_batch}

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        # Refused requests are still read to the end: answering while a client is still sending
        # makes it see a connection reset instead of the status.
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
                await _read_body(request, max_request_bytes)
                raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        body = await _read_body(request, max_request_bytes)
        if len(body) > max_request_bytes:
            raise HTTPException(413, f"request body exceeds this server's limit of {max_request_bytes} bytes")
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise HTTPException(400, f"request body is not JSON: {exc}") from None
        if not isinstance(payload, dict) or payload.get("protocol") != PROTOCOL:
            got = payload.get("protocol") if isinstance(payload, dict) else None
            raise HTTPException(400, f"unsupported protocol {got!r}; this server speaks {PROTOCOL!r}")
        if isinstance(payload.get("items"), list) and len(payload["items"]) > max_batch:
            raise HTTPException(413, f"batch of {len(payload['items'])} items exceeds max_batch {max_batch} (see GET /v1/info)")
        try:
            req = ScoreRequest.model_validate(payload)
        except ValidationError as exc:
            raise HTTPException(422, [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()[:20]]) from None
        if len({item.id for item in req.items}) != len(req.items):
            raise HTTPException(400, "item ids must be unique within a request")
        results = await run_in_threadpool(_score_items, req.items)
        return {"request_id": req.request_id, "results": results}

    return app


def _score_items(items: list[ScoreItem]) -> list[dict[str, Any]]:
    """One result per item, ids echoed; a bad item gets an error, never a 500 for the batch."""
    errors: dict[str, str] = {}
    images, prompts, ids = [], [], []
    for item in items:
        try:
            images.append(_decode(item))
            prompts.append(item.prompt)
            ids.append(item.id)
        except ValueError as exc:
            errors[item.id] = str(exc)
    scores: dict[str, float] = {}
    if images:
        try:
            with _MODEL_LOCK:
                values = list(score_images(images, prompts))
            if len(values) != len(images):
                raise ValueError(f"score_images returned {len(values)} scores for {len(images)} images")
            scores = dict(zip(ids, (float(v) for v in values)))
        except Exception as exc:  # noqa: BLE001 - the batch fails as data, the server lives on
            errors.update({i: f"score_images raised {type(exc).__name__}: {exc}" for i in ids})
    results = []
    for item in items:
        value = scores.get(item.id)
        if item.id in errors or value is None or not math.isfinite(value):
            results.append({"id": item.id, "score": None, "error": errors.get(item.id, "non-finite score"), "details": {}})
        else:
            results.append({"id": item.id, "score": value, "error": None, "details": {}})
    return results


def _decode(item: ScoreItem) -> Image.Image:
    if item.media_type not in MEDIA_TYPES:
        raise ValueError(f"unsupported media_type {item.media_type!r}; this server accepts {MEDIA_TYPES}")
    try:
        raw = base64.b64decode(item.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data is not valid base64: {exc}") from None
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as image:
            return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
        raise ValueError(f"cannot decode PNG: {type(exc).__name__}: {exc}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or ``limit + 1`` bytes of it when it is larger (the rest is read and dropped)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        if size <= limit:
            chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[: limit + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description="raygrpo reward server template (protocol raygrpo.reward/v1)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token-env", help="NAME of an environment variable holding the bearer token clients must send")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH)
    args = parser.parse_args()
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"environment variable {args.token_env!r} is not set or empty")

    import uvicorn

    uvicorn.run(create_app(token=token, max_batch=args.max_batch), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
