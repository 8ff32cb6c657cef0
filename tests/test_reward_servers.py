"""The servers in reward_servers/ against careless and hostile clients, and the OCR reward server.

Every server is a real uvicorn server on a loopback port in a daemon thread, wrapped so the test can
count the body bytes the app itself read. Raw sockets play the clients an HTTP library would not:
one that declares a gigabyte and sends a little, one that stops halfway through its body.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image, ImageDraw, ImageFont

from raygrpo.reward import make_reward
from raygrpo.reward.http import PROTOCOL, encode_png
from raygrpo.reward.media import encode_mp4

from .conftest import ROOT, load_script, wait_healthy
TOKEN = "guard-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIDE = 64  # the largest image the guarded servers take: max_image_pixels = SIDE * SIDE


def _load(name: str):
    return load_script(ROOT / "reward_servers" / f"{name}.py", f"reward_servers_{name}")


serve_builtin = _load("serve_builtin")
template_server = _load("template_server")
ocr_server = _load("ocr_server")
guard = sys.modules["protocol_guard"]  # the module the servers imported (loading them put reward_servers/ on sys.path)

LIMITS = guard.Limits(max_request_bytes=1 << 20, body_timeout_s=1.0, max_image_pixels=SIDE * SIDE, max_request_pixels=3 * SIDE * SIDE)


class Server:
    """A uvicorn server on a free loopback port; ``body_bytes`` counts what the app read of request bodies."""

    def __init__(self, app):
        self.body_bytes = 0

        async def counting_app(scope, receive, send):
            async def counted_receive():
                message = await receive()
                self.body_bytes += len(message.get("body", b""))
                return message

            await app(scope, counted_receive, send)

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.host, self.port = sock.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(counting_app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_healthy(f"{self.url}/v1/health")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)



@pytest.fixture(scope="module")
def servers():
    """Both servers with the same small limits and a token; the built-in one takes videos too (frame_average)."""
    reward = make_reward("frame_average", {"reward": {"kind": "brightness"}})
    started = {
        "builtin": Server(serve_builtin.create_app(reward, name="guarded", token=TOKEN, max_batch=8, limits=LIMITS)),
        "template": Server(template_server.create_app(token=TOKEN, max_batch=8, limits=LIMITS)),
    }
    yield started
    for server in started.values():
        server.close()


@pytest.fixture(params=["builtin", "template"])
def server(request, servers) -> Server:
    return servers[request.param]


def raw_post(server: Server, body: bytes, *, declared: int | None = None, token: str | None = TOKEN) -> socket.socket:
    """Send a POST /v1/score's headers (``Content-Length: declared``) and ``body``, leaving the socket open."""
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    length = len(body) if declared is None else declared
    head = f"POST /v1/score HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n{auth}Content-Length: {length}\r\n\r\n"
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(head.encode() + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def score_request(*items: dict) -> dict:
    return {"protocol": PROTOCOL, "request_id": "r", "policy_version": 0, "items": list(items)}


def png_item(item_id: str, data: bytes | np.ndarray) -> dict:
    encoded = encode_png(data) if isinstance(data, np.ndarray) else base64.b64encode(data).decode()
    return {"id": item_id, "prompt": "p", "media_type": "image/png", "data": encoded}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int) -> bytes:
    """A valid PNG of ``side`` x ``side`` black RGB pixels: about side * side / 340 bytes, side * side * 3 once decoded."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * side)  # filter byte + RGB
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
    return guard.PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def images(n: int, side: int = SIDE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# Token, body size, body time, JSON
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_wrong_token_is_401_before_the_body_is_read(server, token):
    """The 401 comes back after 64 KiB of a 4 MiB body; the app reads none of it, uvicorn drops the rest."""
    server.body_bytes = 0
    declared = guard.DISCARD_FACTOR * LIMITS.max_request_bytes
    with raw_post(server, b"x" * (64 << 10), declared=declared, token=token) as sock:
        status, body = read_response(sock)
        assert status == 401 and "bearer token" in body["detail"]
        # The connection lives on: once the rest of the body has been sent (and dropped), it serves the next request.
        sock.sendall(b"x" * (declared - (64 << 10)) + f"GET /v1/health HTTP/1.1\r\nHost: {server.host}\r\n\r\n".encode())
        assert read_response(sock) == (200, {"status": "ok"})
    assert server.body_bytes == 0


def test_wrong_token_with_a_huge_body_is_401_and_cut_off(server):
    """Beyond DISCARD_FACTOR x max_request_bytes nothing more is read, not even to drop it: the connection closes."""
    server.body_bytes = 0
    with raw_post(server, b"x" * 1024, declared=1 << 40, token="wrong-token") as sock:
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 401 and response.getheader("connection") == "close"
        with pytest.raises(OSError):  # reset, or broken pipe, long before a TiB
            for _ in range(1024):
                sock.sendall(b"x" * (64 << 10))
    assert server.body_bytes == 0


def test_raygrpo_client_reads_the_401_of_a_body_larger_than_socket_buffers(server, monkeypatch):
    """raygrpo's (asyncio) client sends its whole body before reading: it must see the 401, not a reset it would retry."""
    monkeypatch.setenv("GUARD_TEST_TOKEN", "wrong-token")
    reward = make_reward("http", {"url": server.url, "token_env": "GUARD_TEST_TOKEN", "batch_size": 8, "backoff_s": 0.01})
    outcome = reward.score_outcome(images(8, side=320), ["p"] * 8)  # about 3.3 MB of base64 PNG
    assert not outcome.valid.any() and all("401" in e for e in outcome.errors), outcome.errors


