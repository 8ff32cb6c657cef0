"""Exact resume: 2N steps in one go equal N steps, a kill, and the same command run again (auto-resume)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ROOT
from .test_run_e2e import printed_run_dir, run_raygrpo

STEPS = 6
ARGS = [
    "cluster/tiny.yaml", f"train.steps={STEPS}", "train.checkpoint_every=2", "algorithm.group_size=4",
    "algorithm.groups_per_step=2", "algorithm.grad_accum_samples=4", "rollout.num_steps=4",
]  # fmt: skip


def trained_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint-final" / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_bit_identical(ray_cluster, tmp_path):
    straight = run_raygrpo(*ARGS, f"run.output_root={tmp_path / 'straight'}", ray_address=ray_cluster.address)
    assert straight.returncode == 0, straight.stderr[-3000:]

    root = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    command = [sys.executable, "-m", "raygrpo.run", *ARGS, f"run.output_root={root}"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(root.glob("tiny-*/checkpoints/step-000002/MANIFEST.json")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no cleanup, as when a node or the job's driver dies
    proc.wait()
    (run_dir,) = root.glob("tiny-*")
    assert not (run_dir / "checkpoint-final").exists(), "the kill came after the run finished; nothing was resumed"

    resumed = run_raygrpo(*ARGS, f"run.output_root={root}", ray_address=ray_cluster.address)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert printed_run_dir(resumed.stdout) == run_dir, "the same command continues the same run folder"
    assert "resumed from" in resumed.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == list(range(1, STEPS + 1))

    expected, got = trained_weights(printed_run_dir(straight.stdout)), trained_weights(run_dir)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"resumed weights differ from the uninterrupted run in {different[:5]}"
