"""HTTP plumbing shared by the rewards that call a server (``http``, ``vlm_judge``): retries with
backoff, a cap on what a server may send back, and a tally of what a scoring call went through.

A request ends in a :class:`Reply` (a complete answer, body read, whatever its status) or raises
:class:`RequestFailed` (no usable answer: transport errors or timeouts on every attempt, a body over
the cap). Deciding what a status means is the caller's business.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import functools
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np

from raygrpo.reward.base import ScoreOutcome

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Longest sleep between two attempts, whatever the backoff or the server's Retry-After says: a
# server asking for minutes would otherwise stall a reward worker (and the groups queued on it)
# far past what the training step can wait for.
MAX_RETRY_DELAY_S = 30.0

RETRYABLE_STATUS = frozenset({429}) | frozenset(range(500, 600))

# The server refused who we are: the same credentials will be refused again, for the whole run.
AUTH_STATUS = frozenset({401, 403})

# How much of a body goes into an error message.
_SNIPPET_CHARS = 300

# A service check makes two quick attempts per request, so that a server that is down fails a run's
# preflight within seconds: connection refused in well under one, no answer at all in 2 x timeout_s.
SERVICE_CHECK_ATTEMPTS = 2
_SERVICE_CHECK_BACKOFF_S = 0.2


class RequestFailed(Exception):
    """A request that produced no usable answer; the message is what every affected item reports.

    ``attempts``: how many were made (0: never sent). ``fatal``: set when no later request can do
    better (the server rejected the credentials), saying what to fix.
    """

    def __init__(self, message: str, *, attempts: int = 1, fatal: str | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.fatal = fatal


@dataclass(frozen=True)
class Reply:
    """A complete HTTP answer: its status, headers and whole body, and the attempts it took."""

    method: str
    url: str
    status: int
    headers: httpx.Headers
    body: bytes
    attempts: int

    @property
    def where(self) -> str:
        """``"POST http://host/v1/score"``: how error messages name the request."""
        return f"{self.method} {self.url}"

    @property
    def tried(self) -> str:
        """``" after 3 attempts"`` when the request was retried, else empty: for error messages."""
        return f" after {self.attempts} attempts" if self.attempts > 1 else ""

    def snippet(self) -> str:
        """The start of the body as text, one line, for error messages."""
        text = self.body[: _SNIPPET_CHARS * 4].decode("utf-8", errors="replace").strip().replace("\n", " ")
        return (text[:_SNIPPET_CHARS] + "...") if len(text) > _SNIPPET_CHARS else (text or "(empty body)")

    def json(self) -> Any:
        """The body as JSON; ValueError for anything that does not decode (including absurdly deep nesting)."""
        try:
            return json.loads(self.body)
        except RecursionError:
            raise ValueError("JSON nested too deeply to decode") from None


@dataclass(frozen=True)
class Retries:
    """How one request is attempted: ``max_attempts`` (the first included), ``timeout_s`` per attempt, first ``backoff_s``."""

    max_attempts: int
    timeout_s: float
    backoff_s: float

    @classmethod
    def service_check(cls, timeout_s: float) -> Retries:
        """Retries of a service check's requests: :data:`SERVICE_CHECK_ATTEMPTS` quick attempts."""
        return cls(SERVICE_CHECK_ATTEMPTS, timeout_s, _SERVICE_CHECK_BACKOFF_S)

    @property
    def budget_s(self) -> float:
        """An upper bound on one request's time, waits between attempts included (up to 1 s of them)."""
        return self.max_attempts * self.timeout_s + 1.0


