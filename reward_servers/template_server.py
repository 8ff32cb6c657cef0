"""Template reward server for raygrpo (protocol ``raygrpo.reward/v1``): copy this file, edit ``score_images``.

It needs FastAPI, uvicorn, pydantic, Pillow and numpy, and the file ``protocol_guard.py`` from the
same folder (copy both), never raygrpo itself, so it can run in whatever environment your reward
model needs (its own venv, its own machine, its own CUDA). Run it::

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

``protocol_guard`` bounds what a request can cost before it is paid (token, body size and time,
JSON depth, decoded pixels; ``--help`` lists the flags); see its docstring.
"""

import argparse
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

# protocol_guard.py lives next to this file: importable however this file is run or loaded.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import protocol_guard as guard

SERVER_NAME = "template-brightness"  # shown by /v1/info; name it after your model
MAX_BATCH = 32  # most items per request; size it to what your model fits in memory at once


# =============================================================================================
# EDIT HERE: replace this function with your model. Load weights once, outside the function
# (at import, or lazily on the first call), not per request.
# =============================================================================================


def score_images(images: list[Image.Image], prompts: list[str]) -> list[float | str]:
    """One score per image, higher is better. ``images`` are RGB PIL images, ``prompts`` their prompts.

    The example scores mean brightness in [0, 1]. Raise to fail the whole batch (every item gets
    the message); put a string in place of a score to fail that item with the string as its error.
    """
    return [float(np.asarray(image, dtype=np.float64).mean() / 255.0) for image in images]


# =============================================================================================
# Protocol plumbing below: no need to edit.
# =============================================================================================

MEDIA_TYPES = ["image/png"]
ScoreFn = Callable[[list[Image.Image], list[str]], list[float | str]]

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


def create_app(
    *,
    token: str | None = None,
    max_batch: int = MAX_BATCH,
    limits: guard.Limits | None = None,
    name: str = SERVER_NAME,
    score_fn: ScoreFn = score_images,
) -> FastAPI:
    """The app; ``token`` is the bearer token ``POST /v1/score`` requires (None: no auth)."""
    limits = limits or guard.Limits()
    app = FastAPI(title=name)

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info() -> dict[str, Any]:
        return {"name": name, "media_types": MEDIA_TYPES, "max_batch": max_batch}

    @app.post("/v1/score")
    async def score(request: Request) -> dict[str, Any]:
        req = await guard.read_score_request(request, ScoreRequest, token=token, max_batch=max_batch, limits=limits)
        results = await run_in_threadpool(_score_items, req.items, limits, score_fn)
        return {"request_id": req.request_id, "results": results}

    return app


def _score_items(items: list[ScoreItem], limits: guard.Limits, score_fn: ScoreFn) -> list[dict[str, Any]]:
    """One result per item, ids echoed; a bad item gets an error, never a 500 for the batch."""
    opened = guard.open_items(items, MEDIA_TYPES, limits)  # a 413 comes from here, before any decoding
    errors = {item_id: media for item_id, media in opened.items() if isinstance(media, str)}
    images, prompts, ids = [], [], []
    for item in items:
        if item.id in errors:
            continue
        try:
            images.append(Image.fromarray(opened[item.id].decode()))
        except ValueError as exc:
            errors[item.id] = str(exc)
            continue
        prompts.append(item.prompt)
        ids.append(item.id)
    scores: dict[str, float] = {}
    if images:
        fn_name = getattr(score_fn, "__name__", type(score_fn).__name__)
        try:
            with _MODEL_LOCK:
                values = list(score_fn(images, prompts))
            if len(values) != len(images):
                raise ValueError(f"{fn_name} returned {len(values)} scores for {len(images)} images")
            values = [value if isinstance(value, str) else float(value) for value in values]
        except Exception as exc:  # noqa: BLE001 - the batch fails as data, the server lives on
            values = [f"{fn_name} raised {type(exc).__name__}: {exc}"] * len(ids)
        for item_id, value in zip(ids, values):
            if isinstance(value, str):
                errors[item_id] = value
            else:
                scores[item_id] = value
    results = []
    for item in items:
        value = scores.get(item.id)
        if item.id in errors or value is None or not math.isfinite(value):
            results.append({"id": item.id, "score": None, "error": errors.get(item.id, "non-finite score"), "details": {}})
        else:
            results.append({"id": item.id, "score": value, "error": None, "details": {}})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="raygrpo reward server template (protocol raygrpo.reward/v1)")
    guard.add_server_flags(parser, max_batch=MAX_BATCH)
    args = parser.parse_args()
    token = guard.token_from_flags(parser, args)
    app = create_app(token=token, max_batch=args.max_batch, limits=guard.limits_from_flags(parser, args))
    guard.run(app, args, token=token)


if __name__ == "__main__":
    main()
