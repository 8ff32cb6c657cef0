"""Stable Diffusion 1.x end to end on CPU: DanceGRPO (DDIM eta 1, CFG) and DGPO (ODE rollouts) through `python -m raygrpo.run`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import run_main
from .test_run_e2e import printed_run_dir

DGPO = "algorithm={name: dgpo, group_size: 4, groups_per_step: 2, sampler: dpmpp_2m, trunc_steps: 6, num_train_timesteps: 2}"


def _records(stdout: str) -> tuple[list[dict], object]:
    run_dir = printed_run_dir(stdout)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], run_dir


@pytest.mark.slow
def test_dancegrpo_ddim_on_tiny_sd(ray_cluster, tmp_path):
    """cluster/tiny_sd.yaml for 2 steps on the session's Ray cluster, driven from this process: DDIM-eta rollouts with
    log-probs; the learner's first ratio is exactly 1. 4 DDIM steps instead of the preset's 8 (nothing checked depends
    on the count; each costs two CFG forwards per member)."""
    proc = run_main(
        "cluster/tiny_sd.yaml", "train.steps=2", "algorithm.group_size=4", "rollout.num_steps=4", f"run.output_root={tmp_path}",
        env={"RAY_ADDRESS": ray_cluster.address},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, run_dir = _records(proc.stdout)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in records)
    assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records), "on-policy ratio must be exactly 1"
    assert records[0]["rollout/bytes_per_sample"] > 5 * 4 * 8 * 8 * 4  # trajectory of T+1 = 5 latents [4, 8, 8] float32
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(run_dir / "checkpoint-final" / "unet")  # named as the pipeline names it
    assert trained.config.in_channels == 4


@pytest.mark.slow
def test_dgpo_on_tiny_sd(tmp_path):
    """DGPO on the same tiny SD: DPM-Solver++(2M) rollouts in flow coordinates, CFG in rollout, none in training. In
    process (run.in_process=true): DGPO ships a subset of what DanceGRPO's run above sends through Ray."""
    proc = run_main(
        "cluster/tiny_sd.yaml", "run.in_process=true", "train.steps=2", DGPO, "rollout.micro_batch_size=4",
        "model.train_guidance_scale=1.0", f"run.output_root={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, _ = _records(proc.stdout)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in records)
    assert all(0 <= r["learner/gate_mean"] <= 1 for r in records)
    assert records[0]["rollout/bytes_per_sample"] < 4 * 8 * 8 * 4 + 77 * 32 * 4  # final latents + a share of the conditioning
