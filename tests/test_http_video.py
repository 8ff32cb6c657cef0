"""HTTP reward protocol v1 with ``video/mp4`` items: MP4 on the wire, real servers on loopback.

Two video servers: a toy "motion" reward written here as a FastAPI app speaking the protocol (mean
absolute frame-to-frame difference, a stand-in for a VideoAlign-style motion-quality model), and
the built-in server serving ``frame_average`` over ``brightness``. H.264 is lossy, so scores are
compared with the same computation on the frames the server decodes: the MP4s the client sent, read
back from the recorded requests. (Encoding the same frames again is not a stand-in: x264 in PyAV
writes slightly different bytes now and then while other threads of the process decode video.)
"""

from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, HTTPException, Request

from raygrpo.reward import make_reward
from raygrpo.reward.http import PROTOCOL, ScoreRequest, decode_mp4, encode_mp4
from raygrpo.reward.media import video_encoder
from tests.test_http_reward import FAST, LiveServer, serve_builtin, template_server

H = W = 32
FRAMES = 6


def motion(frames: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames, in [0, 1]; 0 for a single frame."""
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames.astype(np.float64), axis=0)).mean() / 255.0)


def motion_app(max_batch: int = 4) -> FastAPI:
    """A third-party-style video reward server: only the protocol, no raygrpo server code."""
    app = FastAPI()

    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info():
        return {"name": "motion", "media_types": ["video/mp4"], "max_batch": max_batch}

    @app.post("/v1/score")
    async def score(request: Request):
        body = ScoreRequest.model_validate(await request.json())
        if body.protocol != PROTOCOL or len(body.items) > max_batch:
            raise HTTPException(400, "bad request")
        results = []
        for item in reversed(body.items):  # answer out of order: the client must match by id
            try:
                if item.media_type != "video/mp4":
                    raise ValueError(f"unsupported media_type {item.media_type!r}")
                frames = decode_mp4(base64.b64decode(item.data, validate=True))
                results.append({"id": item.id, "score": motion(frames), "error": None, "details": {"frames": len(frames)}})
            except ValueError as exc:
                results.append({"id": item.id, "score": None, "error": str(exc), "details": {}})
        return {"request_id": body.request_id, "results": results}

    return app


def videos(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(static [3, F, H, W, 3], moving [3, F, H, W, 3])``: flat or smooth frames; moving ones shift a bar."""
    rng = np.random.default_rng(seed)
    static = np.empty((3, FRAMES, H, W, 3), np.uint8)
    moving = np.empty_like(static)
    for n in range(3):
        base = rng.integers(40, 200, size=3)
        static[n] = base.astype(np.uint8)
        for f in range(FRAMES):
            frame = np.full((H, W, 3), base, np.uint8)
            x = (4 * f + 3 * n) % (W - 8)
            frame[:, x : x + 8] = 255 - base  # a vertical bar sliding right
            moving[n, f] = frame
    return static, moving


def http_video_reward(url: str, **params):
    return make_reward("http", {"url": url, "media_type": "video/mp4", **FAST, **params})


def sent_videos(server) -> list[np.ndarray]:
    """The decoded videos of every scoring request the server got, in item-id order."""
    items = {int(item["id"]): item for body in server.recorder.bodies("/v1/score") for item in body["items"]}
    return [decode_mp4(base64.b64decode(items[i]["data"])) for i in sorted(items)]


@pytest.fixture(scope="module")
def motion_server():
    server = LiveServer(motion_app(max_batch=4))
    yield server
    server.close()


@pytest.fixture(scope="module")
def frame_average_server():
    reward = make_reward("frame_average", {"reward": {"kind": "brightness"}, "max_frames": 4})
    server = LiveServer(serve_builtin.create_app(reward, name="frame_average", max_batch=3))
    yield server
    server.close()


def test_mp4_roundtrip_and_odd_sizes():
    assert video_encoder() in ("libx264", "mpeg4")
    _, moving = videos()
    data = encode_mp4(moving[0], fps=8)
    assert data[4:8] == b"ftyp"  # an MP4 file
    decoded = decode_mp4(data)
    assert decoded.shape == moving[0].shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - moving[0]).mean() < 6  # lossy, but close
    odd = np.ascontiguousarray(moving[0][:, :31, :29])
    assert decode_mp4(encode_mp4(odd)).shape == (FRAMES, 32, 30, 3)  # padded to even dims
    assert decode_mp4(encode_mp4(moving[0][:1])).shape == (1, H, W, 3)
    with pytest.raises(ValueError, match="cannot decode MP4"):
        decode_mp4(b"definitely not an mp4")


