"""Shared fixtures: an offline, loopback-only environment and one Ray cluster for the whole session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

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


@dataclass(frozen=True)
class RayCluster:
    address: str  # GCS address for ray.init / RAY_ADDRESS
    dashboard: str  # http address for `ray job submit`
    metrics: str  # the head node's Prometheus endpoint (ray.util.metrics land there)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(model_cache, tmp_path_factory) -> RayCluster:
    """A real `ray start --head` on loopback, started once and shared by every test that needs Ray."""
    port, dashboard_port, metrics_port = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    command = [
        str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4", "--num-gpus=0",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--metrics-export-port={metrics_port}", "--disable-usage-stats",
    ]  # fmt: skip
    # A process group of its own: teardown stops exactly this cluster's processes (`ray stop` would stop
    # every Ray instance on the machine, including other test sessions' and users').
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    group = _process_group_of(port)
    if proc.returncode != 0:
        _kill_group(group)
        raise RuntimeError(f"`ray start --head` failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    cluster = RayCluster(
        address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}", metrics=f"http://127.0.0.1:{metrics_port}/metrics"
    )
    try:
        _wait_for_dashboard(cluster.dashboard)
        yield cluster
    finally:
        _kill_group(group)


def _process_group_of(port: int) -> int | None:
    """The process group of the GCS server listening on ``port`` (every process `ray start` launched shares it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"gcs_server") and f"--gcs_server_port={port}".encode() in args:
            return os.getpgid(int(entry.name))
    return None


def _kill_group(group: int | None) -> None:
    if group is None:
        return
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for_dashboard(url: str, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"Ray dashboard at {url} did not come up in {timeout_s} s")


def ray_cli() -> str:
    path = BIN / "ray"
    return str(path) if path.exists() else shutil.which("ray")
