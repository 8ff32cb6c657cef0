"""Serve any raygrpo reward over HTTP protocol ``raygrpo.reward/v1``.

Usage::

    python reward_servers/serve_builtin.py --kind jpeg_compressibility --params '{"quality": 95}' \\
        --host 127.0.0.1 --port 8000 [--token-env NAME] [--max-batch 64] [limits: see --help]

Useful to run a reward in a separate process or on another machine (raygrpo's trainer then uses
``kind: http``), and as the reference implementation of the server side of the protocol; the
client side is ``raygrpo/reward/http.py``. :func:`create_app` wraps an already built
:class:`~raygrpo.reward.Reward` in a FastAPI app, for tests and for embedding.

What the server guarantees (and clients rely on):

* Media: ``image/png`` always; ``video/mp4`` too when the reward scores videos ``[N, F, H, W, 3]``
  (``frame_average``, e.g. ``--kind frame_average --params '{"reward": {"kind": "brightness"}}'``).
  An MP4 is decoded to its frames (all of them; the reward picks which to score), and videos of
  different shapes are scored as separate batches.
* ``POST /v1/score`` answers 200 whenever the request is well formed and within the limits, with
  one result per item, ids echoed: an item that cannot be decoded or scored gets ``score: null``
  and an ``error``, so one bad image never costs its batch. A reward that raises fails only the
  items it was scoring.
* Malformed or oversized requests get a 4xx with a ``detail`` saying what is wrong, never a 500:
  400 (not JSON, nested too deep, wrong ``protocol``, duplicate ids), 401 (token missing or wrong;
  answered before the body is read), 408 (body not received within ``body_timeout_s``), 413 (more
  items than ``max_batch``, a body over ``max_request_bytes``, or media whose headers declare more
  pixels than ``max_image_pixels`` / ``max_request_pixels``, refused before decoding), 422 (fields
  of the wrong type). The limits live in ``protocol_guard.py``, shared with the template server.
* References: a reward that compares an output with its source (``edit_fidelity``; any reward whose
  ``wants_references`` is true) gets each item's optional ``reference`` PNG (sent by clients with
  ``send_reference: true``), decoded under the same limits; an unreadable one fails its item. Other rewards
  never decode it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from raygrpo.reward import Reward, make_reward
from raygrpo.reward.base import score_outcome_of
from raygrpo.reward.http import PROTOCOL, ScoreItem, ScoreRequest, ScoreResult, ServerInfo
from raygrpo.reward.models.video import FrameAverage

# protocol_guard.py lives next to this file: importable however this file is run or loaded.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
import protocol_guard as guard

IMAGE_MEDIA_TYPES = ["image/png"]
VIDEO_MEDIA_TYPES = ["image/png", "video/mp4"]
MEDIA_TYPES = IMAGE_MEDIA_TYPES  # of a reward that scores images only


def media_types_for(reward: Reward) -> list[str]:
    """What ``reward`` can score: videos only if it accepts ``[N, F, H, W, 3]`` arrays."""
    return list(VIDEO_MEDIA_TYPES if isinstance(reward, FrameAverage) else IMAGE_MEDIA_TYPES)


def create_app(
    reward: Reward,
    *,
    name: str,
    token: str | None = None,
    max_batch: int = 64,
    limits: guard.Limits | None = None,
    max_request_bytes: int | None = None,
    media_types: list[str] | None = None,
) -> FastAPI:
    """A FastAPI app serving ``reward`` over protocol v1.

    ``token``: the bearer token clients must send to ``POST /v1/score`` (None: no auth). Health and
    info stay open, as load balancers and the client's readiness check expect. ``limits``: what one
    request may cost (default :class:`protocol_guard.Limits`); ``max_request_bytes`` replaces just
    its body limit. ``media_types``: what ``/v1/info`` advertises and ``/v1/score`` accepts
    (default: :func:`media_types_for`).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    limits = limits or guard.Limits()
    if max_request_bytes is not None:
        limits = dataclasses.replace(limits, max_request_bytes=max_request_bytes)
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
        payload = await guard.read_score_request(request, ScoreRequest, token=token, max_batch=max_batch, limits=limits)
        # Decoding and scoring are CPU (or GPU) work; off the event loop, health checks and other
        # requests still get answers meanwhile.
        results = await run_in_threadpool(score_items, reward, payload.items, accepted, limits)
        return {"request_id": payload.request_id, "results": [r.model_dump() for r in results]}

    return app


def score_items(
    reward: Reward, items: list[ScoreItem], media_types: list[str] | None = None, limits: guard.Limits | None = None
) -> list[ScoreResult]:
    """One result per item, in order; decoding and scoring failures become per-item errors.

    ``media_types``: those accepted (default :func:`media_types_for`); others are per-item errors.
    Media over ``limits`` raise a 413 HTTPException before anything is decoded.
    """
    accepted = media_types if media_types is not None else media_types_for(reward)
    limits = limits or guard.Limits()
    opened = guard.open_items(items, accepted, limits)
    references = guard.open_references(items, limits) if reward.wants_references else {}
    results: dict[str, ScoreResult] = {}
    by_shape: dict[tuple[int, ...], list[tuple[ScoreItem, np.ndarray]]] = defaultdict(list)
    for item in items:
        media = opened[item.id]
        if isinstance(media, str):  # the error that fails this item
            results[item.id] = ScoreResult(id=item.id, error=media)
            continue
        try:
            array = media.decode()  # [H, W, 3] or [F, H, W, 3] uint8
            reference = _decode_reference(references.get(item.id))  # [H0, W0, 3] uint8 or None
        except ValueError as exc:
            results[item.id] = ScoreResult(id=item.id, error=str(exc))
            continue
        by_shape[array.shape].append((item, array, reference))
    # raygrpo rewards take one [N, H, W, 3] (or [N, F, H, W, 3]) array, so media of different
    # shapes are scored as separate batches.
    for group in by_shape.values():
        arrays = np.stack([array for _, array, _ in group])
        prompts = [item.prompt for item, _, _ in group]
        try:
            outcome = score_outcome_of(reward, arrays, prompts, [reference for _, _, reference in group])
            values, valid, errors = outcome.values, outcome.valid, outcome.errors
        except Exception as exc:  # noqa: BLE001 - a failing reward fails its items, not the server
            values, valid, errors = [None] * len(group), [False] * len(group), [f"reward raised {type(exc).__name__}: {exc}"] * len(group)
        for (item, _, _), value, ok, error in zip(group, values, valid, errors):
            if ok and np.isfinite(value):
                results[item.id] = ScoreResult(id=item.id, score=float(value))
            else:
                results[item.id] = ScoreResult(id=item.id, error=error or "non-finite score")
    return [results[item.id] for item in items]


def _decode_reference(reference: guard.Media | str | None) -> np.ndarray | None:
    """The decoded reference, None without one; ValueError (failing the item) when it cannot be used."""
    if isinstance(reference, str):
        raise ValueError(reference)
    try:
        return None if reference is None else reference.decode()
    except ValueError as exc:
        raise ValueError(f"reference: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", required=True, help="reward kind, as in a raygrpo config (e.g. jpeg_compressibility)")
    parser.add_argument("--params", default="{}", help="the reward's params as a JSON object")
    parser.add_argument("--name", help="name reported by /v1/info (default: the kind)")
    guard.add_server_flags(parser, max_batch=64)
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
    token = guard.token_from_flags(parser, args)
    limits = guard.limits_from_flags(parser, args)
    app = create_app(reward, name=args.name or args.kind, token=token, max_batch=args.max_batch, limits=limits)
    guard.run(app, args, token=token)


if __name__ == "__main__":
    main()
