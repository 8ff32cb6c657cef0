"""A reward served over HTTP: the client side of protocol ``raygrpo.reward/v1``.

Any process that answers three endpoints can score images (or videos) for raygrpo, in any language,
on any machine, with any model and any dependencies; raygrpo never imports it::

    GET  /v1/health  -> 200 {"status": "ok"}
    GET  /v1/info    -> 200 {"name": str, "media_types": [str], "max_batch": int}
    POST /v1/score   (JSON; "Authorization: Bearer <token>" when the server wants one)
         request:  {"protocol": "raygrpo.reward/v1", "request_id": str, "policy_version": int,
                    "items": [{"id", "prompt", "media_type", "data": base64 PNG/MP4, "metadata",
                               "reference": base64 PNG (optional)}]}
         response: {"request_id": str,
                    "results": [{"id", "score": float | null, "error": str | null, "details": {str: float}}]}

Version 1 is a fixed contract: servers written against it keep working. Its one optional addition,
``reference`` (the conditioning image of an image-editing or image-to-video item: the edit's source, the
video's first frame, as a lossless PNG of its original size), is sent only when the reward's config asks for
it (``send_reference: true``) and the run has such images, and is left out of the JSON otherwise, so a server
that never heard of it gets byte-for-byte the requests it always got; one that ignores unknown fields (pydantic's
default, FastAPI's) keeps working even when it is sent. Only JSON and base64 media cross the wire, never pickle: a reward
server is a separate trust domain, and unpickling its bytes would let it run code in the trainer.
For the same reason answers are read strictly: a score must be a JSON number (``"0.5"`` and ``true``
are refused, not coerced), and an answer may not exceed ``max_response_bytes_per_item`` per item.

Failures never raise out of :meth:`HttpReward.score_outcome` and never become a silent 0: each item
that got no usable score is returned invalid (NaN) with a message naming the URL and the cause, and
the controller applies ``scoring.on_failure``. The outcome also counts retries and failed requests,
and a 401/403 sets its ``fatal`` (the token is wrong; no retry can help). :meth:`HttpReward.check_service`
asks ``/v1/health`` and ``/v1/info`` before a run. The server implementations live in
``reward_servers/`` (a built-in-reward server and a copyable template).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import httpx
import numpy as np
from pydantic import BaseModel, Field, StrictFloat, ValidationError, field_validator

from raygrpo.reward.base import NON_FINITE_ERROR, References, Reward, RewardParams, RewardServiceError, ScoreOutcome, check_batch
from raygrpo.reward.media import DEFAULT_FPS, decode_mp4, encode_mp4, encode_png
from raygrpo.reward.transport import (
    AUTH_STATUS,
    CallTally,
    Reply,
    RequestFailed,
    Retries,
    async_client,
    check_base_url,
    request_with_retries,
    run_sync,
)

__all__ = [
    "PROTOCOL",
    "Health",
    "HttpReward",
    "ScoreItem",
    "ScoreRequest",
    "ScoreResponse",
    "ScoreResult",
    "ServerInfo",
    "check_base_url",
    "decode_mp4",
    "encode_mp4",
    "encode_png",
    "request_with_retries",
]

logger = logging.getLogger(__name__)

PROTOCOL = "raygrpo.reward/v1"
MediaType = Literal["image/png", "video/mp4"]
MiB = 1 << 20

# Health and info answers are a few dozen bytes; a megabyte is already absurd.
_CONTROL_BODY_BYTES = MiB

_FLOAT32_MAX = float(np.finfo(np.float32).max)

ModelT = TypeVar("ModelT", bound=BaseModel)


# --------------------------------------------------------------------------------------------
# Wire format. Incoming models ignore unknown fields (a v1 peer may add informational fields);
# everything the protocol names is required to have the protocol's type.
# --------------------------------------------------------------------------------------------


class ScoreItem(BaseModel):
    """One medium to score. ``id`` is unique within its request; results are matched by it."""

    id: str
    prompt: str
    media_type: MediaType
    data: str  # base64 (standard alphabet, padded) of the PNG or MP4 file's bytes
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Optional: base64 PNG of the item's conditioning image (edit source / i2v first frame), at its own size. Left
    # out of the JSON when None: servers that predate it see exactly the requests they always saw.
    reference: str | None = Field(default=None, exclude_if=lambda value: value is None)


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    protocol: Literal["raygrpo.reward/v1"] = PROTOCOL
    request_id: str
    policy_version: int = 0  # version of the policy weights that generated the media
    items: list[ScoreItem]


class ScoreResult(BaseModel):
    """The server's verdict on one item: a finite ``score``, or ``error`` saying why there is none."""

    id: str
    # Strict: a JSON number only. A server sending "0.5" or true has a bug that coercion would hide.
    score: StrictFloat | None = None
    error: str | None = None
    details: dict[str, float] = Field(default_factory=dict)  # optional sub-scores, for logging


