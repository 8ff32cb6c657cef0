"""Exact resume on Ray: 2N steps in one go equal N steps, a kill, and the same command run again (auto-resume);
and the same run in process (``run.in_process=true``) equals the Ray run, metrics and weights bit for bit.

The killed run stops at a fixed point: the controller holds after writing step 3's metrics (a test-only
hook), one step past the step-2 checkpoint, and is then SIGKILLed; step 3 is discarded and computed
again. Every per-step metric except wall-clock timings must come out identical, and so must the
trained weights, bit for bit. Before that, a resume from a checkpoint the learner cannot load must
fail with one clear line and leave the run folder exactly as it was. The killed run and the uninterrupted one
are processes of their own; the refused, resumed and in-process runs run in the test's process (``run_main``),
the first two as drivers of the session cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing import event_accumulator

from raygrpo.controller import HOLD_AFTER_STEP_ENV

from .conftest import ROOT, run_main
from .test_run_e2e import printed_run_dir

STEPS = 6
ARGS = [
    "cluster/tiny.yaml", f"train.steps={STEPS}", "train.checkpoint_every=2", "algorithm.group_size=4",
    "algorithm.groups_per_step=2", "algorithm.grad_accum_samples=4", "rollout.num_steps=4",
]  # fmt: skip


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


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_identical(ray_cluster, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    # The uninterrupted run goes on beside the one to be killed (the cluster fits both): same result, less waiting.
    command = [sys.executable, "-m", "raygrpo.run", *ARGS, f"run.output_root={tmp_path / 'straight'}"]
    with open(tmp_path / "straight.out", "w") as out, open(tmp_path / "straight.err", "w") as err:
        straight = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)
    try:
        _kill_resume_and_compare(ray_cluster, tmp_path, env, straight)
    finally:
        straight.kill()
        straight.wait()


def _kill_resume_and_compare(ray_cluster, tmp_path, env, straight) -> None:
    root = tmp_path / "killed"
    command = [sys.executable, "-m", "raygrpo.run", *ARGS, f"run.output_root={root}"]
    proc = subprocess.Popen(command, cwd=ROOT, env={**env, HOLD_AFTER_STEP_ENV: "3"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (runs := list(root.glob("tiny-*"))) or 3 not in steps_written(runs[0]):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run ended before step 3" if proc.returncode is not None else "no step 3 within 300 s")
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no cleanup, as when a node or the job's driver dies
    proc.wait()
    (run_dir,) = runs
    assert steps_written(run_dir) == [1, 2, 3] and [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "running"
    checkpoint = run_dir / "checkpoints" / "step-000002"

    # A checkpoint the learner cannot load: one line that says what to do, exit 2, nothing on disk changed.
    saved = {name: (checkpoint / name).read_bytes() for name in ("learner/learner_state.json", "MANIFEST.json")}
    misfit_learner_state(checkpoint)
    before = snapshot(run_dir)
    refused = run_main(*ARGS, f"run.output_root={root}", env={"RAY_ADDRESS": ray_cluster.address})  # this process, a driver
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("raygrpo: ")]  # Ray's actor logs interleave
    assert line.startswith(f"raygrpo: cannot load the learner state of checkpoint {checkpoint}: TrainingStateError:"), line
    assert "does not fit this learner (parameters: saved" in line and "run.resume=never" in line
    assert snapshot(run_dir) == before, "a failed resume must leave the run folder as it was"
    for name, data in saved.items():
        (checkpoint / name).write_bytes(data)

    resumed = run_main(*ARGS, f"run.output_root={root}", env={"RAY_ADDRESS": ray_cluster.address})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert printed_run_dir(resumed.stdout) == run_dir, "the same command continues the same run folder"
    assert "resumed from" in resumed.stderr
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.discarded.jsonl").read_text().splitlines()] == [3]
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"

    assert straight.wait(timeout=600) == 0, (tmp_path / "straight.err").read_text()[-3000:]
    straight_dir = printed_run_dir((tmp_path / "straight.out").read_text())
    expected, got = comparable_records(straight_dir), comparable_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    new_keys = {"learner/approx_kl", "advantage/jpeg/mean", "advantage/jpeg/std", "advantage/jpeg/min", "advantage/jpeg/max"}
    assert new_keys | {"learner/grad_norm", "reward/jpeg/mean"} <= set(got[0])
    assert new_keys <= set(pq.read_schema(run_dir / "metrics.parquet").names)
    events = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert new_keys <= set(events.Tags()["scalars"])
    for want, have in zip(expected, got):
        differs = {k: (want.get(k), have.get(k)) for k in want.keys() | have.keys() if want.get(k) != have.get(k)}
        assert not differs, f"step {want['step']}: the resumed run logged {differs} (uninterrupted, resumed)"

    # samples.png shows steps 1 and 6; the resumed run never saw step 1 and takes it from that step's gallery on disk.
    with Image.open(straight_dir / "samples.png") as want, Image.open(run_dir / "samples.png") as have:
        assert want.size == have.size

    expected_weights, got_weights = trained_weights(straight_dir), trained_weights(run_dir)
    assert expected_weights.keys() == got_weights.keys()
    different = [name for name in expected_weights if not torch.equal(expected_weights[name], got_weights[name])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"

    # The same command with every role in this process instead of Ray actors: the same run, number for number.
    local = run_main(*ARGS, "run.in_process=true", f"run.output_root={tmp_path / 'in-process'}")
    assert local.returncode == 0, local.stderr[-3000:]
    local_dir = printed_run_dir(local.stdout)
    clock = [{k: v for k, v in r.items() if k != "learner/seconds"} for r in comparable_records(local_dir)]
    assert clock == [{k: v for k, v in r.items() if k != "learner/seconds"} for r in expected], "in process differs from Ray"
    local_weights = trained_weights(local_dir)
    assert all(torch.equal(local_weights[name], expected_weights[name]) for name in expected_weights)