def test_motion_server_static_vs_moving_matched_by_id(motion_server):
    static, moving = videos()
    batch = np.concatenate([static, moving])  # 6 videos, max_batch 4: two concurrent requests
    reward = http_video_reward(motion_server.url)
    outcome = reward.score_outcome(batch, [f"p{i}" for i in range(len(batch))])
    assert outcome.valid.all(), outcome.errors
    assert np.all(outcome.values[:3] < 0.01), outcome.values
    assert np.all(outcome.values[3:] > 0.02), outcome.values
    expected = np.array([motion(v) for v in sent_videos(motion_server)], dtype=np.float32)
    np.testing.assert_allclose(outcome.values, expected, rtol=1e-6, atol=1e-7)
    assert len(motion_server.recorder.bodies("/v1/score")) == 2
    # On the wire: base64 MP4s in JSON, ids 0..N-1.
    sent = [item for body in motion_server.recorder.bodies("/v1/score") for item in body["items"]]
    assert sorted(int(item["id"]) for item in sent) == list(range(6))
    assert all(item["media_type"] == "video/mp4" and base64.b64decode(item["data"])[4:8] == b"ftyp" for item in sent)


def test_builtin_frame_average_over_http(frame_average_server):
    info = httpx.get(f"{frame_average_server.url}/v1/info").json()
    assert info["media_types"] == ["image/png", "video/mp4"]
    static, moving = videos(seed=1)
    batch = np.concatenate([moving, static[:2]])
    reward = http_video_reward(frame_average_server.url)
    frame_average_server.recorder.requests.clear()
    outcome = reward.score_outcome(batch, ["a"] * len(batch))
    assert outcome.valid.all(), outcome.errors
    in_process = make_reward("frame_average", {"reward": {"kind": "brightness"}, "max_frames": 4})
    expected = in_process.score(np.stack(sent_videos(frame_average_server)), ["a"] * len(batch))
    np.testing.assert_allclose(outcome.values, expected, rtol=1e-6, atol=1e-7)
    # Close to the score of the original pixels too (codec error only).
    np.testing.assert_allclose(outcome.values, in_process.score(batch, ["a"] * len(batch)), atol=0.02)
    # The same server still scores images.
    images = moving[:, 0]
    image_values = make_reward("http", {"url": frame_average_server.url, **FAST}).score(images, ["a"] * 3)
    np.testing.assert_allclose(image_values, in_process.score(images, ["a"] * 3), rtol=1e-6)


def test_builtin_server_video_item_errors(frame_average_server):
    _, moving = videos()
    good = {"id": "ok", "prompt": "p", "media_type": "video/mp4", "data": base64.b64encode(encode_mp4(moving[0])).decode()}
    bad = {"id": "bad", "prompt": "p", "media_type": "video/mp4", "data": base64.b64encode(b"not an mp4").decode()}
    body = {"protocol": PROTOCOL, "request_id": "r", "items": [good, bad]}
    results = {r["id"]: r for r in httpx.post(f"{frame_average_server.url}/v1/score", json=body).json()["results"]}
    assert results["ok"]["error"] is None and math.isfinite(results["ok"]["score"])
    assert results["bad"]["score"] is None and "cannot decode MP4" in results["bad"]["error"]


def test_image_only_servers_make_every_video_invalid():
    _, moving = videos()
    image_only = LiveServer(serve_builtin.create_app(make_reward("brightness", {}), name="brightness", max_batch=4))
    template = LiveServer(template_server.create_app(max_batch=4))
    try:
        # Readiness check: /v1/info does not list video/mp4, so no video is sent at all.
        outcome = http_video_reward(image_only.url).score_outcome(moving, ["a"] * 3)
        assert not outcome.valid.any() and np.isnan(outcome.values).all()
        assert all("accepts ['image/png'], not 'video/mp4'" in e for e in outcome.errors), outcome.errors
        assert image_only.recorder.count("/v1/score") == 0
        # Without the check (batch_size set, /v1/info not asked), the servers refuse each item.
        for server in (image_only, template):
            outcome = http_video_reward(server.url, batch_size=2).score_outcome(moving, ["a"] * 3)
            assert not outcome.valid.any() and np.isnan(outcome.values).all()
            assert all("unsupported media_type 'video/mp4'" in e for e in outcome.errors), outcome.errors
    finally:
        image_only.close()
        template.close()


def test_video_input_shape_is_checked(motion_server):
    _, moving = videos()
    with pytest.raises(ValueError, match=r"\[N, F, H, W, 3\]"):
        http_video_reward(motion_server.url).score_outcome(moving[:, 0], ["a"] * 3)
