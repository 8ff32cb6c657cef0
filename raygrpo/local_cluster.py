"""A `ray start --head` cluster on loopback that stops only itself: for tests, benchmarks and figures.

``ray stop`` stops every Ray instance on the machine, other users' included. The head started here
runs in a process group of its own, and :meth:`LocalCluster.stop` kills exactly that group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from raygrpo.net import free_port


@dataclass
class LocalCluster:
    address: str  # GCS address for ray.init / RAY_ADDRESS
    dashboard: str  # http address for `ray job submit` ("" without a dashboard)
    metrics: str  # the head's Prometheus endpoint (ray.util.metrics land there)
    process_group: int | None
    log_dir: Path | None = None  # the head's session logs (dashboard, job agent), when started with a RAY_TMPDIR of its own

    def stop(self) -> None:
        if self.process_group is None:
            return
        try:
            os.killpg(self.process_group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process_group = None

    def log_tails(self, *names: str, lines: int = 12) -> str:
        """The last ``lines`` lines of each of the head's session logs ``names`` (e.g. ``dashboard_agent.log``), each
        under its name, for an error message; "" where the logs are unknown or missing."""
        tails = ""
        for name in names:
            path = self.log_dir / name if self.log_dir else None
            if path and path.exists():
                tails += f"\n--- {name}:\n" + "\n".join(line[:300] for line in path.read_text().splitlines()[-lines:])
        return tails


def start_local_cluster(num_cpus: int, env: dict[str, str] | None = None, dashboard: bool = True) -> LocalCluster:
    """Start a head on 127.0.0.1 (``env`` as the processes' environment); wait until its dashboard answers."""
    env = {**(env or os.environ), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # every Ray socket on loopback
    binaries = Path(sys.executable).parent
    env["PATH"] = f"{binaries}{os.pathsep}{env.get('PATH', '')}"
    port, dashboard_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        str(binaries / "ray"), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--node-ip-address=127.0.0.1", f"--metrics-export-port={metrics_port}", "--disable-usage-stats",
    ]  # fmt: skip
    # The job agent's HTTP port is 0: the agent binds a port the kernel picks at that moment and registers it. Ray's
    # default (52365) is taken whenever another Ray instance runs on the machine, and a port picked here beforehand
    # can be taken by another socket in the seconds before the agent binds it. An agent that cannot bind stays up
    # without HTTP, and the head then answers every `ray job submit` with "No available agent to submit job".
    command += (
        ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--dashboard-agent-listen-port=0"]
        if dashboard
        else ["--include-dashboard=false"]
    )
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    cluster = LocalCluster(
        address=f"127.0.0.1:{port}",
        dashboard=f"http://127.0.0.1:{dashboard_port}" if dashboard else "",
        metrics=f"http://127.0.0.1:{metrics_port}/metrics",
        process_group=_process_group_of(port),
        log_dir=Path(env["RAY_TMPDIR"]) / "ray" / "session_latest" / "logs" if "RAY_TMPDIR" in env else None,
    )
    if proc.returncode != 0:
        cluster.stop()
        raise RuntimeError(f"`ray start --head` failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    if dashboard:
        try:
            _wait_for_dashboard(cluster.dashboard)
        except RuntimeError:
            cluster.stop()
            raise
    return cluster


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
