"""The entry point end to end: a tiny run that learns, the same command under `ray job submit`, and fast failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT, ray_cli


def run_raygrpo(*args: str, ray_address: str | None, timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, "-m", "raygrpo.run", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def printed_run_dir(stdout: str) -> Path:
    match = re.search(r"^outputs: (.+)$", stdout, re.MULTILINE)
    assert match, f"the run must print its output folder; stdout was:\n{stdout[-2000:]}"
    return Path(match.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny.yaml", "tiny_dgpo.yaml"])
def test_tiny_run_learns_and_writes_its_outputs(ray_cluster, tmp_path, preset):
    """The tiny presets as shipped (30 steps): rollout, reward and learner actors; the reward clearly improves."""
    proc = run_raygrpo(f"cluster/{preset}", f"run.output_root={tmp_path}", ray_address=ray_cluster.address)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = printed_run_dir(proc.stdout)
    assert run_dir.parent == tmp_path
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert [r["policy_version"] for r in records] == list(range(1, 31))  # one versioned sync per step
    if preset == "tiny.yaml":
        assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records), "on-policy ratio must be exactly 1"
        assert records[0]["rollout/bytes_per_sample"] > 8 * 4 * 16 * 16  # trajectory of T+1 = 9 packed latents
    else:
        assert all(0 <= r["learner/gate_mean"] <= 1 for r in records)
        assert records[0]["rollout/bytes_per_sample"] < 2 * 4 * 16 * 16 + 1000  # one latent + its share of the conditioning
    rewards = np.array([r["reward/jpeg/mean"] for r in records])
    first, last = rewards[:5].mean(), rewards[-5:].mean()
    spread = np.mean([r["reward/jpeg/std"] for r in records[:5]])
    assert last - first > 5 * spread, f"reward did not clearly improve: {first:.3f} -> {last:.3f} (within-step std {spread:.3f})"
    for png in ("reward_curve.png", "samples.png"):
        with Image.open(run_dir / png) as image:
            assert image.size[0] > 200 and np.asarray(image.convert("L")).std() > 1
    from diffusers import FluxTransformer2DModel

    trained = FluxTransformer2DModel.from_pretrained(run_dir / "checkpoint-final" / "transformer")
    assert sum(p.numel() for p in trained.parameters()) > 0
    assert json.loads((run_dir / "checkpoint-final" / "raygrpo_state.json").read_text())["policy_version"] == 30


@pytest.mark.slow
def test_the_same_command_runs_under_ray_job_submit(ray_cluster, tmp_path):
    """`ray job submit --working-dir . -- python -m raygrpo.run cluster/tiny.yaml` against a `ray start --head` cluster."""
    out = tmp_path / "job-outputs"
    command = [
        ray_cli(), "job", "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--",
        "python", "-m", "raygrpo.run", "cluster/tiny.yaml", "train.steps=2", "rollout.num_workers=2", f"run.output_root={out}",
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(3):
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        # Right after start-up (or under load) the head's job agent may not be registered yet; Ray says to retry.
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(10)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout
    run_dir = printed_run_dir(proc.stdout)
    assert run_dir.parent == out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["groups/trained"] == 2 for r in records)
    assert (run_dir / "checkpoint-final" / "transformer").is_dir() and (run_dir / "samples.png").is_file()


@pytest.mark.parametrize(
    "preset, hub_id, gpus, reward_problem",
    [
        ("flux.yaml", "black-forest-labs/FLUX.1-dev", "25", "rewards.0 (hps): reward 'hps_v2.1': parameter 'checkpoint'"),
        ("flux_dgpo.yaml", "black-forest-labs/FLUX.1-dev", "16", "rewards.0 (pickscore): reward 'pickscore': parameter 'model'"),
        ("sd3_dgpo.yaml", "stabilityai/stable-diffusion-3.5-medium", "7.5", "unknown reward kind 'ocr'"),
    ],
)
def test_real_model_presets_fail_fast_without_weights_or_gpus(tmp_path, preset, hub_id, gpus, reward_problem):
    """No weights and no GPU here: a clear list of what is missing within seconds, and no hang."""
    modes = ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0"}) if preset == "flux.yaml" else ({"HF_HUB_OFFLINE": "1"},)
    for extra in modes:  # offline mode, and an unreachable hub
        start = time.monotonic()
        proc = run_raygrpo(f"cluster/{preset}", f"run.output_root={tmp_path}", ray_address=None, timeout=120, extra_env=extra)
        elapsed = time.monotonic() - start
        assert proc.returncode == 2, proc.stderr
        message = proc.stderr
        assert "model.pretrained" in message and hub_id in message and "download" in message, message
        assert f"the plan needs {gpus} GPUs, this machine has 0" in message, message
        if extra["HF_HUB_OFFLINE"] == "1":  # online, reward weights count as downloadable until an actor loads them
            assert reward_problem in message, message
        assert elapsed < 60, f"took {elapsed:.0f} s"
        assert not any(tmp_path.iterdir()), "nothing may be written when the run cannot start"


def test_a_plan_that_does_not_fit_the_cluster_names_need_and_have(ray_cluster, tmp_path):
    proc = run_raygrpo("cluster/tiny.yaml", "rollout.num_gpus=1", "rollout.num_workers=3", f"run.output_root={tmp_path}",
                       ray_address=ray_cluster.address, timeout=180)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs more GPU than the cluster has" in proc.stderr
    assert re.search(r"rollout\s+3\s+0.5\s+1", proc.stderr) and re.search(r"need\s+2.75\s+3", proc.stderr), proc.stderr
    assert re.search(r"have\s+4\s+0", proc.stderr), proc.stderr


@pytest.mark.slow
def test_two_rewards_one_served_over_http(ray_cluster, tmp_path):
    """cluster/tiny_two_rewards.yaml: a reward actor plus a protocol-v1 server in its own process on loopback."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "reward_servers/serve_builtin.py", "--kind", "color", "--params", '{"target": "red"}', "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        proc = run_raygrpo("cluster/tiny_two_rewards.yaml", "train.steps=3", f"rewards.1.params.url=http://127.0.0.1:{port}",
                           f"run.output_root={tmp_path}", ray_address=ray_cluster.address)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        records = [json.loads(line) for line in (printed_run_dir(proc.stdout) / "metrics.jsonl").read_text().splitlines()]
        assert all(r["rewards/red/missing"] == 0 and r["groups/trained"] == 2 for r in records)
        assert all(0 <= r["reward/red/mean"] <= 1 and r["reward/jpeg/mean"] < 0 for r in records)
    finally:
        server.terminate()
        server.wait(timeout=30)
    # With the server gone every sample of the HTTP reward is missing: the groups are dropped and counted.
    proc = run_raygrpo("cluster/tiny_two_rewards.yaml", "train.steps=2", f"rewards.1.params.url=http://127.0.0.1:{port}",
                       "rewards.1.params.max_attempts=2", "rewards.1.params.check_health=false", f"run.output_root={tmp_path}",
                       ray_address=ray_cluster.address)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (printed_run_dir(proc.stdout) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["groups/dropped"] == 2 and r["groups/trained"] == 0 and r["rewards/red/missing"] == 16 for r in records)