class ScoreResponse(BaseModel):
    """Body of a 200 answer to ``POST /v1/score``; ``results`` may come in any order."""

    request_id: str
    results: list[ScoreResult]


class ServerInfo(BaseModel):
    """Body of ``GET /v1/info``."""

    name: str
    media_types: list[str]
    max_batch: int = Field(ge=1)


class Health(BaseModel):
    """Body of ``GET /v1/health``."""

    status: str


# --------------------------------------------------------------------------------------------
# The reward.
# --------------------------------------------------------------------------------------------


class HttpReward(Reward):
    """Scores images (or videos) by POSTing them, as base64 PNG (MP4) in JSON, to a ``raygrpo.reward/v1`` server.

    Params:

    * ``url``: base URL of the server (``http://127.0.0.1:8000``); the endpoints are appended.
    * ``token_env``: NAME of the environment variable holding the bearer token. The token itself
      never sits in a config file (configs are copied into run directories and logs). The variable
      must be set where the reward is built (the driver's preflight and the reward actor).
    * ``timeout_s``: limit on one attempt of one request, connect to last byte.
    * ``max_attempts``: attempts per request, the first included. Transport errors, timeouts, 429
      and 5xx are retried; other 4xx and malformed 200 answers are not (repeating them cannot help).
    * ``backoff_s``: first retry delay; it doubles each attempt, with jitter, capped at 30 s. A 429's
      ``Retry-After`` replaces it (same cap).
    * ``batch_size``: items per request; None asks the server's ``/v1/info`` once. A batch the server
      refuses with 413 (too many items or too many bytes) is split in halves and resent.
    * ``max_concurrency``: requests in flight at once for one call.
    * ``max_response_bytes_per_item``: an answer longer than this times its batch's size fails that
      batch (reading stops at the limit). Default 4 MiB, far above any sane ``details``.
    * ``media_type``: ``image/png`` (default): inputs are images ``[N, H, W, 3]`` uint8, sent as
      lossless PNG, so the server sees the exact pixels. ``video/mp4``: inputs are videos
      ``[N, F, H, W, 3]`` uint8, each sent as one H.264 MP4 (lossy; see :mod:`raygrpo.reward.media`).
      The server's ``/v1/info`` must list the media type (checked when ``batch_size`` is unset).
    * ``video_fps``: frame rate written into the MP4s (videos only).
    * ``check_health``: ask ``/v1/health`` before the first request, so that a server that is down
      or still loading says so once, clearly, instead of as N failed batches.
    * ``send_reference``: send each item's conditioning image as ``reference`` (image editing: the source
      image; image-to-video: the first frame), for servers that judge an edit against its source. Off by
      default: it costs a PNG per item, and only a server that reads it can use it. Text-to-image runs have no
      conditioning image and send none either way.
    """

    name = "http"

    class Params(RewardParams):
        url: str
        token_env: str | None = None
        timeout_s: float = Field(default=30.0, gt=0)
        max_attempts: int = Field(default=4, ge=1)
        backoff_s: float = Field(default=0.5, ge=0)
        batch_size: int | None = Field(default=None, ge=1)
        max_concurrency: int = Field(default=4, ge=1)
        max_response_bytes_per_item: int = Field(default=4 * MiB, ge=1)
        media_type: MediaType = "image/png"
        video_fps: int = Field(default=DEFAULT_FPS, ge=1)
        check_health: bool = True
        send_reference: bool = False

        @field_validator("url")
        @classmethod
        def _check_url(cls, url: str) -> str:
            parsed = check_base_url(url)
            if parsed.query or parsed.fragment:
                raise ValueError(f"must be a base URL without query or fragment, got {url!r}")
            return url.rstrip("/")

        @field_validator("token_env")
        @classmethod
        def _check_token_env(cls, name: str | None) -> str | None:
            # A value that looks like a token rather than a variable name is the likeliest mistake,
            # and the error must not echo it back into a log.
            if name is not None and not name.replace("_", "").isalnum():
                raise ValueError("must be the NAME of an environment variable (letters, digits, _), not the token itself")
            return name

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._token = self._resolve_token()
        self._reset_server_state()

    # The token is left out of pickles (Ray object store, checkpoints) and looked up again on load.
    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.params = state["params"]
        self._token = self._resolve_token()
        self._reset_server_state()

    def _reset_server_state(self) -> None:
        self._server_checked = False  # health (and info, when needed) answered once
        self._server_max_batch: int | None = None

    def _resolve_token(self) -> str | None:
        env = self.params.token_env
        if env is None:
            return None
        token = os.environ.get(env, "")
        if not token:
            raise ValueError(
                f"reward {self.name!r}: environment variable {env!r} named by 'token_env' is not set or empty; "
                "export the reward server's bearer token in it"
            )
        return token

    # ----------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------

    @property
    def wants_references(self) -> bool:
        return self.params.send_reference

    def score(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        policy_version: int = 0,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        references: References | None = None,
    ) -> np.ndarray:
        """``[N]`` float32 scores; raises ``RuntimeError`` if any item got none (see :meth:`score_outcome`)."""
        outcome = self.score_outcome(images, prompts, policy_version=policy_version, metadata=metadata, references=references)
        if not outcome.valid.all():
            bad = int((~outcome.valid).sum())
            first = next(e for e, ok in zip(outcome.errors, outcome.valid) if not ok)
            raise RuntimeError(f"reward 'http': {bad} of {len(outcome.valid)} items got no score; first: {first}")
        return outcome.values

    def score_outcome(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        policy_version: int = 0,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        references: References | None = None,
    ) -> ScoreOutcome:
        """Per-item scores (invalid items hold NaN), retries, failed requests and a fatal error; blocking.

        ``policy_version`` and per-item ``metadata`` (JSON-serialisable dicts) are sent to the
        server as they are; ``references`` (one conditioning image or None per item) as PNG, with
        ``send_reference`` only. Runs :meth:`ascore_outcome` to completion (see :func:`run_sync`).
        """
        return run_sync(self.ascore_outcome(images, prompts, policy_version=policy_version, metadata=metadata, references=references))

    async def ascore_outcome(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        policy_version: int = 0,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        references: References | None = None,
    ) -> ScoreOutcome:
        """The async form of :meth:`score_outcome`.

        Items get ids ``"0"`` .. ``"N-1"`` (their index), are split into batches of at most
        ``batch_size`` (or the server's ``max_batch``) and the batches are sent concurrently,
        at most ``max_concurrency`` at a time. Bad arguments (shapes, lengths) raise ValueError;
        everything that goes wrong on the wire comes back as invalid items.
        """
        n = check_batch(images, prompts, video=self.params.media_type == "video/mp4")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"got {n} images but {len(metadata)} metadata entries")
        if references is not None and len(references) != n:
            raise ValueError(f"got {n} images but {len(references)} references")
        tally = CallTally()
        values = np.full(n, np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * n
        if n:
            async with self._client(self.params.timeout_s) as client:
                try:
                    batch_size = await self._prepare(client, tally)
                except RequestFailed as exc:
                    return tally.all_invalid(n, exc)
                semaphore = asyncio.Semaphore(self.params.max_concurrency)
                batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
                sent = references if self.params.send_reference else None
                encoded = await asyncio.to_thread(_encode_references, sent)  # once per group, off the loop
                outcomes = await asyncio.gather(
                    *(
                        self._score_batch(client, semaphore, tally, images, prompts, metadata, encoded, batch, policy_version)
                        for batch in batches
                    )
                )
            for outcome in outcomes:
                for index, (value, error) in outcome.items():
                    values[index], errors[index] = value, error
        return tally.outcome(values, errors)

    def check_service(self, timeout_s: float = 5.0, *, start_server: bool = True) -> None:
        """``GET /v1/health``, then ``GET /v1/info`` and an empty ``POST /v1/score`` with the token;
        :class:`RewardServiceError` if any fails.

        Fails when nothing listens at ``url``, when it does not answer within ``timeout_s`` (two
        attempts each), when it rejects the token (401/403), when an answer is not protocol v1's,
        or when ``/v1/info`` does not list ``media_type``. The message names the URL and the cause.
        """
        try:
            run_sync(self._acheck_service(timeout_s))
        except RequestFailed as exc:
            raise RewardServiceError(str(exc)) from None

    # ----------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------

    def _client(self, timeout_s: float) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        return async_client(timeout_s, headers)

    @property
    def _retries(self) -> Retries:
        return Retries(self.params.max_attempts, self.params.timeout_s, self.params.backoff_s)

    async def _acheck_service(self, timeout_s: float) -> None:
        retries = Retries.service_check(timeout_s)
        # One request's budget for both: a server that answers each just in time still fails in seconds.
        budget = retries.budget_s
        try:
            async with asyncio.timeout(budget), self._client(timeout_s) as client:
                await self._readiness(client, CallTally(), health=True, info=True, retries=retries)
                await self._check_token(client, retries)
        except TimeoutError:
            message = f"http reward {self.params.url}: /v1/health, /v1/info and /v1/score did not all answer within {budget:g} s"
            raise RequestFailed(message) from None

    async def _check_token(self, client: httpx.AsyncClient, retries: Retries) -> None:
        """A score request with no items: the one call protocol v1 guards with the token on every server (many
        leave /v1/info open), and one that costs the server nothing. 401/403 fail, and so does a 200 that is not
        the protocol's answer; a 4xx about the empty batch says the token was accepted."""
        request = ScoreRequest(request_id=f"preflight-{uuid.uuid4().hex[:8]}", policy_version=0, items=[])
        reply = await request_with_retries(
            client, "POST", self._endpoint("/v1/score"), label="http reward", retries=retries,
            max_body_bytes=_CONTROL_BODY_BYTES, content=request.model_dump_json(), headers={"Content-Type": "application/json"},
        )  # fmt: skip
        if reply.status in AUTH_STATUS or reply.status == 200:
            # 401/403: raises naming the token and where it comes from; 200: must be the protocol's answer
            self._parse(reply, ScoreResponse)

    async def _prepare(self, client: httpx.AsyncClient, tally: CallTally) -> int:
        """Check health and learn ``max_batch`` once per instance (again after a failure); the batch size."""
        if not self._server_checked:
            p = self.params
            info = await self._readiness(client, tally, health=p.check_health, info=p.batch_size is None, retries=self._retries)
            self._server_max_batch = info.max_batch if info is not None else None
            self._server_checked = True
        return self.params.batch_size or self._server_max_batch or 1

    async def _readiness(
        self, client: httpx.AsyncClient, tally: CallTally, *, health: bool, info: bool, retries: Retries
    ) -> ServerInfo | None:
        """Ask ``/v1/health`` and/or ``/v1/info``; raises :class:`RequestFailed` saying what is wrong."""

        async def get(path: str) -> Reply:
            url = self._endpoint(path)
            return await request_with_retries(client, "GET", url, label="http reward", retries=retries, max_body_bytes=_CONTROL_BODY_BYTES)

        if health:
            reply = await get("/v1/health")
            body = self._parse(reply, Health)
            if body.status != "ok":
                raise RequestFailed(
                    f"http reward {reply.where}: server reports status {body.status!r}, not 'ok' (still loading?)", attempts=reply.attempts
                )
            tally.answered(reply)
        if not info:
            return None
        reply = await get("/v1/info")
        server = self._parse(reply, ServerInfo)
        if self.params.media_type not in server.media_types:
            raise RequestFailed(
                f"http reward {reply.where}: server {server.name!r} accepts {server.media_types}, "
                f"not {self.params.media_type!r} (params.media_type)",
                attempts=reply.attempts,
            )
        tally.answered(reply)
        return server

    async def _score_batch(
        self,
        client: httpx.AsyncClient,
        semaphore: asyncio.Semaphore,
        tally: CallTally,
        images: np.ndarray,
        prompts: list[str],
        metadata: Sequence[Mapping[str, Any]] | None,
        references: list[str | None] | None,
        indices: range,
        policy_version: int,
    ) -> dict[int, tuple[float, str | None]]:
        # Encoding is CPU work (zlib releases the GIL), done off the event loop so that batches
        # already encoded can be on the wire meanwhile.
        try:
            items = await asyncio.to_thread(self._encode_items, images, prompts, metadata, references, indices)
        except Exception as exc:  # noqa: BLE001 - e.g. metadata that is not JSON: the items fail, not the worker
            failure = RequestFailed(
                f"http reward: could not encode items for {self._endpoint('/v1/score')}: {type(exc).__name__}: {exc}", attempts=0
            )
            tally.failed(failure)
            return {i: (math.nan, str(failure)) for i in indices}
        by_id = await self._send(client, semaphore, tally, items, policy_version)
        return {int(item_id): outcome for item_id, outcome in by_id.items()}

    def _encode_items(
        self,
        images: np.ndarray,
        prompts: list[str],
        metadata: Sequence[Mapping[str, Any]] | None,
        references: list[str | None] | None,
        indices: range,
    ) -> list[ScoreItem]:
        items = []
        for i in indices:
            meta = dict(metadata[i]) if metadata is not None else {}
            json.dumps(meta, allow_nan=False)  # fail here, per batch, rather than inside httpx
            if self.params.media_type == "video/mp4":
                data = base64.b64encode(encode_mp4(images[i], self.params.video_fps)).decode("ascii")
            else:
                data = encode_png(images[i])
            reference = references[i] if references is not None else None
            item = ScoreItem(id=str(i), prompt=prompts[i], media_type=self.params.media_type, data=data, metadata=meta, reference=reference)
            items.append(item)
        return items

    async def _send(
        self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, tally: CallTally, items: list[ScoreItem], policy_version: int
    ) -> dict[str, tuple[float, str | None]]:
        """Outcome per item id of one batch; a 413 splits the batch in halves and sends both."""
        request = ScoreRequest(request_id=f"{uuid.uuid4().hex}-{items[0].id}", policy_version=policy_version, items=items)
        body = request.model_dump_json().encode()
        limit = self.params.max_response_bytes_per_item * len(items)
        # The semaphore covers the HTTP exchange only: halves of a split batch must be able to take
        # slots while their parent waits for them, or enough concurrent splits would deadlock.
        async with semaphore:
            try:
                reply = await request_with_retries(
                    client, "POST", self._endpoint("/v1/score"), label="http reward", retries=self._retries, max_body_bytes=limit,
                    limit_hint=f" ({len(items)} items x params.max_response_bytes_per_item)",
                    smaller_hint=f" ({len(items)} items in this one: lower params.batch_size)" if len(items) > 1 else " (smaller media)",
                    content=body, headers={"Content-Type": "application/json"},
                )  # fmt: skip
                too_large = reply.status == 413 and len(items) > 1
                parsed = None if too_large else self._parse(reply, ScoreResponse)
                if parsed is not None and parsed.request_id != request.request_id:
                    # A different request's answer (a caching proxy, a server mixing up concurrent
                    # requests) would pair scores with the wrong images: refuse it whole.
                    raise RequestFailed(
                        f"http reward {reply.where}: response request_id {parsed.request_id!r} "
                        f"does not match the request's {request.request_id!r}",
                        attempts=reply.attempts,
                    )
            except RequestFailed as exc:
                tally.failed(exc)
                return {item.id: (math.nan, str(exc)) for item in items}
        tally.answered(reply)
        if parsed is None:
            logger.warning(
                "http reward %s: 413 for a batch of %d items (%d bytes); splitting it in halves",
                self._endpoint("/v1/score"), len(items), len(body),
            )  # fmt: skip
            half = len(items) // 2
            first, second = await asyncio.gather(
                self._send(client, semaphore, tally, items[:half], policy_version),
                self._send(client, semaphore, tally, items[half:], policy_version),
            )
            return {**first, **second}
        return self._match(items, parsed.results)

    def _match(self, items: list[ScoreItem], results: list[ScoreResult]) -> dict[str, tuple[float, str | None]]:
        """Pair results with items by id; the order of ``results`` is not trusted.

        An id answered twice makes that item invalid: there is no telling which answer is right.
        Ids that were not asked for are ignored and logged.
        """
        where = self._endpoint("/v1/score")
        wanted = {item.id for item in items}
        seen: dict[str, ScoreResult] = {}
        duplicated: set[str] = set()
        unknown: list[str] = []
        for result in results:
            if result.id not in wanted:
                unknown.append(result.id)
            elif result.id in seen:
                duplicated.add(result.id)
            else:
                seen[result.id] = result
        if unknown:
            logger.warning("http reward %s: ignored %d results for ids that were not sent: %s", where, len(unknown), unknown[:5])
        outcome: dict[str, tuple[float, str | None]] = {}
        for item in items:
            result = seen.get(item.id)
            if item.id in duplicated:
                outcome[item.id] = (math.nan, f"http reward {where}: server returned several results for item {item.id!r}")
            elif result is None:
                outcome[item.id] = (math.nan, f"http reward {where}: no result for item {item.id!r}")
            elif result.error is not None:
                outcome[item.id] = (math.nan, f"http reward {where}: server error for item {item.id!r}: {result.error}")
            elif result.score is None:
                outcome[item.id] = (math.nan, f"http reward {where}: null score without an error for item {item.id!r}")
            elif not math.isfinite(result.score) or abs(result.score) > _FLOAT32_MAX:
                # Scores are stored as float32: a finite float64 beyond its range would become inf.
                outcome[item.id] = (math.nan, f"http reward {where}: {NON_FINITE_ERROR} {result.score!r} for item {item.id!r}")
            else:
                outcome[item.id] = (result.score, None)
        return outcome

    def _parse(self, reply: Reply, model: type[ModelT]) -> ModelT:
        """The validated body of a 200 answer; raises :class:`RequestFailed` naming URL, status and problem.

        401/403 are fatal: the token will be refused again, whatever is retried.
        """
        if reply.status in AUTH_STATUS:
            message = f"http reward {reply.where}: HTTP {reply.status}: {self._token_problem()}: {reply.snippet()}"
            raise RequestFailed(message, attempts=reply.attempts, fatal=f"{message} (retrying cannot help)")
        if reply.status == 404:
            message = f"http reward {reply.where}: HTTP 404: no such endpoint; is params.url the base URL of a {PROTOCOL} server?"
            raise RequestFailed(message, attempts=reply.attempts)
        if reply.status == 413:
            # A batch refused as too large is split before it gets here: this is one item, and smaller requests cannot help.
            message = f"http reward {reply.where}: HTTP 413: {reply.snippet()}: one item is more than this server accepts"
            raise RequestFailed(f"{message}; raise the limit it names, or send smaller media", attempts=reply.attempts)
        if reply.status != 200:
            raise RequestFailed(f"http reward {reply.where}: HTTP {reply.status}{reply.tried}: {reply.snippet()}", attempts=reply.attempts)
        try:
            # pydantic's own JSON parser: no intermediate objects, a depth limit instead of a
            # RecursionError, and NaN/Infinity tokens (which sloppy servers emit for bad scores)
            # read as floats, so that they are refused per item as non-finite, not as a malformed batch.
            return model.model_validate_json(reply.body)
        except (ValueError, RecursionError) as exc:  # ValidationError is a ValueError
            problem = _validation_summary(exc) if isinstance(exc, ValidationError) else f"{type(exc).__name__}: {exc}"
            what = f"HTTP 200 with a malformed body (not {PROTOCOL}'s {model.__name__})"
            raise RequestFailed(f"http reward {reply.where}: {what}: {problem}: {reply.snippet()}", attempts=reply.attempts) from None

    def _token_problem(self) -> str:
        env = self.params.token_env
        if env is None:
            return (
                "the server wants a bearer token and none is configured; "
                "set params.token_env to the NAME of an environment variable holding it"
            )
        return f"the server rejected the token; check the bearer token in environment variable {env!r} (params.token_env)"

    def _endpoint(self, path: str) -> str:
        return f"{self.params.url}{path}"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _encode_references(references: References | None) -> list[str | None] | None:
    """Base64 PNG of each reference (None stays None), each distinct array encoded once: a group shares one."""
    if references is None:
        return None
    encoded: dict[int, str] = {}
    for reference in references:
        if reference is not None and id(reference) not in encoded:
            encoded[id(reference)] = encode_png(reference)
    return [None if r is None else encoded[id(r)] for r in references]


def _validation_summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in exc.errors()[:3]]
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more
