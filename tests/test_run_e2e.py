"""The entry point on Ray: the same command under `ray job submit`, a plan that does not fit the cluster, and
fast failures of the real-model presets on a machine without their weights or GPUs. (The tiny runs that learn,
and the reward failures, run in process: tests/test_run_in_process.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raygrpo.controller import HOLD_AFTER_STEP_ENV

from .conftest import ROOT, ray_cli, run_main


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


def job(ray_cluster, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ray job <args>`` against the session cluster, retried (for up to 90 s) while the head's job agent registers."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run([ray_cli(), "job", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        # Right after start-up (or under load) the head's job agent may not be registered yet; Ray says to retry.
        # Each try is a `ray` command of some seconds: short pauses between them, a longer budget in all.
        if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
            return proc
        time.sleep(2)


@pytest.mark.slow
def test_the_same_command_runs_under_ray_job_submit_and_ray_job_stop_leaves_it_resumable(ray_cluster, tmp_path):
    """`ray job submit --working-dir . -- python -m raygrpo.run cluster/tiny.yaml` against a `ray start --head` cluster;
    `ray job stop` after step 2 (SIGTERM) saves a checkpoint of step 2, and submitting the same command again finishes it."""
    out = tmp_path / "job-outputs"
    run = ["python", "-m", "raygrpo.run", "cluster/tiny.yaml", "train.steps=3", "rollout.num_workers=2", f"run.output_root={out}"]
    # The job waits after step 2 until stopped; Ray waits up to RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM before a SIGKILL.
    runtime = json.dumps({"env_vars": {HOLD_AFTER_STEP_ENV: "2", "RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    submitted = job(ray_cluster, "submit", "--address", ray_cluster.dashboard, "--no-wait", "--submission-id", "stop-me",
                    "--runtime-env-json", runtime, "--working-dir", ".", "--", *run)  # fmt: skip
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    deadline = time.monotonic() + 300
    while not (runs := list(out.glob("tiny-*"))) or not (runs[0] / "metrics.jsonl").is_file() or len((runs[0] / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.monotonic() < deadline, job(ray_cluster, "logs", "--address", ray_cluster.dashboard, "stop-me").stdout[-4000:]
        time.sleep(0.5)
    stopped = job(ray_cluster, "stop", "--address", ray_cluster.dashboard, "stop-me")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    run_dir = runs[0]
    state = json.loads((run_dir / "run_state.json").read_text())
    assert (state["status"], state["step"], state["checkpoint"]) == ("aborted", 2, "checkpoints/step-000002"), state
    assert state["reason"].startswith("stopped by SIGTERM")
    logs = job(ray_cluster, "logs", "--address", ray_cluster.dashboard, "stop-me").stdout
    assert "raygrpo: run stopped by SIGTERM after step 2; the same command resumes from" in logs and "Traceback" not in logs

    proc = job(ray_cluster, "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--", *run)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout and printed_run_dir(proc.stdout) == run_dir, "the same command continues the same run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["groups/trained"] == 2 for r in records)
    assert (run_dir / "checkpoint-final" / "transformer").is_dir() and (run_dir / "samples.png").is_file()
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_sigterm_while_the_ray_workers_start_stops_with_one_line(ray_cluster, tmp_path):
    """Loading the models can take minutes, the likeliest time for Ctrl-C: one line, 143, nothing to resume yet."""
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    command = [sys.executable, "-m", "raygrpo.run", "cluster/tiny.yaml", "train.steps=2", f"run.output_root={tmp_path}"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the driver logs as it goes: joined, then the actors load their models
        seen.append(line)
        if "joining Ray cluster" in line:
            break
    time.sleep(1.0)  # inside Controller._start: placement groups and model loading
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    stderr = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("raygrpo: ")]
    assert line.startswith("raygrpo: ") and "stopped by SIGTERM" in line, line
    for run_dir in tmp_path.glob("tiny-*"):  # stopped inside the controller: marked aborted, nothing to resume from
        assert json.loads((run_dir / "run_state.json").read_text())["status"] == "aborted"


@pytest.mark.parametrize(
    "preset, hub_id, gpus, reward_problem",
    [
        ("flux.yaml", "black-forest-labs/FLUX.1-dev", "25", "rewards.0 (hps): reward 'hps_v2.1': parameter 'checkpoint'"),
        ("flux_dgpo.yaml", "black-forest-labs/FLUX.1-dev", "16", "rewards.0 (pickscore): reward 'pickscore': parameter 'model'"),
        ("sd3_dgpo.yaml", "stabilityai/stable-diffusion-3.5-medium", "7", "rewards.0: reward 'ocr': http reward GET http://127.0.0.1:8010/v1/health failed"),
    ],
)
def test_real_model_presets_fail_fast_without_weights_or_gpus(tmp_path, monkeypatch, preset, hub_id, gpus, reward_problem):
    """No weights and no GPU here: a clear list of what is missing within seconds, and no hang. Both modes in this
    process (run_main): huggingface_hub reads HF_HUB_OFFLINE once at import, so for an unreachable hub its constant is
    switched off as a process started with HF_HUB_OFFLINE=0 would have it (raygrpo reads the constant and the variable)."""
    import huggingface_hub.constants

    modes = ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0"}) if preset == "flux.yaml" else ({"HF_HUB_OFFLINE": "1"},)
    for extra in modes:  # offline mode, and an unreachable hub
        start = time.monotonic()
        with monkeypatch.context() as patch:
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", extra["HF_HUB_OFFLINE"] == "1")
            proc = run_main(f"cluster/{preset}", f"run.output_root={tmp_path}", env=extra)
        elapsed = time.monotonic() - start
        assert proc.returncode == 2, proc.stderr
        message = proc.stderr
        assert "model.pretrained" in message and hub_id in message and "download" in message, message
        assert f"the plan needs {gpus} GPUs, this machine has 0" in message, message
        if extra["HF_HUB_OFFLINE"] == "1":  # online, reward weights count as downloadable until an actor loads them
            assert reward_problem in message, message
        else:  # the hub was asked, not skipped as offline
            assert "the hub could not be reached" in message, message
        assert elapsed < 60, f"took {elapsed:.0f} s"
        assert not any(tmp_path.iterdir()), "nothing may be written when the run cannot start"


def test_a_plan_that_does_not_fit_the_cluster_names_need_and_have(ray_cluster, tmp_path):
    """Joined to the session cluster (RAY_ADDRESS) from this process, which the entry point leaves as it found it."""
    proc = run_main("cluster/tiny.yaml", "rollout.num_gpus=1", "rollout.num_workers=3", f"run.output_root={tmp_path}",
                    env={"RAY_ADDRESS": ray_cluster.address})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs more GPU than the cluster has" in proc.stderr
    assert re.search(r"rollout\s+3\s+0.5\s+1", proc.stderr) and re.search(r"need\s+2.75\s+3", proc.stderr), proc.stderr
    assert re.search(r"have\s+4\s+0", proc.stderr), proc.stderr
