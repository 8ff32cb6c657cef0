"""The run dashboard over real HTTP (uvicorn on 127.0.0.1), on run folders synthesised on disk; once in headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from raygrpo.gallery import GalleryEntry, write_step_gallery
from services.dashboard.app import create_app

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600.0


def _metrics_line(step: int) -> str:
    reward = -3.8 + 0.1 * step
    record = {
        "step": step,
        "policy_version": step,
        "reward/jpeg/mean": reward,
        "reward/jpeg/std": 0.05,
        "reward/color/mean": 0.3 + 0.02 * step,
        "reward/color/std": 0.01,
        "reward/total/mean": reward + 0.5 * (0.3 + 0.02 * step),
        "learner/loss": 0.01 / step,
        "learner/grad_norm": None if step == 2 else 0.5,  # a non-finite value is written as null
        "advantage/jpeg/mean": 0.0,
        "advantage/jpeg/std": 0.9,
        "advantage/jpeg/min": -1.2 - 0.1 * step,
        "advantage/jpeg/max": 1.5 + 0.1 * step,
        "groups/zero_std": float(step % 2),
        "rewards/color/missing": float(step - 1),  # a reward server failing more each step
        "rewards/color/retries": 2.0 * step,
        "rewards/color/errors": float(step - 1),
        "rewards/jpeg/missing": 0.0,
        "groups/dropped": float(step - 1),
        "groups/trained": float(3 - step),
        "time/generate": 0.8,
        "time/learner": 0.7 + 0.01 * step,
        "time/step": 1.6,
    }
    return json.dumps(record) + "\n"


def _pictures(group_id: int, g: int = 4) -> np.ndarray:
    """[G, 32, 32, 3] uint8: a colour gradient per sample, distinct per group and member."""
    y, x = np.mgrid[0:32, 0:32]
    images = np.zeros((g, 32, 32, 3), np.uint8)
    for member in range(g):
        images[member, ..., 0] = (x * 8) % 256
        images[member, ..., 1] = (y * 8 + 60 * member) % 256
        images[member, ..., 2] = (40 * group_id) % 256
    return images


def _make_run(
    root: Path, name: str, steps: int, age_s: float = 0.0, checkpoint: str | None = None, galleries=(), partial=False, state=None
) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text("run: {name: x}\n")
    if steps:
        text = "".join(_metrics_line(s) for s in range(1, steps + 1))
        if partial:
            text += _metrics_line(steps + 1)[:40]  # the writer is mid-line
        (run / "metrics.jsonl").write_text(text)
    for step in galleries:
        entries = []
        for group_id in (2 * step, 2 * step + 1):
            jpeg = np.array([-3.5, -3.0, -2.5, np.nan], np.float32)
            entries.append(GalleryEntry(group_id, f"prompt {group_id}", step - 1, _pictures(group_id), {"jpeg": jpeg}, jpeg.copy()))
        write_step_gallery(run, step, entries)
    if checkpoint:
        (run / checkpoint).mkdir()
    if state:
        (run / "run_state.json").write_text(json.dumps(state))
    stamp = time.time() - age_s
    for path in [run / "config.yaml", run / "metrics.jsonl", run / "run_state.json"]:
        if path.exists():
            os.utime(path, (stamp, stamp))
    return run


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    finished = {"status": "finished", "step": 3, "checkpoint": "checkpoint-final"}
    alpha = {"checkpoint": "checkpoint-final", "galleries": (1, 3), "partial": True, "state": finished}
    _make_run(root, "alpha-20261123-100000", 3, age_s=3 * HOUR, **alpha)
    _make_run(root, "beta-20261123-110000", 2, age_s=5.0)
    gamma = _make_run(root, "gamma-20261123-090000", 1, age_s=2 * HOUR, checkpoint="checkpoint-aborted")
    (gamma / "samples.png").write_bytes(_png_bytes())  # the report grid of runs from before galleries
    video = np.stack([_pictures(f, g=2) for f in range(3)], axis=1)  # [G=2, F=3, 32, 32, 3], every frame different
    write_step_gallery(gamma, 1, [GalleryEntry(1, "a video", 0, video, {"motion": np.array([0.1, 0.2], np.float32)}, np.array([0.1, 0.2]))])
    _make_run(root, "delta-20261123-080000", 2, age_s=4 * HOUR)  # died without a checkpoint
    # Killed after its final weights but before the report: not finished, the same command resumes it.
    _make_run(root, "epsilon-20261123-070000", 2, age_s=5 * HOUR, checkpoint="checkpoint-final", state={"status": "running", "step": 0})
    stopped = {"status": "aborted", "step": 1, "checkpoint": "checkpoint-aborted-2", "reason": "every rollout worker is dead"}
    _make_run(root, "zeta-20261123-060000", 1, age_s=6 * HOUR, checkpoint="checkpoint-aborted", state=stopped)
    _make_run(root, "fresh-20261123-120000", 0)  # config written, no step yet
    (root / "notes").mkdir()  # not a run
    (root / "outside.png").write_bytes(_png_bytes())  # in the root but outside every run
    (root.parent / "secret.png").write_bytes(_png_bytes())
    (root / "alpha-20261123-100000" / "link.png").symlink_to(root / "outside.png")  # a link out of the run folder
    return root


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(runs_root):
    """uvicorn serving the dashboard in a thread, on a socket bound before it starts (no port race)."""
    sock = _free_socket()
    uv = uvicorn.Server(uvicorn.Config(create_app(runs_root, stale_after_s=HOUR), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "dashboard server did not start"
        time.sleep(0.05)
    port = sock.getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _raw_get(base: str, path: str) -> int:
    """GET a path exactly as written (no client-side normalisation of '..' or percent escapes)."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_run_list_has_status_steps_and_last_reward(server):
    runs = httpx.get(f"{server}/api/runs").json()["runs"]
    by_name = {r["name"]: r for r in runs}
    assert set(by_name) == {
        "alpha-20261123-100000",
        "beta-20261123-110000",
        "gamma-20261123-090000",
        "delta-20261123-080000",
        "epsilon-20261123-070000",
        "zeta-20261123-060000",
        "fresh-20261123-120000",
    }
    assert [r["name"] for r in runs][:2] == ["fresh-20261123-120000", "beta-20261123-110000"]  # newest first
    status = {n.split("-")[0]: (r["status"], r["steps"]) for n, r in by_name.items()}
    assert status == {
        "alpha": ("finished", 3),
        "beta": ("running", 2),
        "gamma": ("aborted", 1),
        "delta": ("aborted", 2),
        "epsilon": ("aborted", 2),
        "zeta": ("aborted", 1),
        "fresh": ("running", 0),
    }
    assert "nothing written for 240 min" in by_name["delta-20261123-080000"]["status_reason"]
    assert "not finished and nothing written for 300 min" in by_name["epsilon-20261123-070000"]["status_reason"]
    assert by_name["zeta-20261123-060000"]["status_reason"] == (
        "stopped after step 1: every rollout worker is dead; weights in checkpoint-aborted-2"
    )
    assert by_name["alpha-20261123-100000"]["status_reason"] == "finished after step 3"
    assert by_name["gamma-20261123-090000"]["status_reason"] == "checkpoint-aborted saved"  # a run from before run_state.json
    assert by_name["alpha-20261123-100000"]["last_reward"] == pytest.approx(-3.5 + 0.5 * 0.36)
    assert by_name["fresh-20261123-120000"]["last_reward"] is None


