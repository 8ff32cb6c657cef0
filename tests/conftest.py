"""Shared fixtures: an offline, loopback-only environment and one Ray cluster for the whole session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from raygrpo.local_cluster import LocalCluster, start_local_cluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Set before anything imports Ray or huggingface_hub; subprocesses and the Ray cluster inherit them.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray socket on 127.0.0.1
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The session's own cluster runs without token auth so tests never touch ~/.ray (Ray 2.60 enables it by default).
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)
# Ray exports application metrics every 10 s by default; the telemetry test reads them back sooner.
os.environ["RAY_metrics_report_interval_ms"] = "2000"
# vLLM on CPU (the judge of tests/test_vlm_judge.py) runs its model worker inside its engine core, not in one more
# spawned interpreter that imports torch, transformers and vLLM again; only vLLM reads it.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two threads run them far slower.
    (Only this process: Ray actors and subprocesses set their own.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Tiny models are built once per session into a private cache (never ~/.cache)."""
    cache = tmp_path_factory.mktemp("raygrpo-cache")
    os.environ["RAYGRPO_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def ray_cluster(model_cache, tmp_path_factory) -> LocalCluster:
    """A real `ray start --head` on loopback, started once and shared by every test that needs Ray.

    A process group of its own: teardown stops exactly this cluster's processes (`ray stop` would stop
    every Ray instance on the machine, including other test sessions' and users').

    A temp folder of its own (RAY_TMPDIR, short: Ray's socket paths must stay under 108 bytes): a `ray job submit`
    driver joins the cluster named in `<temp>/ray/ray_current_cluster` (Ray's job supervisor resolves "auto"), which in
    the shared /tmp/ray is whichever head another session started last."""
    import tempfile

    temp = tempfile.mkdtemp(prefix="rg-", dir="/tmp")
    cluster = start_local_cluster(num_cpus=4, env={**os.environ, "RAY_TMPDIR": temp})
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _vlm_judge_started(request, model_cache):
    """The real-vLLM judge of tests/test_vlm_judge.py, started in the background with the session when a collected test
    uses its ``judge`` fixture (else None): its ~35 s start runs beside the tests before that module; closed at the end."""
    if not any("judge" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    from .test_vlm_judge import JudgeLaunch

    launch = JudgeLaunch(model_cache)
    yield launch
    launch.close()


def _two_rank_modules(session) -> list:
    """The collected test modules with a test that uses ``two_ranks``, by name."""
    modules = {item.module for item in session.items if "two_ranks" in getattr(item, "fixturenames", ())}
    return sorted(modules, key=lambda m: m.__name__)


@pytest.fixture(scope="session", autouse=True)
def _two_ranks_started(request, tmp_path_factory, model_cache):
    """The pair of 2-rank processes, started with the session when a collected test uses ``two_ranks`` (else None):
    their imports run beside the tests before it (tests/two_ranks.py); cancelled at the end if nothing ran. After
    ``model_cache``: the children take this process's environment (RAYGRPO_CACHE) when they start."""
    from .two_ranks import TwoRankPair

    modules = _two_rank_modules(request.session)
    pair = TwoRankPair([m.__name__ for m in modules], tmp_path_factory.mktemp("two-ranks")) if modules else None
    yield pair
    if pair is not None:
        pair.cancel()


@pytest.fixture(scope="session")
def two_ranks(request, _two_ranks_started):
    """Every 2-rank learner job of the collected tests' modules (their ``rank_jobs()``), run in ONE pair of gloo
    processes (tests/two_ranks.py): a :class:`tests.two_ranks.TwoRankResults`, rank 0's result per job name."""
    jobs = {}
    for module in _two_rank_modules(request.session):
        jobs |= module.rank_jobs()
    return _two_ranks_started.run(jobs)


def load_script(path: Path, name: str):
    """A script of the repository (reward_servers/*.py, scripts/*.py, benchmarks/*.py: folders of scripts, not
    packages) loaded as a module named ``name``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic and dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def serve_in_thread(app, ready_path: str):
    """Serve an ASGI ``app`` on a free loopback port in a daemon thread until the generator is closed: yields its base
    URL once ``GET ready_path`` answers 200 (a module fixture's body: ``yield from serve_in_thread(app, "/v1/models")``)."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_healthy(f"{url}{ready_path}")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_healthy(url: str, timeout_s: float = 10, process=None) -> None:
    """Until ``url`` answers 200 (a server coming up); RuntimeError after ``timeout_s`` or when ``process`` exits."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=1) as client:  # one client: each httpx.get builds a TLS context (~60 ms of CPU)
        while time.monotonic() < deadline and (process is None or process.poll() is None):
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    raise RuntimeError(f"server at {url} did not come up")



def train_in_process(preset: str | Path, output_root: Path, *overrides: str) -> tuple[Path, list[dict]]:
    """Run ``preset`` with ``run.in_process=true`` and ``overrides`` under ``output_root`` (exit code 0 asserted):
    the run folder and its metrics.jsonl rows."""
    from raygrpo.run import main

    assert main([str(preset), "run.in_process=true", *overrides, f"run.output_root={output_root}"]) == 0
    (run_dir,) = [p for p in Path(output_root).iterdir() if p.is_dir()]
    return run_dir, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m raygrpo.run ARGS`` in this process: its exit code, stdout and stderr (the driver's log lines
    included, in its own format), as ``subprocess.run`` would give them, without a new interpreter importing
    torch, diffusers and transformers again (5-10 s a call on 2 cores).

    For runs that fail in preflight, run in process (``run.in_process=true``) or drive the session cluster
    (``env={"RAY_ADDRESS": ...}``); a signal can come from another thread of this process. Whatever needs a real
    process (kills, exit-time behaviour, ``ray job submit``) stays a subprocess. ``env``: variables set for the
    call only. The working folder, signal handlers, torch's thread count and the root logger are restored afterwards."""
    import contextlib
    import io
    import logging
    import signal

    import torch

    from raygrpo.run import main

    if (ray := sys.modules.get("ray")) is not None and ray.is_initialized():
        # main() shuts down a Ray it finds initialised: it would end this process's connection under the test.
        raise RuntimeError("run_main needs a process without ray.init(); call it outside a module holding a Ray driver")
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))  # raygrpo.run's format
    root = logging.getLogger()
    level, threads = root.level, torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))  # relative paths (cluster/*.yaml) from the checkout, as the subprocesses ran
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        torch.set_num_threads(threads)
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["raygrpo.run", *args], code, out.getvalue(), err.getvalue())


def ray_cli() -> str:
    path = BIN / "ray"
    return str(path) if path.exists() else shutil.which("ray")


_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Leave without the interpreter's teardown once the results are printed and every fixture is finalised.

    Native libraries this process loads (Ray's core worker, onnxruntime for the OCR server, torch's gloo,
    Chromium's driver) were seen, once in five full runs, to crash in their own exit-time destructors after
    every test had passed (SIGSEGV, exit code -11), which would turn a green suite red at random. The
    outcome is decided by then; the raygrpo processes the tests start exit normally and are checked.
    """
    if _exit_status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


@pytest.fixture(scope="module")
def without_process_group():
    """No default process group in this process: an earlier test's bf16 or GPU learner left its one-rank group
    (raygrpo.learner.fsdp.join_single_rank_group), and the planner's dry runs measure in this process only
    without one (with one they run in a child process: tests/test_plan.py checks that path once)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
