"""HTTP reward protocol v1: the client (raygrpo.reward.http) against real servers on loopback.

Every server here is a real uvicorn server in a background thread: the built-in-reward server, the
copyable template, and one "chaos" app whose URL prefix picks a misbehaviour (``/s500/v1/score``
answers 500 once, ``/always503/...`` always 503, ...). Each app is wrapped in a recorder that keeps
every request, so the tests can count attempts and inspect the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import pickle
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image

from raygrpo.config import RewardConfig
from raygrpo.contracts import GroupMedia, PromptGroup
from raygrpo.net import free_port
from raygrpo.reward import RewardServiceError, check_reward_service, make_reward
from raygrpo.reward.http import PROTOCOL, HttpReward, encode_png
from raygrpo.reward.transport import tls_context
from raygrpo.reward.worker import RewardWorker

from .conftest import ROOT, load_script, wait_healthy
FAST = {"backoff_s": 0.01, "timeout_s": 5.0}  # retries in milliseconds, so the suite stays quick


def _load(name: str):
    return load_script(ROOT / "reward_servers" / f"{name}.py", f"reward_servers_{name}")


serve_builtin = _load("serve_builtin")
template_server = _load("template_server")


# ------------------------------------------------------------------------------------------------
# Live servers
# ------------------------------------------------------------------------------------------------


class Recorder:
    """ASGI middleware keeping (method, path, headers, body) of every HTTP request."""

    def __init__(self, app):
        self.app = app
        self.requests: list[dict] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = {"method": scope["method"], "path": scope["path"], "headers": dict(scope["headers"]), "body": bytearray()}
        self.requests.append(record)

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                record["body"] += message.get("body", b"")
            return message

        await self.app(scope, recording_receive, send)

    def count(self, path_suffix: str, method: str | None = None) -> int:
        return sum(1 for r in self.requests if r["path"].endswith(path_suffix) and (method is None or r["method"] == method))

    def bodies(self, path_suffix: str) -> list[dict]:
        return [json.loads(bytes(r["body"])) for r in self.requests if r["path"].endswith(path_suffix) and r["method"] == "POST"]


class LiveServer:
    """A uvicorn server on a free loopback port, in a daemon thread, ready when constructed."""

    def __init__(self, app):
        self.recorder = Recorder(app)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.recorder, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_healthy(f"{self.url}/v1/health" if _has_root_health(app) else f"{self.url}/ok/v1/health")
        self.recorder.requests.clear()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _has_root_health(app) -> bool:
    return any(getattr(route, "path", None) == "/v1/health" for route in app.routes)



def chaos_app(state: Counter) -> FastAPI:
    """One app, many misbehaviours: the first path segment names the behaviour of /v1/score."""
    app = FastAPI()

    @app.get("/{mode}/v1/health")
    async def health(mode: str):
        if mode == "unhealthy":
            return JSONResponse({"detail": "loading"}, status_code=503)
        if mode == "notok":
            return {"status": "loading"}
        return {"status": "ok"}

    @app.get("/{mode}/v1/info")
    async def info(mode: str, request: Request):
        if mode == "authinfo" and request.headers.get("authorization") != f"Bearer {CHAOS_TOKEN}":
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        if mode == "forbidden":
            return JSONResponse({"detail": "not for you"}, status_code=403)
        if mode == "noinfo":
            return {"name": mode, "max_batch": "four"}
        return {"name": mode, "media_types": ["video/mp4"] if mode == "videoonly" else ["image/png"], "max_batch": 4}

    @app.post("/{mode}/v1/score")
    async def score(mode: str, request: Request):
        state[mode] += 1
        calls = state[mode]
        if mode in ("forbidden", "unauthorized"):
            return JSONResponse({"detail": "go away"}, status_code=403 if mode == "forbidden" else 401)
        if mode == "deep":
            return Response(b"[" * 100_000, media_type="application/json")
        if mode == "badutf8":
            return Response(b'{"request_id": "\xff\xfe"}', media_type="application/json")
        if mode == "endless":
            return StreamingResponse(_endless_json(), media_type="application/json")
        body = await request.json()
        items = body["items"]
        results = [{"id": it["id"], "score": 10.0 + int(it["id"]), "error": None, "details": {"raw": 1.0}} for it in items]
        answer = {"request_id": body["request_id"], "results": results}
        if mode == "s500" and calls == 1:
            return JSONResponse({"detail": "boom"}, status_code=500)
        if mode == "rate429" and calls == 1:
            return JSONResponse({"detail": "slow down"}, status_code=429, headers={"Retry-After": "1"})
        if mode == "always503":
            return JSONResponse({"detail": "overloaded"}, status_code=503)
        if mode == "bad400":
            return JSONResponse({"detail": "you sent nonsense"}, status_code=400)
        if mode == "garbage":
            return Response(b"this is {not json", media_type="application/json")
        if mode == "schema":
            return {"request_id": body["request_id"], "results": "nope"}
        if mode == "missing":
            answer["results"] = results[:-1] + [{"id": "999", "score": 1.0, "error": None, "details": {}}]
        if mode == "dupes":
            answer["results"] = results + [{"id": "0", "score": -5.0, "error": None, "details": {}}]
        if mode == "shuffled":
            random.Random(calls).shuffle(results)
        if mode == "nonfinite":
            results[0]["score"], results[1]["score"], results[2]["score"] = float("nan"), float("inf"), 1e39
            # Python's json writes NaN/Infinity tokens, as many sloppy servers do.
            return Response(json.dumps(answer).encode(), media_type="application/json")
        if mode == "nullscore":
            results[0].update(score=None, error="model OOM")
            results[1].update(score=None, error=None)
        if mode == "wrongid":
            answer["request_id"] = "someone-else"
        if mode == "strscore":
            results[0]["score"] = "0.5"
        if mode == "boolscore":
            results[1]["score"] = True
        if mode == "padded":  # 20 kB of an extra field per item: within 4 MiB, over 10 kB per item
            answer["padding"] = "x" * (20_000 * len(items))
        if mode == "slow" and calls == 1 or mode == "slowalways":
            await asyncio.sleep(1.0)
        if mode == "slowok":
            await asyncio.sleep(0.3)
        return answer

    return app


CHAOS_TOKEN = "chaos-token"


async def _endless_json():
    # A body that never ends: the client must stop reading at its cap, not buffer until it times out.
    yield b'{"request_id": "'
    while True:
        yield b"x" * 65536
        await asyncio.sleep(0)


@pytest.fixture(scope="module")
def chaos_server():
    state = Counter()
    server = LiveServer(chaos_app(state))
    server.state = state
    yield server
    server.close()


@pytest.fixture
def chaos(chaos_server):
    chaos_server.state.clear()
    chaos_server.recorder.requests.clear()
    return chaos_server


@pytest.fixture(scope="module")
def builtin_server():
    server = LiveServer(serve_builtin.create_app(make_reward("jpeg_compressibility", {}), name="jpeg", max_batch=3))
    yield server
    server.close()


@pytest.fixture(scope="module")
def web():
    """One plain httpx client for the tests' own requests: each module-level httpx.get builds a TLS context (~60 ms)."""
    with httpx.Client(timeout=5, verify=tls_context()) as client:
        yield client