def test_metrics_json_skips_a_half_written_last_line(server, runs_root):
    metrics = httpx.get(f"{server}/api/runs/alpha-20261123-100000/metrics").json()
    assert metrics["steps"] == [1, 2, 3]  # the 4th line is still being written
    assert metrics["series"]["reward/jpeg/mean"] == pytest.approx([-3.7, -3.6, -3.5])
    assert metrics["series"]["learner/grad_norm"] == [0.5, None, 0.5]
    assert {"time/generate", "time/learner", "time/step", "learner/loss", "policy_version"} <= set(metrics["series"])

    # The writer finishes the line: the next read sees step 4 (the parsed file is cached by size and mtime).
    beta = runs_root / "beta-20261123-110000" / "metrics.jsonl"
    before = httpx.get(f"{server}/api/runs/beta-20261123-110000/metrics").json()["steps"]
    line = _metrics_line(3)
    with beta.open("a") as f:
        f.write(line[:25])
        f.flush()
        assert httpx.get(f"{server}/api/runs/beta-20261123-110000/metrics").json()["steps"] == before == [1, 2]
        f.write(line[25:])
    assert httpx.get(f"{server}/api/runs/beta-20261123-110000/metrics").json()["steps"] == [1, 2, 3]


def test_a_run_without_metrics_or_galleries_answers_empty(server):
    assert httpx.get(f"{server}/api/runs/fresh-20261123-120000/metrics").json() == {
        "run": "fresh-20261123-120000",
        "steps": [],
        "series": {},
    }
    assert httpx.get(f"{server}/api/runs/fresh-20261123-120000/samples").json()["steps"] == []
    assert httpx.get(f"{server}/api/runs/fresh-20261123-120000/samples/1").status_code == 404