def test_declared_body_over_the_limit_is_413_before_reading(server):
    server.body_bytes = 0
    with raw_post(server, b"{", declared=1 << 30) as sock:
        status, body = read_response(sock)
    assert status == 413 and f"max_request_bytes of {1 << 20} bytes" in body["detail"]
    assert server.body_bytes == 0


def test_chunked_body_over_the_limit_is_413(server):
    server.body_bytes = 0
    chunks = (b" " * (64 << 10) for _ in range(40))  # 2.5 MiB with no Content-Length
    response = httpx.post(f"{server.url}/v1/score", content=chunks, headers=AUTH, timeout=10)
    assert response.status_code == 413 and "max_request_bytes" in response.json()["detail"]
    assert server.body_bytes < (1 << 20) + (256 << 10)  # of 2.5 MiB: stopped reading soon after the limit


def test_stalled_body_is_cut_off_with_408_and_the_connection_closed(server):
    start = time.monotonic()
    with raw_post(server, b'{"protocol": ', declared=1000) as sock:
        # Meanwhile the server answers everyone else.
        assert httpx.get(f"{server.url}/v1/info", timeout=0.5).status_code == 200
        status, body = read_response(sock)
        elapsed = time.monotonic() - start
        assert sock.recv(1) == b""  # closed by the server, not left waiting for the rest
    assert status == 408 and "body_timeout_s of 1 s" in body["detail"]
    assert LIMITS.body_timeout_s <= elapsed < LIMITS.body_timeout_s + 3


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, json.dumps(score_request()).encode()[:-1] + b', "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
    ids=["array", "object", "inside-request"],
)
def test_deeply_nested_json_is_400_not_500(server, body):
    response = httpx.post(f"{server.url}/v1/score", content=body, headers=AUTH, timeout=10)
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]


def test_moderately_nested_metadata_is_accepted(server):
    item = png_item("a", images(1)[0])
    item["metadata"] = {"deep": json.loads("[" * 100 + "]" * 100)}
    response = httpx.post(f"{server.url}/v1/score", json=score_request(item), headers=AUTH, timeout=10)
    assert response.status_code == 200 and response.json()["results"][0]["error"] is None


def test_not_json_and_wrong_shapes_are_4xx(server):
    def post(content: bytes) -> int:
        return httpx.post(f"{server.url}/v1/score", content=content, headers=AUTH, timeout=10).status_code

    assert post(b"\xff\xfe not utf-8") == 400
    assert post(b"[1, 2]") == 400
    assert post(json.dumps(score_request({"id": 1})).encode()) == 422


# ------------------------------------------------------------------------------------------------
# Decoded size, from the headers
# ------------------------------------------------------------------------------------------------