def images_of(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def http_reward(url: str, **params) -> HttpReward:
    return make_reward("http", {"url": url, **FAST, **params})


# ------------------------------------------------------------------------------------------------
# Against the built-in-reward server
# ------------------------------------------------------------------------------------------------


def test_builtin_server_matches_in_process_reward(builtin_server):
    images = images_of(7, size=32, seed=1)
    prompts = [f"prompt {i}" for i in range(7)]
    outcome = http_reward(builtin_server.url).score_outcome(images, prompts)
    expected = make_reward("jpeg_compressibility", {}).score(images, prompts)
    assert outcome.valid.all() and outcome.errors == [None] * 7
    np.testing.assert_array_equal(outcome.values, expected)  # PNG is lossless: the server saw the same pixels
    # max_batch 3 from /v1/info: 7 items -> 3 requests of 3, 3 and 1
    rec = builtin_server.recorder
    assert sorted(len(b["items"]) for b in rec.bodies("/v1/score")) == [1, 3, 3]
    assert rec.count("/v1/info") == 1 and rec.count("/v1/health") == 1


def test_wire_is_json_with_base64_png_never_pickle(builtin_server):
    builtin_server.recorder.requests.clear()
    images = images_of(2, seed=2)
    reward = http_reward(builtin_server.url, batch_size=2)
    reward.score_outcome(images, ["a red car", "a cat"], policy_version=7, metadata=[{"seed": 1}, {"seed": 2}])
    (record,) = [r for r in builtin_server.recorder.requests if r["path"] == "/v1/score"]
    assert record["headers"][b"content-type"] == b"application/json"
    body = bytes(record["body"])
    assert b"\x80\x04\x95" not in body and b"\x80\x05\x95" not in body  # pickle protocol 4/5 frame headers
    payload = json.loads(body)  # the whole body is JSON
    assert payload["protocol"] == PROTOCOL and payload["policy_version"] == 7
    assert [it["id"] for it in payload["items"]] == ["0", "1"]
    assert [it["metadata"] for it in payload["items"]] == [{"seed": 1}, {"seed": 2}]
    assert [it["prompt"] for it in payload["items"]] == ["a red car", "a cat"]
    for item, image in zip(payload["items"], images):
        raw = base64.b64decode(item["data"], validate=True)
        assert item["media_type"] == "image/png" and raw.startswith(b"\x89PNG\r\n\x1a\n")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(raw))), image)


def test_413_for_too_many_items_splits_the_batch(builtin_server):
    builtin_server.recorder.requests.clear()
    images = images_of(8, seed=3)
    outcome = http_reward(builtin_server.url, batch_size=8).score_outcome(images, ["p"] * 8)
    assert outcome.valid.all()
    np.testing.assert_array_equal(outcome.values, make_reward("jpeg_compressibility", {}).score(images, ["p"] * 8))
    # max_batch 3: 8 -> 413, two of 4 -> 413, four of 2 -> scored
    assert sorted(len(b["items"]) for b in builtin_server.recorder.bodies("/v1/score")) == [2, 2, 2, 2, 4, 4, 8]