def test_gallery_json_and_its_images(server):
    assert httpx.get(f"{server}/api/runs/alpha-20261123-100000/samples").json()["steps"] == [1, 3]
    assert httpx.get(f"{server}/api/runs/alpha-20261123-100000").json()["sample_steps"] == [1, 3]
    gallery = httpx.get(f"{server}/api/runs/alpha-20261123-100000/samples/3").json()
    assert gallery["step"] == 3 and [g["group_id"] for g in gallery["groups"]] == [6, 7]
    group = gallery["groups"][0]
    assert group["prompt"] == "prompt 6" and group["policy_version"] == 2 and group["media_type"] == "image/png"
    assert [s["scores"]["jpeg"] for s in group["samples"]] == [-3.5, -3.0, -2.5, None]
    assert [s["total"] for s in group["samples"]] == [-3.5, -3.0, -2.5, None]

    response = httpx.get(server + group["samples"][1]["url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")), _pictures(6)[1])


def test_video_samples_are_served_as_gifs(server):
    group = httpx.get(f"{server}/api/runs/gamma-20261123-090000/samples/1").json()["groups"][0]
    assert (group["media_type"], group["frames"]) == ("image/gif", 3)
    response = httpx.get(server + group["samples"][0]["url"])
    assert response.headers["content-type"] == "image/gif" and response.content.startswith(b"GIF89a")
    assert Image.open(io.BytesIO(response.content)).n_frames == 3


def test_run_details_list_the_images_of_its_folder(server):
    assert httpx.get(f"{server}/api/runs/gamma-20261123-090000").json()["images"] == ["samples.png"]
    assert httpx.get(f"{server}/api/runs/alpha-20261123-100000").json()["images"] == []  # link.png points outside: not listed
    assert httpx.get(f"{server}/runs/gamma-20261123-090000/files/samples.png").content == _png_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/runs/alpha-20261123-100000/files/../../secret.png",
        "/runs/alpha-20261123-100000/files/..%2F..%2Fsecret.png",
        "/runs/alpha-20261123-100000/files/%2e%2e/outside.png",
        "/runs/alpha-20261123-100000/files/samples/%2e%2e/%2e%2e/%2e%2e/secret.png",
        "/runs/alpha-20261123-100000/files//etc/passwd",
        "/runs/alpha-20261123-100000/files/%2Fetc%2Fpasswd",
        "/runs/alpha-20261123-100000/files/link.png",  # a symlink pointing out of the run
        "/runs/alpha-20261123-100000/files/config.yaml",  # inside, but not media
        "/runs/..%2F..%2Ftmp/files/secret.png",
        "/runs/%2e%2e/files/secret.png",
        "/api/runs/..%2Fsecret/metrics",
        "/api/runs/notes/metrics",  # a folder that is not a run
        "/api/runs/no-such-run",
    ],
)
def test_paths_outside_a_run_are_refused(server, path):
    assert _raw_get(server, path) in (400, 404)


def test_pages_and_assets_are_served(server):
    index = httpx.get(f"{server}/")
    assert index.status_code == 200 and "text/html" in index.headers["content-type"] and "/static/dashboard.js" in index.text
    page = httpx.get(f"{server}/runs/alpha-20261123-100000")
    assert page.status_code == 200 and 'data-chart="rewards"' in page.text
    script = httpx.get(f"{server}/static/dashboard.js")
    assert (
        script.status_code == 200 and "lineChart" in script.text and "http://" not in script.text.replace(SVG_NS, "")
    )  # nothing from a CDN
    assert httpx.get(f"{server}/runs/no-such-run").status_code == 404
    assert httpx.get(f"{server}/static/..%2Fapp.py").status_code == 404


