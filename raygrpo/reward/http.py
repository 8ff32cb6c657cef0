"""A reward served over HTTP: the client side of protocol ``raygrpo.reward/v1``.

Any process that answers three endpoints can score images (or videos) for raygrpo, in any language,
on any machine, with any model and any dependencies; raygrpo never imports it::

    GET  /v1/health  -> 200 {"status": "ok"}
    GET  /v1/info    -> 200 {"name": str, "media_types": [str], "max_batch": int}
    POST /v1/score   (JSON; "Authorization: Bearer <token>" when the server wants one)
         request:  {"protocol": "raygrpo.reward/v1", "request_id": str, "policy_version": int,
                    "items": [{"id", "prompt", "media_type", "data": base64 PNG/MP4, "metadata"}]}
         response: {"request_id": str,
                    "results": [{"id", "score": float | null, "error": str | null, "details": {str: float}}]}

Version 1 is a fixed contract: fields may only be added by a new protocol version, so that servers
written against it keep working. Only JSON and base64 media cross the wire, never pickle: a reward
server is a separate trust domain, and unpickling its bytes would let it run code in the trainer.

Failures never raise out of :meth:`HttpReward.score_with_errors` and never become a silent 0: each
item that got no usable score is returned invalid (NaN) with a message naming the URL and the cause,
and the controller applies ``scoring.on_failure``. The server implementations live in
``reward_servers/`` (a built-in-reward server and a copyable template).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import email.utils
import io
import json
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import httpx
import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, ValidationError, field_validator

from raygrpo.reward.builtin import NON_FINITE_ERROR, Reward, RewardParams
from raygrpo.reward.media import DEFAULT_FPS, decode_mp4, encode_mp4  # noqa: F401 - decode_mp4 re-exported for servers

logger = logging.getLogger(__name__)

PROTOCOL = "raygrpo.reward/v1"
MediaType = Literal["image/png", "video/mp4"]

# Longest sleep between two attempts, whatever the backoff or the server's Retry-After says: a
# server asking for minutes would otherwise stall a reward worker (and the groups queued on it)
# far past what the training step can wait for.
MAX_RETRY_DELAY_S = 30.0

# zlib level 1: PNG stays lossless at any level, and level 6 (PIL's default) costs several times
# the CPU for a ~10-30% smaller body, on a reward actor that typically holds a fraction of a core.
PNG_COMPRESS_LEVEL = 1

# How much of an error response body goes into an item's error message.
_BODY_SNIPPET = 300

_FLOAT32_MAX = float(np.finfo(np.float32).max)

_RETRYABLE_STATUS = frozenset({429}) | frozenset(range(500, 600))


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


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    protocol: Literal["raygrpo.reward/v1"] = PROTOCOL
    request_id: str
    policy_version: int = 0  # version of the policy weights that generated the media
    items: list[ScoreItem]


class ScoreResult(BaseModel):
    """The server's verdict on one item: a finite ``score``, or ``error`` saying why there is none."""

    id: str
    score: float | None = None
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


class _Failed(Exception):
    """A request that produced no usable answer; the message is what every affected item reports."""


def check_base_url(url: str) -> httpx.URL:
    """The parsed URL if ``url`` is an absolute http(s) URL with a host; else a ValueError saying what is expected."""
    try:
        parsed = httpx.URL(url) if "://" in url else None
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"must be an http(s) base URL such as http://127.0.0.1:8000, got {url!r}")
    return parsed