SMALL_LIMIT = 3000  # request bytes: one 32x32 noise image is about 4.4 kB of JSON, two about 8.7 kB


@pytest.fixture(scope="module")
def small_server():
    server = LiveServer(serve_builtin.create_app(make_reward("brightness", {}), name="small", max_request_bytes=SMALL_LIMIT))
    yield server
    server.close()


def test_request_over_byte_limit_is_413_and_not_retried(small_server):
    small_server.recorder.requests.clear()
    outcome = http_reward(small_server.url, batch_size=2).score_outcome(images_of(2, size=32), ["a", "b"])
    assert not outcome.valid.any() and np.isnan(outcome.values).all()
    assert all("413" in e and "/v1/score" in e and f"{SMALL_LIMIT} bytes" in e and "raise the limit" in e for e in outcome.errors)
    assert small_server.recorder.count("/v1/score") == 3  # 2 items -> 413, then each alone -> 413; no retries
    # Every body was within what the server reads and drops after an early 413 (keeping the connection), so the
    # client always reads the 413; bodies beyond that are the next test's.
    sizes = [int(r["headers"][b"content-length"]) for r in small_server.recorder.requests if r["path"] == "/v1/score"]
    assert all(SMALL_LIMIT < size <= serve_builtin.guard.DISCARD_FACTOR * SMALL_LIMIT for size in sizes), sizes


def test_request_far_over_byte_limit_fails_with_what_to_do(small_server):
    # 8 MiB: the server answers 413 and closes the connection mid-upload; httpx's asyncio client then mostly sees a
    # reset, not the 413 (transport.describe_transport_error). Either way the message must say what to change.
    small_server.recorder.requests.clear()
    reward = http_reward(small_server.url, batch_size=1, max_attempts=1)
    outcome = reward.score_outcome(images_of(1), ["a"], metadata=[{"padding": "x" * (8 << 20)}])
    (error,) = outcome.errors
    assert not outcome.valid.any() and outcome.failures == 1 and outcome.fatal is None
    if "HTTP 413" in error:
        assert f"{SMALL_LIMIT} bytes" in error and "raise the limit" in error, error
    else:
        size = int(re.search(r"the request was (\d+) bytes", error)[1])
        assert "connection was closed before an answer" in error and size > 8 << 20 and "after 1 attempt" in error, error
        assert "send smaller requests (smaller media) or raise the server's request size limit" in error, error
    assert small_server.recorder.count("/v1/score") == 1


def test_token_auth(monkeypatch):
    server = LiveServer(serve_builtin.create_app(make_reward("brightness", {}), name="locked", token="s3cret-token"))
    try:
        images = images_of(2)
        # No token: 401 is not retried, every item invalid with a message naming the status.
        outcome = http_reward(server.url).score_outcome(images, ["a", "b"])
        assert not outcome.valid.any() and all("401" in e and server.url in e for e in outcome.errors)
        assert server.recorder.count("/v1/score") == 1
        monkeypatch.setenv("RAYGRPO_TEST_TOKEN", "wrong")
        outcome = http_reward(server.url, token_env="RAYGRPO_TEST_TOKEN").score_outcome(images, ["a", "b"])
        assert not outcome.valid.any() and "401" in outcome.errors[0]
        monkeypatch.setenv("RAYGRPO_TEST_TOKEN", "s3cret-token")
        reward = http_reward(server.url, token_env="RAYGRPO_TEST_TOKEN")
        outcome = reward.score_outcome(images, ["a", "b"])
        assert outcome.valid.all()
        np.testing.assert_allclose(outcome.values, make_reward("brightness", {}).score(images, ["a", "b"]))
        last = server.recorder.requests[-1]
        assert last["headers"][b"authorization"] == b"Bearer s3cret-token"
        # The token never travels inside a pickled reward; it is read from the environment again.
        assert b"s3cret" not in pickle.dumps(reward)
        assert pickle.loads(pickle.dumps(reward)).score_outcome(images, ["a", "b"]).valid.all()
    finally:
        server.close()