SVG_NS = "http://www.w3.org/2000/svg"


def test_command_line_serves_and_refuses_a_missing_root(runs_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = subprocess.run(
        [sys.executable, "-m", "services.dashboard", "--root", str(tmp_path / "nope")],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "is not a folder" in missing.stderr

    with _free_socket() as sock:
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "services.dashboard", "--root", str(runs_root), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                runs = httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2).json()["runs"]
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "python -m services.dashboard did not answer within 60 s"
                time.sleep(0.2)
        assert len(runs) == 7
    finally:
        process.terminate()
        process.wait(timeout=10)


# ----- headless Chromium -----

CHROMIUM_FLAGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium keeps reaching for Google's hosts, which this offline machine refuses.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    for candidate in (os.environ.get("RAYGRPO_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no Chromium found (install Debian's chromium, as scripts/install.sh tries, or set RAYGRPO_CHROMIUM)")


@pytest.mark.slow
def test_run_page_in_headless_chromium_shows_curves_and_images(server, tmp_path):
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')")
    shot = tmp_path / "run_page.png"
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        except sync_api.Error as exc:  # a browser that cannot start here is an environment problem, not the dashboard's
            pytest.skip(f"{executable} does not start under playwright: {str(exc).splitlines()[0]}")
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server}/runs/alpha-20261123-100000")
            page.wait_for_selector("[data-reward=jpeg] path.series")
            page.wait_for_selector("[data-advantage=jpeg] path.series", state="attached")  # a flat line has no height
            page.wait_for_function(
                "() => { const i = [...document.querySelectorAll('img.sample')]; return i.length > 0 && i.every(x => x.complete && x.naturalWidth > 0); }"
            )
            images = page.eval_on_selector_all("img.sample", "xs => xs.map(x => [x.naturalWidth, x.getAttribute('src')])")
            charts = page.eval_on_selector_all("[data-chart=rewards] > div", "xs => xs.map(x => x.dataset.reward)")
            advantage_lines = page.eval_on_selector_all("[data-advantage=jpeg] path.series", "xs => xs.length")
            failures = page.eval_on_selector_all("[data-chart=failures] > div", "xs => xs.map(x => [x.dataset.failures, x.querySelectorAll('path.series').length])")
            curve = page.get_attribute("[data-reward=jpeg] path.series", "d")
            jpeg_box = page.locator("[data-reward=jpeg] svg").bounding_box()
            total_box = page.locator("[data-reward=total] svg").bounding_box()
            image_box = page.locator("img.sample").first.bounding_box()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert charts == ["total", "color", "jpeg"]  # one chart per reward, the weighted total first
    assert advantage_lines == 4  # mean, std, min, max of the jpeg advantages
    # beside them, per reward: samples without a score, retries and failed requests; then groups dropped and trained
    assert failures == [["color", 3], ["jpeg", 1], ["groups", 2]]
    assert curve.count("L") == 2  # three steps drawn as one line
    # The newest gallery (step 3) is shown: 2 groups x 4 samples, each a decoded 32x32 PNG served by the run.
    assert len(images) == 8 and all(width == 32 for width, _ in images)
    assert all("/files/samples/step-000003/" in src for _, src in images)

    screenshot = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    orange = (abs(_crop(screenshot, jpeg_box) - [0xFF, 0x7F, 0x0E]).sum(axis=-1) < 60).sum()  # the jpeg curve's colour
    dark = (_crop(screenshot, total_box).sum(axis=-1) < 100).sum()  # the black total curve
    assert orange > 100 and dark > 100, f"reward charts look blank: {orange} orange pixels in jpeg's, {dark} dark in the total's"
    tile = _crop(screenshot, image_box)
    assert tile.std() > 20, "the first gallery image renders as a flat colour"
    print(f"screenshot: {shot}")


def _crop(pixels: np.ndarray, box: dict) -> np.ndarray:
    x, y, w, h = (round(box[k]) for k in ("x", "y", "width", "height"))
    return pixels[y : y + h, x : x + w]