def test_png_bomb_is_413_naming_the_limit_before_decoding(server, monkeypatch):
    """The issue's case: a small PNG declaring 9000x9000 pixels (243 MB as RGB) is refused from its header."""
    decoded = []
    monkeypatch.setattr(guard.Media, "decode", lambda media: decoded.append(media) or np.zeros((1, 1, 3), np.uint8))
    bomb = png_bomb(9000)
    assert len(bomb) < 300_000 and Image.open(io.BytesIO(bomb)).size == (9000, 9000)
    response = httpx.post(f"{server.url}/v1/score", json=score_request(png_item("bomb", bomb)), headers=AUTH, timeout=30)
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "item 'bomb'" in detail and "9000x9000" in detail and f"max_image_pixels of {SIDE * SIDE}" in detail
    # Nothing of the request was decoded, not even the small image beside the bomb.
    response = httpx.post(f"{server.url}/v1/score", json=score_request(png_item("ok", images(1)[0]), png_item("bomb", bomb)),
                          headers=AUTH, timeout=30)  # fmt: skip
    assert response.status_code == 413 and decoded == []


def test_total_pixels_over_the_limit_is_413_and_the_client_splits_the_batch(server, monkeypatch):
    batch = images(4, seed=1)
    response = httpx.post(f"{server.url}/v1/score", json=score_request(*(png_item(str(i), im) for i, im in enumerate(batch))),
                          headers=AUTH, timeout=10)  # fmt: skip
    assert response.status_code == 413
    assert f"max_request_pixels of {3 * SIDE * SIDE}" in response.json()["detail"] and "send fewer items" in response.json()["detail"]
    # raygrpo's client halves a batch refused with 413: every image still gets its score.
    monkeypatch.setenv("GUARD_TEST_TOKEN", TOKEN)
    reward = make_reward("http", {"url": server.url, "token_env": "GUARD_TEST_TOKEN", "batch_size": 4, "backoff_s": 0.01})
    outcome = reward.score_outcome(batch, ["p"] * 4)
    assert outcome.valid.all(), outcome.errors
    np.testing.assert_allclose(outcome.values, make_reward("brightness", {}).score(batch, ["p"] * 4), rtol=1e-6)