def test_missing_token_env_fails_at_construction(monkeypatch):
    monkeypatch.delenv("RAYGRPO_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ValueError, match="'RAYGRPO_NO_SUCH_TOKEN'.*not set"):
        make_reward("http", {"url": "http://127.0.0.1:1", "token_env": "RAYGRPO_NO_SUCH_TOKEN"})
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        make_reward("http", {"url": "http://127.0.0.1:1", "token_env": "Bearer abc.def"})
    with pytest.raises(ValueError, match=r"'http'.*parameter 'url'"):
        make_reward("http", {"url": "127.0.0.1:8000"})
    with pytest.raises(ValueError, match="unknown parameter 'timeout'"):
        make_reward("http", {"url": "http://127.0.0.1:1", "timeout": 3})


def test_builtin_server_rejects_bad_requests_clearly(builtin_server, web):
    url = f"{builtin_server.url}/v1/score"
    good = {"id": "ok", "prompt": "p", "media_type": "image/png", "data": encode_png(images_of(1)[0])}

    def post(payload, **kw):
        return web.post(url, json=payload, timeout=5, **kw)

    base = {"protocol": PROTOCOL, "request_id": "r1", "policy_version": 0}
    r = post({**base, "protocol": "raygrpo.reward/v2", "items": [good]})
    assert r.status_code == 400 and "protocol" in r.json()["detail"]
    r = post({**base, "items": [dict(good, id=str(i)) for i in range(4)]})
    assert r.status_code == 413 and "max_batch of 3" in r.json()["detail"]
    r = web.post(url, content=b"{not json", headers={"content-type": "application/json"}, timeout=5)
    assert r.status_code == 400
    r = post({**base, "items": [dict(good, data=123)]})
    assert r.status_code == 422
    r = post({**base, "items": [good, good]})
    assert r.status_code == 400 and "unique" in r.json()["detail"]
    # Bad media are per-item errors in a 200, and the good item is still scored.
    not_png = base64.b64encode(b"GIF89a not a png").decode()
    truncated = encode_png(images_of(1)[0])[:40]
    items = [
        good,
        dict(good, id="b64", data="!!! not base64 !!!"),
        dict(good, id="gif", data=not_png),
        dict(good, id="cut", data=truncated + "=" * (-len(truncated) % 4)),
    ]
    r = post({**base, "items": items[:3]})
    assert r.status_code == 200 and r.json()["request_id"] == "r1"
    results = {res["id"]: res for res in r.json()["results"]}
    assert results["ok"]["error"] is None and results["ok"]["score"] < 0
    assert results["b64"]["score"] is None and "base64" in results["b64"]["error"]
    assert results["gif"]["score"] is None and "PNG" in results["gif"]["error"]
    r = post({**base, "items": items[3:]})
    assert r.status_code == 200 and r.json()["results"][0]["score"] is None and "PNG" in r.json()["results"][0]["error"]


def test_builtin_server_cli_with_token(monkeypatch, web):
    port = free_port()
    env = {**os.environ, "CLI_REWARD_TOKEN": "cli-secret"}
    command = [sys.executable, str(ROOT / "reward_servers" / "serve_builtin.py"), "--kind", "jpeg_compressibility",
               "--params", '{"quality": 90}', "--port", str(port), "--token-env", "CLI_REWARD_TOKEN", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # A new Python importing torch: seconds on a quiet machine, tens of them on a loaded one; a crash ends the wait.
        wait_healthy(f"http://127.0.0.1:{port}/v1/health", timeout_s=90, process=proc)
        monkeypatch.setenv("CLI_REWARD_TOKEN", "cli-secret")
        images = images_of(3, seed=5)
        outcome = http_reward(f"http://127.0.0.1:{port}", token_env="CLI_REWARD_TOKEN").score_outcome(images, ["a"] * 3)
        assert outcome.valid.all()
        np.testing.assert_array_equal(outcome.values, make_reward("jpeg_compressibility", {"quality": 90}).score(images, ["a"] * 3))
        assert web.get(f"http://127.0.0.1:{port}/v1/info").json() == {
            "name": "jpeg_compressibility", "media_types": ["image/png"], "max_batch": 64,
        }  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------
# Against the template server
# ------------------------------------------------------------------------------------------------


def test_template_server_protocol_and_token(monkeypatch, web):
    server = LiveServer(template_server.create_app(token="tmpl-token", max_batch=2))
    try:
        images = images_of(5, seed=6)
        monkeypatch.setenv("RAYGRPO_TEMPLATE_TOKEN", "tmpl-token")
        outcome = http_reward(server.url, token_env="RAYGRPO_TEMPLATE_TOKEN").score_outcome(images, ["x"] * 5)
        assert outcome.valid.all()
        np.testing.assert_allclose(outcome.values, make_reward("brightness", {}).score(images, ["x"] * 5), rtol=1e-6)
        assert server.recorder.count("/v1/score") == 3  # max_batch 2 from /v1/info
        assert web.get(f"{server.url}/v1/info").json() == {"name": "template-brightness", "media_types": ["image/png"], "max_batch": 2}
        # Without the token: 401, not retried.
        server.recorder.requests.clear()
        refused = http_reward(server.url).score_outcome(images[:1], ["x"])
        assert not refused.valid.any() and "401" in refused.errors[0] and server.recorder.count("/v1/score") == 1
        # A bad item is an error for that item only.
        auth = {"Authorization": "Bearer tmpl-token"}
        items = [{"id": "a", "prompt": "p", "media_type": "image/png", "data": encode_png(images[0])},
                 {"id": "b", "prompt": "p", "media_type": "image/png", "data": "bm90IGEgcG5n"}]  # fmt: skip
        r = web.post(f"{server.url}/v1/score", json={"protocol": PROTOCOL, "request_id": "t", "items": items}, headers=auth)
        results = {res["id"]: res for res in r.json()["results"]}
        assert r.status_code == 200 and results["a"]["score"] == pytest.approx(outcome.values[0], rel=1e-6)
        assert results["b"]["score"] is None and "PNG" in results["b"]["error"]
        r = web.post(f"{server.url}/v1/score", json={"protocol": "v0", "request_id": "t", "items": items}, headers=auth)
        assert r.status_code == 400
        r = web.post(f"{server.url}/v1/score", json={"protocol": PROTOCOL, "request_id": "t", "items": items * 2}, headers=auth)
        assert r.status_code == 413
    finally:
        server.close()


# ------------------------------------------------------------------------------------------------
# Against misbehaving servers
# ------------------------------------------------------------------------------------------------


def test_batches_follow_info_and_info_is_fetched_once(chaos):
    reward = http_reward(f"{chaos.url}/ok")
    for _ in range(2):
        outcome = reward.score_outcome(images_of(10), ["p"] * 10)
        assert outcome.valid.all() and list(outcome.values) == [10.0 + i for i in range(10)]
    assert sorted(len(b["items"]) for b in chaos.recorder.bodies("/ok/v1/score")) == [2, 2, 4, 4, 4, 4]
    assert chaos.recorder.count("/v1/info") == 1 and chaos.recorder.count("/v1/health") == 1
    # An explicit batch_size needs no /v1/info.
    chaos.recorder.requests.clear()
    http_reward(f"{chaos.url}/ok", batch_size=3, check_health=False).score_outcome(images_of(7), ["p"] * 7)
    assert chaos.recorder.count("/v1/score") == 3 and chaos.recorder.count("/v1/info") == 0 and chaos.recorder.count("/v1/health") == 0


def test_batches_are_sent_concurrently(chaos):
    start = time.monotonic()
    outcome = http_reward(f"{chaos.url}/slowok", batch_size=2, max_concurrency=4).score_outcome(images_of(8), ["p"] * 8)
    assert outcome.valid.all() and chaos.recorder.count("/v1/score") == 4
    assert time.monotonic() - start < 1.0  # four 0.3 s requests one after another would take 1.2 s


def test_results_are_matched_by_id_not_order(chaos):
    outcome = http_reward(f"{chaos.url}/shuffled", batch_size=4).score_outcome(images_of(4), ["p"] * 4)
    assert outcome.valid.all() and list(outcome.values) == [10.0, 11.0, 12.0, 13.0]


def test_500_then_ok_is_retried(chaos):
    outcome = http_reward(f"{chaos.url}/s500").score_outcome(images_of(3), ["p"] * 3)
    assert outcome.valid.all() and list(outcome.values) == [10.0, 11.0, 12.0]
    assert chaos.recorder.count("/s500/v1/score") == 2


def test_429_honours_retry_after(chaos):
    start = time.monotonic()
    outcome = http_reward(f"{chaos.url}/rate429").score_outcome(images_of(2), ["p"] * 2)
    elapsed = time.monotonic() - start
    assert outcome.valid.all() and chaos.recorder.count("/rate429/v1/score") == 2
    assert 0.9 < elapsed < 3.0  # Retry-After: 1, not the 0.01 s backoff


def test_always_503_exhausts_the_budget(chaos):
    start = time.monotonic()
    outcome = http_reward(f"{chaos.url}/always503", max_attempts=3).score_outcome(images_of(3), ["p"] * 3)
    assert not outcome.valid.any() and np.isnan(outcome.values).all()
    assert chaos.recorder.count("/always503/v1/score") == 3
    error = outcome.errors[0]
    assert f"{chaos.url}/always503/v1/score" in error and "HTTP 503 after 3 attempts" in error and "overloaded" in error
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("mode, expected", [("bad400", "HTTP 400"), ("garbage", "malformed"), ("schema", "malformed")])
def test_not_retried(chaos, mode, expected):
    outcome = http_reward(f"{chaos.url}/{mode}").score_outcome(images_of(3), ["p"] * 3)
    assert not outcome.valid.any() and np.isnan(outcome.values).all()
    assert all(expected in e and f"{chaos.url}/{mode}/v1/score" in e for e in outcome.errors)
    assert chaos.recorder.count(f"/{mode}/v1/score") == 1


def test_missing_and_unknown_ids(chaos, caplog):
    with caplog.at_level(logging.WARNING, logger="raygrpo.reward.http"):
        outcome = http_reward(f"{chaos.url}/missing").score_outcome(images_of(3), ["p"] * 3)
    assert list(outcome.valid) == [True, True, False] and list(outcome.values[:2]) == [10.0, 11.0]
    assert "no result for item '2'" in outcome.errors[2]
    assert "ids that were not sent" in caplog.text and "999" in caplog.text


def test_duplicate_ids_make_the_item_invalid(chaos):
    outcome = http_reward(f"{chaos.url}/dupes").score_outcome(images_of(3), ["p"] * 3)
    assert list(outcome.valid) == [False, True, True] and "several results for item '0'" in outcome.errors[0]
    assert list(outcome.values[1:]) == [11.0, 12.0]


def test_non_finite_and_null_scores(chaos):
    outcome = http_reward(f"{chaos.url}/nonfinite").score_outcome(images_of(4), ["p"] * 4)
    assert list(outcome.valid) == [False, False, False, True] and outcome.values[3] == 13.0
    assert all("non-finite" in e for e in outcome.errors[:3])
    outcome = http_reward(f"{chaos.url}/nullscore").score_outcome(images_of(3), ["p"] * 3)
    assert list(outcome.valid) == [False, False, True] and outcome.values[2] == 12.0
    assert "model OOM" in outcome.errors[0] and "null score" in outcome.errors[1]


def test_mismatched_request_id_is_refused(chaos):
    outcome = http_reward(f"{chaos.url}/wrongid").score_outcome(images_of(2), ["p"] * 2)
    assert not outcome.valid.any() and "request_id" in outcome.errors[0]


def test_timeout_then_ok(chaos):
    start = time.monotonic()
    outcome = http_reward(f"{chaos.url}/slow", timeout_s=0.3).score_outcome(images_of(2), ["p"] * 2)
    assert outcome.valid.all() and chaos.recorder.count("/slow/v1/score") == 2
    assert time.monotonic() - start < 0.9


def test_timeout_always(chaos):
    start = time.monotonic()
    outcome = http_reward(f"{chaos.url}/slowalways", timeout_s=0.2, max_attempts=2).score_outcome(images_of(2), ["p"] * 2)
    assert not outcome.valid.any() and "timed out" in outcome.errors[0] and "after 2 attempt" in outcome.errors[0]
    assert time.monotonic() - start < 0.9


def test_server_down():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    outcome = http_reward(url, max_attempts=3).score_outcome(images_of(2), ["p"] * 2)
    assert not outcome.valid.any() and np.isnan(outcome.values).all()
    assert url in outcome.errors[0] and "cannot connect" in outcome.errors[0] and "after 3 attempt" in outcome.errors[0]
    assert time.monotonic() - start < 2.0
    with pytest.raises(RuntimeError, match="2 of 2 items got no score"):
        http_reward(url, max_attempts=1).score(images_of(2), ["p"] * 2)


@pytest.mark.parametrize(
    "mode, expected", [("unhealthy", "HTTP 503 after 2 attempts"), ("notok", "status 'loading'"), ("videoonly", "video/mp4")]
)
def test_readiness_failures_are_reported_once_per_item(chaos, mode, expected):
    outcome = http_reward(f"{chaos.url}/{mode}", max_attempts=2).score_outcome(images_of(2), ["p"] * 2)
    assert not outcome.valid.any() and expected in outcome.errors[0] and chaos.recorder.count("/v1/score") == 0


def test_async_api_and_sync_api_inside_a_running_loop(chaos):
    reward = http_reward(f"{chaos.url}/ok")

    async def main():
        outcome = await reward.ascore_outcome(images_of(2), ["p"] * 2)
        values, valid = outcome.values, outcome.valid
        # The sync API must not try to nest event loops when called from async code.
        sync = reward.score_outcome(images_of(2), ["p"] * 2)
        return values, valid, sync.values, sync.valid

    values, valid, sync_values, sync_valid = asyncio.run(main())
    assert valid.all() and sync_valid.all() and list(values) == list(sync_values) == [10.0, 11.0]


def test_reward_worker_scores_a_group_over_http(chaos):
    worker = RewardWorker(RewardConfig(name="remote", kind="http", params={"url": f"{chaos.url}/ok", **FAST}))
    group = PromptGroup(group_id=3, prompt_id=0, prompt="a cat", group_size=4, seed=0, policy_version=0)
    scores, seconds = worker.score(GroupMedia(group=group, images=images_of(4)))
    assert scores.group_id == 3 and scores.reward_name == "remote" and scores.valid.all()
    assert list(scores.values) == [10.0, 11.0, 12.0, 13.0] and seconds < 5
    assert [it["prompt"] for it in chaos.recorder.bodies("/ok/v1/score")[0]["items"]] == ["a cat"] * 4


def test_the_reward_worker_sends_the_groups_policy_version(builtin_server):
    from raygrpo.contracts import GroupMedia, PromptGroup

    builtin_server.recorder.requests.clear()
    worker = RewardWorker(RewardConfig(name="remote", kind="http", params={"url": builtin_server.url, "batch_size": 4}))
    scores, _ = worker.score(GroupMedia(PromptGroup(3, 0, "a cat", 2, 0, policy_version=12), images_of(2, seed=5)))
    assert scores.valid.all() and scores.reward_name == "remote"
    assert [body["policy_version"] for body in builtin_server.recorder.bodies("/v1/score")] == [12]


# ------------------------------------------------------------------------------------------------
# Strict reading of answers: every problem is a batch error naming the URL, never an exception
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, field, problem",
    [
        ("strscore", "results.0.score", "valid number"),  # "0.5" is not coerced
        ("boolscore", "results.1.score", "valid number"),  # nor is true
        ("deep", "(body)", "recursion limit"),  # 100k '[' would be a RecursionError for json.loads
        ("badutf8", "(body)", "Invalid JSON"),
    ],
)
def test_answers_are_read_strictly(chaos, mode, field, problem):
    outcome = http_reward(f"{chaos.url}/{mode}").score_outcome(images_of(3), ["p"] * 3)
    assert not outcome.valid.any() and np.isnan(outcome.values).all()
    error = outcome.errors[0]
    assert f"{chaos.url}/{mode}/v1/score" in error and "malformed" in error and field in error and problem in error, error
    assert outcome.failures == 1 and outcome.retries == 0 and outcome.fatal is None
    assert chaos.recorder.count(f"/{mode}/v1/score") == 1  # a malformed answer is not retried


def test_an_endless_answer_stops_at_the_size_cap(chaos):
    start = time.monotonic()
    reward = http_reward(f"{chaos.url}/endless", max_response_bytes_per_item=100_000, batch_size=3, max_attempts=1)
    outcome = reward.score_outcome(images_of(3), ["p"] * 3)
    elapsed = time.monotonic() - start
    assert not outcome.valid.any() and outcome.failures == 1
    # Stopped at 3 x 100 kB, not timed out after buffering for timeout_s (5 s).
    assert all("exceeds the limit of 300000 bytes" in e and f"{chaos.url}/endless/v1/score" in e for e in outcome.errors), outcome.errors
    assert "max_response_bytes_per_item" in outcome.errors[0] and elapsed < 3.0


def test_the_size_cap_scales_with_the_batch(chaos):
    # 20 kB of padding per item: over a 10 kB-per-item cap, well within the default.
    padded = f"{chaos.url}/padded"
    outcome = http_reward(padded, batch_size=2, max_response_bytes_per_item=10_000).score_outcome(images_of(4), ["p"] * 4)
    assert not outcome.valid.any() and outcome.failures == 2 and "20000 bytes" in outcome.errors[0]
    outcome = http_reward(padded, batch_size=2).score_outcome(images_of(4), ["p"] * 4)
    assert outcome.valid.all() and list(outcome.values) == [10.0, 11.0, 12.0, 13.0]


# ------------------------------------------------------------------------------------------------
# Retries, failures and fatal errors are counted in the outcome
# ------------------------------------------------------------------------------------------------


def test_retries_and_failures_are_counted(chaos):
    outcome = http_reward(f"{chaos.url}/s500", batch_size=3).score_outcome(images_of(3), ["p"] * 3)
    assert outcome.valid.all() and (outcome.retries, outcome.failures, outcome.fatal) == (1, 0, None)
    outcome = http_reward(f"{chaos.url}/always503", max_attempts=3, batch_size=2).score_outcome(images_of(3), ["p"] * 3)
    assert not outcome.valid.any() and (outcome.retries, outcome.failures, outcome.fatal) == (4, 2, None)  # 2 batches x 2 retries
    outcome = http_reward(f"{chaos.url}/unhealthy", max_attempts=2).score_outcome(images_of(2), ["p"] * 2)
    assert (outcome.retries, outcome.failures) == (1, 1)  # the readiness check failed once, after one retry
    outcome = http_reward(f"{chaos.url}/nullscore").score_outcome(images_of(3), ["p"] * 3)
    assert (outcome.retries, outcome.failures) == (0, 0)  # a per-item error is not a failed call


def test_a_dead_server_counts_retries_and_one_failure():
    url = f"http://127.0.0.1:{free_port()}"
    outcome = http_reward(url, max_attempts=3).score_outcome(images_of(2), ["p"] * 2)
    assert (outcome.retries, outcome.failures, outcome.fatal) == (2, 1, None)
    assert "nothing is listening" in outcome.errors[0]


@pytest.mark.parametrize("mode, status", [("unauthorized", 401), ("forbidden", 403)])
def test_401_and_403_are_fatal_and_not_retried(chaos, mode, status, monkeypatch):
    monkeypatch.setenv("RAYGRPO_TEST_TOKEN", "stale")
    reward = http_reward(f"{chaos.url}/{mode}", batch_size=2, check_health=False, token_env="RAYGRPO_TEST_TOKEN")
    outcome = reward.score_outcome(images_of(2), ["p"] * 2)
    assert not outcome.valid.any() and chaos.recorder.count(f"/{mode}/v1/score") == 1
    assert outcome.failures == 1 and outcome.retries == 0
    assert f"{chaos.url}/{mode}/v1/score" in outcome.fatal and f"HTTP {status}" in outcome.fatal
    assert "'RAYGRPO_TEST_TOKEN' (params.token_env)" in outcome.fatal and "retrying cannot help" in outcome.fatal
    # Without a token configured, the fix is to configure one.
    outcome = http_reward(f"{chaos.url}/{mode}", batch_size=2, check_health=False).score_outcome(images_of(2), ["p"] * 2)
    assert "set params.token_env" in outcome.fatal


def test_an_unauthorised_info_is_fatal_too(chaos):
    outcome = http_reward(f"{chaos.url}/authinfo").score_outcome(images_of(2), ["p"] * 2)
    assert not outcome.valid.any() and "HTTP 401" in outcome.fatal and "/authinfo/v1/info" in outcome.fatal
    assert chaos.recorder.count("/v1/score") == 0


def test_the_reward_worker_files_counts_and_a_named_fatal(chaos):
    group = PromptGroup(group_id=3, prompt_id=0, prompt="a cat", group_size=2, seed=0, policy_version=0)
    worker = RewardWorker(RewardConfig(name="remote", kind="http", params={"url": f"{chaos.url}/s500", **FAST}))
    scores, _ = worker.score(GroupMedia(group=group, images=images_of(2)))
    assert scores.valid.all() and (scores.retries, scores.failures, scores.fatal) == (1, 0, None)
    worker = RewardWorker(RewardConfig(name="remote", kind="http", params={"url": f"{chaos.url}/forbidden", "batch_size": 2, **FAST}))
    scores, _ = worker.score(GroupMedia(group=group, images=images_of(2)))
    assert not scores.valid.any() and scores.failures == 1
    assert scores.fatal.startswith("reward 'remote': http reward POST") and "HTTP 403" in scores.fatal


# ------------------------------------------------------------------------------------------------
# Service check (the run's preflight): health, then info with the token
# ------------------------------------------------------------------------------------------------


def test_service_check_passes_for_healthy_servers(chaos, builtin_server):
    http_reward(f"{chaos.url}/ok").check_service()
    assert chaos.recorder.count("/ok/v1/health") == 1 and chaos.recorder.count("/ok/v1/info") == 1
    check_reward_service("jpeg", "http", {"url": builtin_server.url})
    # The token goes to /v1/info (servers may guard it as they guard /v1/score).
    os.environ["RAYGRPO_CHAOS_TOKEN"] = CHAOS_TOKEN
    try:
        http_reward(f"{chaos.url}/authinfo", token_env="RAYGRPO_CHAOS_TOKEN").check_service()
    finally:
        del os.environ["RAYGRPO_CHAOS_TOKEN"]


def test_service_check_of_a_dead_server_fails_fast():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RewardServiceError, match="reward 'judge'") as info:
        check_reward_service("judge", "http", {"url": url})  # default timeout and attempts of the preflight
    elapsed = time.monotonic() - start
    print(f"\nservice check of a dead server failed in {elapsed:.2f} s")
    assert f"{url}/v1/health" in str(info.value) and "nothing is listening" in str(info.value)
    assert elapsed < 15.0