async def request_with_retries(
    client: httpx.AsyncClient, method: str, url: str, *, label: str, max_attempts: int, timeout_s: float, backoff_s: float, **kwargs: Any
) -> tuple[httpx.Response, int]:
    """``(response, attempts made)``: the first answer not worth retrying, or the last one.

    Transport errors, timeouts, 429 and 5xx are retried with jittered exponential backoff (429 honours
    ``Retry-After``, capped); any other status is returned at once. Raises :class:`_Failed` when the
    last attempt ended in a transport error or timeout. Shared by every HTTP-backed reward.
    """
    for attempt in range(1, max_attempts + 1):
        start = time.monotonic()
        try:
            # wait_for bounds the whole attempt; httpx's own timeout is per read/write, so a
            # server trickling bytes would otherwise never time out.
            response = await asyncio.wait_for(client.request(method, url, **kwargs), timeout=timeout_s)
        except (httpx.TransportError, asyncio.TimeoutError) as exc:
            problem = _describe_transport_error(exc, time.monotonic() - start, timeout_s)
            if attempt == max_attempts:
                raise _Failed(f"{label} {method} {url} failed after {max_attempts} attempt(s): {problem}") from None
            delay = _backoff_delay(attempt, backoff_s)
        else:
            if response.status_code not in _RETRYABLE_STATUS or attempt == max_attempts:
                return response, attempt
            delay = _backoff_delay(attempt, backoff_s)
            if response.status_code == 429:
                retry_after = _retry_after_s(response.headers.get("Retry-After"))
                if retry_after is not None:
                    delay = min(retry_after, MAX_RETRY_DELAY_S)
            problem = f"HTTP {response.status_code}"
        logger.info("%s %s %s: attempt %d/%d: %s; retrying in %.2f s", label, method, url, attempt, max_attempts, problem, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


def _backoff_delay(attempt: int, backoff_s: float) -> float:
    # Exponential, with jitter in [0.5, 1.5) so that replicas that failed together do not retry together.
    return min(backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()), MAX_RETRY_DELAY_S)


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
    * ``media_type``: ``image/png`` (default): inputs are images ``[N, H, W, 3]`` uint8, sent as
      lossless PNG, so the server sees the exact pixels. ``video/mp4``: inputs are videos
      ``[N, F, H, W, 3]`` uint8, each sent as one H.264 MP4 (lossy; see :mod:`raygrpo.reward.media`).
      The server's ``/v1/info`` must list the media type (checked when ``batch_size`` is unset).
    * ``video_fps``: frame rate written into the MP4s (videos only).
    * ``check_health``: ask ``/v1/health`` before the first request, so that a server that is down
      or still loading says so once, clearly, instead of as N failed batches.
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
        media_type: MediaType = "image/png"
        video_fps: int = Field(default=DEFAULT_FPS, ge=1)
        check_health: bool = True

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

    def score(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        policy_version: int = 0,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> np.ndarray:
        """``[N]`` float32 scores; raises ``RuntimeError`` if any item got none (see :meth:`score_with_errors`)."""
        values, valid, errors = self.score_with_errors(images, prompts, policy_version=policy_version, metadata=metadata)
        if not valid.all():
            bad = int((~valid).sum())
            first = next(e for e, ok in zip(errors, valid) if not ok)
            raise RuntimeError(f"reward 'http': {bad} of {len(valid)} items got no score; first: {first}")
        return values

    def score_with_errors(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        policy_version: int = 0,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """``(values [N] float32, valid [N] bool, errors [N])``, blocking; invalid items hold NaN.

        ``policy_version`` and per-item ``metadata`` (JSON-serialisable dicts) are sent to the
        server as they are. Runs :meth:`ascore_with_errors` on a private event loop; called from
        a thread that already runs one (an async actor, a notebook), it runs it on a helper
        thread instead, since a loop cannot be nested.
        """
        coro = self.ascore_with_errors(images, prompts, policy_version=policy_version, metadata=metadata)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, coro).result()

    async def ascore_with_errors(
        self,
        images: np.ndarray,
        prompts: list[str],
        *,
        policy_version: int = 0,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """The async form of :meth:`score_with_errors`.

        Items get ids ``"0"`` .. ``"N-1"`` (their index), are split into batches of at most
        ``batch_size`` (or the server's ``max_batch``) and the batches are sent concurrently,
        at most ``max_concurrency`` at a time. Bad arguments (shapes, lengths) raise ValueError;
        everything that goes wrong on the wire comes back as invalid items.
        """
        n = _check_inputs(images, prompts, metadata, video=self.params.media_type == "video/mp4")
        values = np.full(n, np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * n
        if n:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            timeout = httpx.Timeout(self.params.timeout_s)
            async with httpx.AsyncClient(timeout=timeout, headers=headers, follow_redirects=False) as client:
                try:
                    batch_size = await self._prepare(client)
                except _Failed as exc:
                    return _all_invalid(n, str(exc))
                semaphore = asyncio.Semaphore(self.params.max_concurrency)
                batches = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
                outcomes = await asyncio.gather(
                    *(self._score_batch(client, semaphore, images, prompts, metadata, batch, policy_version) for batch in batches)
                )
            for outcome in outcomes:
                for index, (value, error) in outcome.items():
                    values[index], errors[index] = value, error
        valid = np.array([e is None for e in errors], dtype=bool)
        values[~valid] = np.nan
        return values, valid, errors

    # ----------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------

    async def _prepare(self, client: httpx.AsyncClient) -> int:
        """Check health and learn ``max_batch`` once per instance (again after a failure)."""
        if not self._server_checked:
            if self.params.check_health:
                body = self._parse(*await self._request(client, "GET", "/v1/health"), Health)
                if body.status != "ok":
                    raise _Failed(f"http reward {self._endpoint('/v1/health')}: server reports status {body.status!r}, not 'ok'")
            if self.params.batch_size is None:
                info = self._parse(*await self._request(client, "GET", "/v1/info"), ServerInfo)
                if self.params.media_type not in info.media_types:
                    raise _Failed(
                        f"http reward {self._endpoint('/v1/info')}: server {info.name!r} accepts {info.media_types}, "
                        f"not {self.params.media_type!r}"
                    )
                self._server_max_batch = info.max_batch
            self._server_checked = True
        return self.params.batch_size or self._server_max_batch or 1

    async def _score_batch(
        self,
        client: httpx.AsyncClient,
        semaphore: asyncio.Semaphore,
        images: np.ndarray,
        prompts: list[str],
        metadata: Sequence[Mapping[str, Any]] | None,
        indices: range,
        policy_version: int,
    ) -> dict[int, tuple[float, str | None]]:
        # Encoding is CPU work (zlib releases the GIL), done off the event loop so that batches
        # already encoded can be on the wire meanwhile.
        try:
            items = await asyncio.to_thread(self._encode_items, images, prompts, metadata, indices)
        except Exception as exc:  # noqa: BLE001 - e.g. metadata that is not JSON: the items fail, not the worker
            message = f"http reward: could not encode items for {self._endpoint('/v1/score')}: {type(exc).__name__}: {exc}"
            return {i: (math.nan, message) for i in indices}
        by_id = await self._send(client, semaphore, items, policy_version)
        return {int(item_id): outcome for item_id, outcome in by_id.items()}

    def _encode_items(
        self, images: np.ndarray, prompts: list[str], metadata: Sequence[Mapping[str, Any]] | None, indices: range
    ) -> list[ScoreItem]:
        items = []
        for i in indices:
            meta = dict(metadata[i]) if metadata is not None else {}
            json.dumps(meta, allow_nan=False)  # fail here, per batch, rather than inside httpx
            if self.params.media_type == "video/mp4":
                data = base64.b64encode(encode_mp4(images[i], self.params.video_fps)).decode("ascii")
            else:
                data = encode_png(images[i])
            items.append(ScoreItem(id=str(i), prompt=prompts[i], media_type=self.params.media_type, data=data, metadata=meta))
        return items

    async def _send(
        self, client: httpx.AsyncClient, semaphore: asyncio.Semaphore, items: list[ScoreItem], policy_version: int
    ) -> dict[str, tuple[float, str | None]]:
        """Outcome per item id of one batch; a 413 splits the batch in halves and sends both."""
        request = ScoreRequest(request_id=f"{uuid.uuid4().hex}-{items[0].id}", policy_version=policy_version, items=items)
        body = request.model_dump_json().encode()
        # The semaphore covers the HTTP exchange only: halves of a split batch must be able to take
        # slots while their parent waits for them, or enough concurrent splits would deadlock.
        async with semaphore:
            try:
                response, attempts = await self._request(client, "POST", "/v1/score", content=body)
                too_large = response.status_code == 413 and len(items) > 1
                parsed = None if too_large else self._parse(response, attempts, ScoreResponse)
            except _Failed as exc:
                return {item.id: (math.nan, str(exc)) for item in items}
        if parsed is None:
            logger.warning(
                "http reward %s: 413 for a batch of %d items (%d bytes); splitting it in halves",
                self._endpoint("/v1/score"), len(items), len(body),
            )  # fmt: skip
            half = len(items) // 2
            first, second = await asyncio.gather(
                self._send(client, semaphore, items[:half], policy_version), self._send(client, semaphore, items[half:], policy_version)
            )
            return {**first, **second}
        if parsed.request_id != request.request_id:
            # A different request's answer (a caching proxy, a server mixing up concurrent
            # requests) would pair scores with the wrong images: refuse it whole.
            message = (
                f"http reward {self._endpoint('/v1/score')}: response request_id {parsed.request_id!r} "
                f"does not match the request's {request.request_id!r}"
            )
            return {item.id: (math.nan, message) for item in items}
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

    async def _request(
        self, client: httpx.AsyncClient, method: str, path: str, content: bytes | None = None
    ) -> tuple[httpx.Response, int]:
        headers = {"Content-Type": "application/json"} if content is not None else None
        return await request_with_retries(
            client, method, self._endpoint(path), label="http reward", max_attempts=self.params.max_attempts,
            timeout_s=self.params.timeout_s, backoff_s=self.params.backoff_s, content=content, headers=headers,
        )  # fmt: skip

    def _parse(self, response: httpx.Response, attempts: int, model: type[BaseModel]) -> Any:
        """The validated body of a 200 answer; raises :class:`_Failed` naming URL, status and problem."""
        what = f"{response.request.method} {response.request.url}"
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        if response.status_code != 200:
            raise _Failed(f"http reward {what}: HTTP {response.status_code}{tried}: {_snippet(response)}")
        try:
            # Python's json accepts NaN/Infinity tokens, which some servers emit for bad scores;
            # they are then rejected per item as non-finite rather than as a malformed batch.
            return model.model_validate(json.loads(response.content))
        except (ValueError, ValidationError) as exc:
            problem = _validation_summary(exc) if isinstance(exc, ValidationError) else f"invalid JSON ({exc})"
            raise _Failed(f"http reward {what}: HTTP 200 with a malformed body: {problem}: {_snippet(response)}") from None

    def _endpoint(self, path: str) -> str:
        return f"{self.params.url}{path}"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> str:
    """Base64 of ``image`` ``[H, W, 3]`` uint8 as a PNG file (lossless: the server sees these exact pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _check_inputs(images: np.ndarray, prompts: list[str], metadata: Sequence[Mapping[str, Any]] | None, *, video: bool = False) -> int:
    ndim, shape = (5, "[N, F, H, W, 3] (media_type video/mp4)") if video else (4, "[N, H, W, 3]")
    if not isinstance(images, np.ndarray) or images.ndim != ndim or images.shape[-1] != 3 or images.dtype != np.uint8:
        desc = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{'videos' if video else 'images'} must be a uint8 array {shape}, got {desc}")
    if video and images.shape[1] == 0:
        raise ValueError(f"videos have no frames (shape {images.shape})")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != len(images):
        raise ValueError(f"got {len(images)} images but {len(metadata)} metadata entries")
    return len(images)


def _all_invalid(n: int, message: str) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    return np.full(n, np.nan, dtype=np.float32), np.zeros(n, dtype=bool), [message] * n


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds (a fraction is tolerated) or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _describe_transport_error(exc: BaseException, elapsed: float, timeout_s: float) -> str:
    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
        return f"timed out after {elapsed:.1f} s (timeout_s={timeout_s:g})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc or 'connection refused'}); is the server running?"
    return f"{type(exc).__name__}: {exc}"


def _snippet(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return (text[:_BODY_SNIPPET] + "...") if len(text) > _BODY_SNIPPET else (text or "(empty body)")


def _validation_summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '(body)'}: {err['msg']}" for err in exc.errors()[:3]]
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more