def test_undecodable_media_fail_alone(server):
    good = png_item("good", images(1)[0])
    whole = base64.b64decode(encode_png(images(1, seed=3)[0]))
    broken = png_item("broken", whole[: len(whole) // 2])  # a valid header, pixel data cut off
    response = httpx.post(f"{server.url}/v1/score", json=score_request(good, broken), headers=AUTH, timeout=10)
    results = {r["id"]: r for r in response.json()["results"]}
    assert response.status_code == 200 and results["good"]["error"] is None
    assert results["broken"]["score"] is None and "cannot decode PNG" in results["broken"]["error"]


def test_video_size_comes_from_the_mp4_header(servers):
    server = servers["builtin"]
    rng = np.random.default_rng(2)
    small = encode_mp4(rng.integers(0, 256, size=(2, SIDE // 2, SIDE // 2, 3), dtype=np.uint8))
    long = encode_mp4(rng.integers(0, 256, size=(4, SIDE, SIDE, 3), dtype=np.uint8))  # 4 frames: over 3 x SIDE^2
    wide = encode_mp4(rng.integers(0, 256, size=(1, SIDE, 2 * SIDE, 3), dtype=np.uint8))

    def post(item_id: str, data: bytes) -> httpx.Response:
        item = {"id": item_id, "prompt": "p", "media_type": "video/mp4", "data": base64.b64encode(data).decode()}
        return httpx.post(f"{server.url}/v1/score", json=score_request(item), headers=AUTH, timeout=10)

    response = post("small", small)
    assert response.status_code == 200 and response.json()["results"][0]["error"] is None
    response = post("long", long)
    assert response.status_code == 413 and f"video of 4 frames of {SIDE}x{SIDE}" in response.json()["detail"]
    assert "max_request_pixels" in response.json()["detail"]
    response = post("wide", wide)
    assert response.status_code == 413 and "max_image_pixels" in response.json()["detail"]
    response = post("junk", b"not an mp4 at all")
    assert response.status_code == 200 and "cannot decode MP4" in response.json()["results"][0]["error"]


def test_limits_come_from_the_command_line():
    import argparse

    parser = argparse.ArgumentParser()
    guard.add_server_flags(parser, max_batch=5)
    args = parser.parse_args(["--max-request-mb", "2", "--body-timeout-s", "7", "--max-image-pixels", "100", "--max-request-pixels", "300"])
    assert args.max_batch == 5
    assert guard.limits_from_flags(parser, args) == guard.Limits(2 << 20, 7.0, 100, 300)
    with pytest.raises(SystemExit):
        guard.limits_from_flags(parser, parser.parse_args(["--body-timeout-s", "0"]))


# ------------------------------------------------------------------------------------------------
# The OCR reward server
# ------------------------------------------------------------------------------------------------


def test_ocr_reward_formula():
    """Flow-GRPO's: 1 - edit distance / target length, clipped at 0; spaces and case ignored; found inside = exact."""
    assert ocr_server.target_text('a cafe sign that says "Open 24 Hours", neon') == "Open 24 Hours"
    assert ocr_server.target_text("no quotes here") is None
    assert ocr_server.levenshtein("kitten", "sitting") == 3 and ocr_server.levenshtein("", "abc") == 3
    assert ocr_server.ocr_score("OPEN24HOURS", "Open 24 Hours") == 1.0
    assert ocr_server.ocr_score("welcome! open 24 hours daily", "Open 24 Hours") == 1.0
    assert ocr_server.ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)
    assert ocr_server.ocr_score("", "hello") == 0.0
    assert ocr_server.ocr_score("a much longer unrelated recognised text", "cat") == 0.0
    with pytest.raises(ValueError, match="empty"):
        ocr_server.ocr_score("anything", "  ")


def render(text: str) -> np.ndarray:
    image = Image.new("RGB", (384, 192), (235, 225, 205))
    ImageDraw.Draw(image).text((24, 64), text, fill=(20, 20, 30), font=ImageFont.load_default(size=48))
    return np.asarray(image)


needs_ocr_engine = pytest.mark.skipif(
    importlib.util.find_spec("rapidocr") is None or importlib.util.find_spec("onnxruntime") is None,
    reason=f"the OCR engine is not installed here; {ocr_server.INSTALL_HINT} (scripts/install.sh does)",
)


@needs_ocr_engine
def test_ocr_server_reads_rendered_text():
    server = Server(template_server.create_app(name="ocr", score_fn=ocr_server.OcrReward(threads=1), max_batch=4))
    try:
        prompt = 'a shop sign that says "Hello World"'
        items = [
            png_item("same", render("Hello World")),
            png_item("other", render("Goodbye")),
            png_item("blank", render("")),
            {**png_item("unquoted", render("Hello World")), "prompt": "a shop sign"},
        ]
        for item in items[:3]:
            item["prompt"] = prompt
        response = httpx.post(f"{server.url}/v1/score", json=score_request(*items), timeout=60)
        assert response.status_code == 200
        results = {r["id"]: r for r in response.json()["results"]}
        assert results["same"]["score"] == pytest.approx(1.0)
        assert results["other"]["score"] < 0.5
        assert results["blank"]["score"] == 0.0
        assert results["unquoted"]["score"] is None and "double quotes" in results["unquoted"]["error"]
    finally:
        server.close()


@needs_ocr_engine
def test_ocr_server_command_line_serves_protocol_v1(monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OCR_TEST_TOKEN", "ocr-secret")
    command = [sys.executable, str(ROOT / "reward_servers" / "ocr_server.py"), "--port", str(port), "--max-batch", "4",
               "--threads", "1", "--token-env", "OCR_TEST_TOKEN", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/v1/health", timeout_s=60)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/info").json() == {"name": "ocr", "media_types": ["image/png"], "max_batch": 4}
        reward = make_reward("http", {"url": f"http://127.0.0.1:{port}", "token_env": "OCR_TEST_TOKEN", "timeout_s": 60})
        assert reward.score(render("RAYGRPO")[None], ['the word "raygrpo" painted on a wall'])[0] == pytest.approx(1.0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