def test_service_check_of_a_server_that_never_answers_fails_within_its_budget():
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RewardServiceError, match="did not answer within 0.25 s"):
            http_reward(url).check_service(timeout_s=0.25)
        assert time.monotonic() - start < 2 * 0.25 + 1.0  # two attempts of 0.25 s, with a short wait between


@pytest.mark.parametrize(
    "mode, token, expected",
    [
        ("authinfo", None, "HTTP 401: the server wants a bearer token and none is configured"),
        ("authinfo", "wrong", "HTTP 401: the server rejected the token; check the bearer token in environment variable 'RAYGRPO_TEST"),
        ("forbidden", CHAOS_TOKEN, "HTTP 403: the server rejected the token"),
        ("noinfo", None, "(not raygrpo.reward/v1's ServerInfo): media_types: Field required; max_batch: Input should be a valid integer"),
        ("videoonly", None, "server 'videoonly' accepts ['video/mp4'], not 'image/png' (params.media_type)"),
        ("notok", None, "status 'loading', not 'ok'"),
        ("not/a/reward/server", None, "HTTP 404: no such endpoint; is params.url the base URL of a raygrpo.reward/v1 server?"),
    ],
)
def test_service_check_names_url_and_cause(chaos, monkeypatch, mode, token, expected):
    params = {"url": f"{chaos.url}/{mode}"}
    if token is not None:
        monkeypatch.setenv("RAYGRPO_TEST_TOKEN", token)
        params["token_env"] = "RAYGRPO_TEST_TOKEN"
    start = time.monotonic()
    with pytest.raises(RewardServiceError) as info:
        check_reward_service("scorer", "http", params)
    message = str(info.value)
    assert message.startswith(f"reward 'scorer': http reward GET {chaos.url}/{mode}/v1/") and expected in message, message
    assert time.monotonic() - start < 2.0
    assert chaos.recorder.count("/v1/score") == 0


def test_service_check_does_not_hide_bad_params():
    with pytest.raises(ValueError, match="parameter 'url'") as info:
        check_reward_service("scorer", "http", {"url": "localhost:8000"})
    assert not isinstance(info.value, RewardServiceError)
    check_reward_service("local", "brightness", {})  # nothing to check