@dataclass
class CallTally:
    """Retries, failed requests and the first fatal error of one scoring call.

    Shared by the call's concurrent requests: they run on one event loop, so plain counters are safe.
    """

    retries: int = 0
    failures: int = 0
    fatal: str | None = None

    def answered(self, reply: Reply) -> None:
        """Count a request that got a usable answer."""
        self.retries += reply.attempts - 1

    def failed(self, exc: RequestFailed) -> None:
        """Count a request that ended without usable scores."""
        self.retries += max(exc.attempts - 1, 0)
        self.failures += 1
        if self.fatal is None:
            self.fatal = exc.fatal

    def outcome(self, values: np.ndarray, errors: list[str | None]) -> ScoreOutcome:
        """The call's outcome: items with an error (or a non-finite value) are invalid and NaN."""
        values = np.asarray(values, dtype=np.float32).copy()
        valid = np.array([e is None for e in errors], dtype=bool) & np.isfinite(values)
        values[~valid] = np.nan
        return ScoreOutcome(values, valid, list(errors), retries=self.retries, failures=self.failures, fatal=self.fatal)

    def all_invalid(self, n: int, exc: RequestFailed) -> ScoreOutcome:
        """Count ``exc`` and make every one of ``n`` items invalid with its message."""
        self.failed(exc)
        return ScoreOutcome.all_invalid(n, str(exc), retries=self.retries, failures=self.failures, fatal=self.fatal)


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
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    label: str,
    retries: Retries,
    max_body_bytes: int,
    limit_hint: str = "",
    smaller_hint: str = "",
    **kwargs: Any,
) -> Reply:
    """The first answer not worth retrying, or the last one, with its body read.

    Transport errors, timeouts, 429 and 5xx are retried with jittered exponential backoff (429 honours
    ``Retry-After``, capped); any other status is returned at once. Raises :class:`RequestFailed`
    when the last attempt ended in a transport error or timeout, or at once when a body exceeds
    ``max_body_bytes`` (reading stops there: a server cannot make the trainer buffer gigabytes);
    ``limit_hint`` ends that message (which setting raises the limit); ``smaller_hint`` names the setting that makes
    requests smaller, for a connection dropped while a request body was on its way (:func:`describe_transport_error`).
    ``retries.timeout_s`` bounds each attempt from connect to last byte. ``kwargs`` go to ``httpx.AsyncClient.stream``
    (``content``, ``json``, ``headers``).
    """
    max_attempts, timeout_s, backoff_s = retries.max_attempts, retries.timeout_s, retries.backoff_s
    for attempt in range(1, max_attempts + 1):
        start = time.monotonic()
        try:
            # wait_for bounds the whole attempt; httpx's own timeout is per read/write, so a
            # server trickling bytes would otherwise never time out.
            status, headers, body = await asyncio.wait_for(_exchange(client, method, url, max_body_bytes, **kwargs), timeout=timeout_s)
        except _BodyTooLarge:
            message = f"{label} {method} {url}: the answer exceeds the limit of {max_body_bytes} bytes, reading stopped"
            raise RequestFailed(f"{message}{limit_hint}", attempts=attempt) from None
        except (httpx.TransportError, asyncio.TimeoutError) as exc:
            problem = describe_transport_error(exc, timeout_s, _content_bytes(kwargs.get("content")), smaller_hint)
            if attempt == max_attempts:
                raise RequestFailed(f"{label} {method} {url} failed after {max_attempts} attempt(s): {problem}", attempts=attempt) from None
            delay = _backoff_delay(attempt, backoff_s)
        else:
            if status not in RETRYABLE_STATUS or attempt == max_attempts:
                return Reply(method, url, status, headers, body, attempt)
            delay = _backoff_delay(attempt, backoff_s)
            if status == 429:
                retry_after = _retry_after_s(headers.get("Retry-After"))
                if retry_after is not None:
                    delay = min(retry_after, MAX_RETRY_DELAY_S)
            problem = f"HTTP {status}"
        logger.info(
            "%s %s %s: attempt %d/%d: %s (%.1f s); retrying in %.2f s",
            label, method, url, attempt, max_attempts, problem, time.monotonic() - start, delay,
        )  # fmt: skip
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises on its last attempt


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default certificate check (certifi's CAs, or ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), built once per process.

    Every client gets it through :func:`async_client`. httpx builds a context for each client it creates, reading the whole
    CA bundle (about 60 ms of CPU), even for plain-http URLs, and a reward opens a client per scoring call, so
    once per group and reward. One context serves any number of clients, loops and threads.
    """
    return httpx.create_ssl_context()


def async_client(timeout_s: float, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """The HTTP client every reward endpoint talks through: ``timeout_s`` per request, no redirects (a token never
    follows one to another host), the process's one TLS context (:func:`tls_context`)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), headers=headers, follow_redirects=False, verify=tls_context())


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from synchronous code.

    On a private event loop; from a thread that already runs one (an async actor, a notebook), on a
    helper thread instead, since a loop cannot be nested.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def describe_transport_error(exc: BaseException, timeout_s: float, sent_bytes: int | None = None, smaller_hint: str = "") -> str:
    """What went wrong on the wire, in words a user can act on.

    ``sent_bytes``: the size of the request body, if it had one. A connection dropped while such a request was on
    its way is often a refusal of its size: a server may answer 413 before reading the body and close the
    connection (``reward_servers/protocol_guard.py`` does for bodies over 4 x its limit). httpx's asyncio client
    loses that answer: the server's reset fails its upload, and the transport is torn down with the 413 unread
    (httpx's sync client reads it). So the message says what to try. ``smaller_hint`` names the setting that
    makes requests smaller.
    """
    if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)):
        return f"timed out: did not answer within {timeout_s:g} s"
    if isinstance(exc, httpx.ConnectError):
        if _caused_by(exc, ConnectionRefusedError):
            return "cannot connect: nothing is listening there (connection refused); is the server running, on this host and port?"
        return f"cannot connect ({exc}); is the host name right and the server reachable from here?"
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
        dropped = f"the connection was closed before an answer could be read ({detail})"
        if not sent_bytes:
            return dropped
        return (
            f"{dropped}; the request was {sent_bytes} bytes, and a server refusing a body over its size limit may close "
            f"the connection instead of answering 413: if this persists, send smaller requests{smaller_hint} "
            "or raise the server's request size limit"
        )
    return detail


def _content_bytes(content: Any) -> int | None:
    """Size of a request's ``content`` (bytes or str), None for other bodies or none."""
    if isinstance(content, str):
        return len(content.encode())
    return len(content) if isinstance(content, (bytes, bytearray)) else None


class _BodyTooLarge(Exception):
    pass


async def _exchange(
    client: httpx.AsyncClient, method: str, url: str, max_body_bytes: int, **kwargs: Any
) -> tuple[int, httpx.Headers, bytes]:
    # Streamed so that reading can stop at the cap; leaving the block drops the connection.
    async with client.stream(method, url, **kwargs) as response:
        body = bytearray()
        async for chunk in response.aiter_bytes():  # decoded: the cap holds for compressed answers too
            body += chunk
            if len(body) > max_body_bytes:
                raise _BodyTooLarge
        return response.status_code, response.headers, bytes(body)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _backoff_delay(attempt: int, backoff_s: float) -> float:
    # Exponential, with jitter in [0.5, 1.5) so that replicas that failed together do not retry together.
    return min(backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()), MAX_RETRY_DELAY_S)


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
