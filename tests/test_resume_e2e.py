"""Exact resume on Ray, after a kill and after `ray job stop`, and Ray equal to in process: N steps in one go with
every role in the driver's process (``run.in_process=true``) equal a run on Ray killed after step 3, resumed as a
Ray job (`ray job submit`), stopped there by `ray job stop` after step 3 again, and submitted again with the same
command to the end (auto-resume each time): metrics and weights bit for bit.

The killed run stops at a fixed point: the controller holds after writing step 3's metrics (a test-only
hook), one step past the step-2 checkpoint, and is then SIGKILLed; its steps 1-3 (uninterrupted on Ray, step 3
after a checkpoint save) must equal the in-process run's. Step 3 is discarded and computed again. The first job
holds after step 3 too and is stopped (SIGTERM): it saves a checkpoint of step 3 itself and says so in one line;
the second job continues from that checkpoint. Every per-step metric except wall-clock timings must come out
identical, and so must the trained weights, bit for bit. Before the jobs, a resume from a checkpoint the learner
cannot load must fail with one clear line and leave the run folder exactly as it was. The killed run is a process
of its own; the uninterrupted run runs in the test's process (``run_main``) while the killed one starts beside it,
the refused one in the test's process too, as a driver of the session cluster. (An uninterrupted tiny run on Ray
through the CLI to its end: tests/test_family_sd.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from ray.job_submission import JobStatus, JobSubmissionClient
from safetensors.torch import load_file
from tensorboard.backend.event_processing import event_accumulator

from raygrpo.controller import HOLD_AFTER_STEP_ENV

from .conftest import ROOT, ray_cli, run_main
from .test_run_e2e import printed_run_dir

STEPS = 4
ARGS = [
    "cluster/tiny.yaml", f"train.steps={STEPS}", "train.checkpoint_every=2", "algorithm.group_size=4",
    "algorithm.groups_per_step=2", "algorithm.grad_accum_samples=4", "rollout.num_steps=4",
]  # fmt: skip
STOPPED_JOB = "resume-then-stop"  # the first job's submission id
ENDED = {JobStatus.STOPPED, JobStatus.SUCCEEDED, JobStatus.FAILED}


def trained_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint-final" / "transformer" / "diffusion_pytorch_model.safetensors")


def comparable_records(run_dir) -> list[dict]:
    """Each step's metrics without what depends on the wall clock (seconds per phase, idle shares)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not (k.startswith(("time/", "idle/")) or k.endswith("seconds"))} for r in records]


def steps_written(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


def snapshot(folder) -> dict[str, tuple[bytes | None, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def misfit_learner_state(checkpoint) -> None:
    """A learner state that passes the MANIFEST (sizes and hashes updated) but no longer fits the learner."""
    path = checkpoint / "learner" / "learner_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "parameters": state["parameters"] + 1}))
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"]["learner/learner_state.json"] = path.stat().st_size
    manifest["sha256"]["learner/learner_state.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


def job(ray_cluster, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ray job <args>`` against the session cluster, retried (for up to 90 s) while the head's job agent registers."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    deadline = time.monotonic() + 90
    while True:
        proc = subprocess.run([ray_cli(), "job", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        # Right after start-up (or under load) the head's job agent may not be registered yet; Ray says to retry.
        # Each try is a `ray` command of some seconds: short pauses between them, a longer budget in all.
        if "No available agent to submit job" not in proc.stderr:
            return proc
        if time.monotonic() > deadline:
            # What the head's dashboard and job agent logged, for the assertion message that follows.
            tails = ray_cluster.log_tails("dashboard_agent.log", "dashboard_JobHead.log")
            return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr + tails)
        time.sleep(2)


@pytest.mark.slow
def test_a_killed_run_resumes_as_a_ray_job_that_ray_job_stop_leaves_resumable_and_it_ends_identical(ray_cluster, tmp_path):
    root = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, HOLD_AFTER_STEP_ENV: "3"}
    command = [sys.executable, "-m", "raygrpo.run", *ARGS, f"run.output_root={root}"]
    killed = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The uninterrupted run, in this process, while the killed one starts its Ray actors beside it.
        straight = run_main(*ARGS, "run.in_process=true", f"run.output_root={tmp_path / 'straight'}")
        assert straight.returncode == 0, straight.stderr[-3000:]
        run_dir = _kill_after_step_3(killed, root)
    finally:
        killed.kill()
        killed.wait()
    straight_dir = printed_run_dir(straight.stdout)
    assert comparable_records(run_dir) == comparable_records(straight_dir)[:3], "steps 1-3 on Ray differ from in process"
    _refuse_a_checkpoint_the_learner_cannot_load(ray_cluster, run_dir)
    _resume_as_a_job_and_stop_it(ray_cluster, run_dir)

    # The same command submitted again (`ray job submit`, waiting for it) continues from the stop's checkpoint to the end.
    run = ["python", "-m", "raygrpo.run", *ARGS, f"run.output_root={root}"]
    proc = job(ray_cluster, "submit", "--address", ray_cluster.dashboard, "--working-dir", ".", "--", *run)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout and printed_run_dir(proc.stdout) == run_dir, "the same command continues the same run"
    assert f"resumed from {run_dir / 'checkpoints' / 'step-000003'}: step 3" in proc.stdout, proc.stdout[-4000:]
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"
    assert (run_dir / "checkpoint-final" / "transformer").is_dir()
    _compare_with_the_uninterrupted_run(straight_dir, run_dir)


def _kill_after_step_3(proc: subprocess.Popen, root: Path) -> Path:
    """SIGKILL once step 3 is written (the run holds there): no cleanup, as when a node or the job's driver dies."""
    deadline = time.monotonic() + 300
    while not (runs := list(root.glob("tiny-*"))) or 3 not in steps_written(runs[0]):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail("the run ended before step 3" if proc.returncode is not None else "no step 3 within 300 s")
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    (run_dir,) = runs
    assert steps_written(run_dir) == [1, 2, 3] and [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "running"
    return run_dir


def _refuse_a_checkpoint_the_learner_cannot_load(ray_cluster, run_dir: Path) -> None:
    """One line that says what to do, exit 2, nothing on disk changed; then the checkpoint is put back as it was."""
    checkpoint = run_dir / "checkpoints" / "step-000002"
    saved = {name: (checkpoint / name).read_bytes() for name in ("learner/learner_state.json", "MANIFEST.json")}
    misfit_learner_state(checkpoint)
    before = snapshot(run_dir)
    refused = run_main(*ARGS, f"run.output_root={run_dir.parent}", env={"RAY_ADDRESS": ray_cluster.address})  # this process, a driver
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("raygrpo: ")]  # Ray's actor logs interleave
    assert line.startswith(f"raygrpo: cannot load the learner state of checkpoint {checkpoint}: TrainingStateError:"), line
    assert "does not fit this learner (parameters: saved" in line and "run.resume=never" in line
    assert snapshot(run_dir) == before, "a failed resume must leave the run folder as it was"
    for name, data in saved.items():
        (checkpoint / name).write_bytes(data)


def _resume_as_a_job_and_stop_it(ray_cluster, run_dir: Path) -> None:
    """`ray job submit --working-dir . -- python -m raygrpo.run ...` (the killed run's command) resumes from step 2 and
    holds after step 3; `ray job stop` (JobSubmissionClient.stop_job, which the CLI calls) sends SIGTERM: a checkpoint
    of step 3, the run marked aborted, one line."""
    run = ["python", "-m", "raygrpo.run", *ARGS, f"run.output_root={run_dir.parent}"]
    # Ray waits up to RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM before a SIGKILL.
    runtime = json.dumps({"env_vars": {HOLD_AFTER_STEP_ENV: "3", "RAY_JOB_STOP_WAIT_TIME_S": "60"}})
    submitted = job(ray_cluster, "submit", "--address", ray_cluster.dashboard, "--no-wait", "--submission-id", STOPPED_JOB,
                    "--runtime-env-json", runtime, "--working-dir", ".", "--", *run)  # fmt: skip
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-4000:]
    client = JobSubmissionClient(ray_cluster.dashboard)
    deadline = time.monotonic() + 300
    while f"{HOLD_AFTER_STEP_ENV}=3: holding here" not in (logs := client.get_job_logs(STOPPED_JOB)):
        status = client.get_job_status(STOPPED_JOB)
        assert status not in ENDED and time.monotonic() < deadline, f"job {status}, not holding after step 3:\n{logs[-4000:]}"
        time.sleep(0.2)
    assert steps_written(run_dir) == [1, 2, 3] and "resumed from" in logs
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.discarded.jsonl").read_text().splitlines()] == [3]
    client.stop_job(STOPPED_JOB)
    while (status := client.get_job_status(STOPPED_JOB)) not in ENDED:
        assert time.monotonic() < deadline, "the stopped job did not end"
        time.sleep(0.2)
    state = json.loads((run_dir / "run_state.json").read_text())
    assert (state["status"], state["step"], state["checkpoint"]) == ("aborted", 3, "checkpoints/step-000003"), state
    assert state["reason"].startswith("stopped by SIGTERM")
    logs = client.get_job_logs(STOPPED_JOB)
    assert "raygrpo: run stopped by SIGTERM after step 3; the same command resumes from" in logs and "Traceback" not in logs, logs[-4000:]


def _compare_with_the_uninterrupted_run(straight_dir: Path, run_dir: Path) -> None:
    """Every step's metrics (but the clock) and the trained weights, bit for bit; the new metrics in every log format."""
    expected, got = comparable_records(straight_dir), comparable_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)) and all(r["groups/trained"] == 2 for r in got)
    new_keys = {"learner/approx_kl", "advantage/jpeg/mean", "advantage/jpeg/std", "advantage/jpeg/min", "advantage/jpeg/max"}
    assert new_keys | {"learner/grad_norm", "reward/jpeg/mean"} <= set(got[0])
    assert new_keys <= set(pq.read_schema(run_dir / "metrics.parquet").names)
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert new_keys <= set(events.Tags()["scalars"])
    for want, have in zip(expected, got):
        differs = {k: (want.get(k), have.get(k)) for k in want.keys() | have.keys() if want.get(k) != have.get(k)}
        assert not differs, f"step {want['step']}: the resumed run on Ray logged {differs} (uninterrupted in process, resumed)"

    # samples.png shows the first and last steps; the resumed run never saw step 1 and takes it from that step's gallery on disk.
    with Image.open(straight_dir / "samples.png") as want, Image.open(run_dir / "samples.png") as have:
        assert want.size == have.size

    expected_weights, got_weights = trained_weights(straight_dir), trained_weights(run_dir)
    assert expected_weights.keys() == got_weights.keys()
    different = [name for name in expected_weights if not torch.equal(expected_weights[name], got_weights[name])]
    assert not different, f"resumed weights on Ray differ from the uninterrupted run in process in {different[:5]}"
