"""SD3 / SD3.5 end to end on a tiny random SD3: both algorithms through the real controller, CFG in rollout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import run_main
from .test_run_e2e import printed_run_dir

COMMON = [
    "model.family=sd3", "model.guidance_scale=4.5", "model.max_sequence_length=16", "train.steps=2",
    "algorithm.group_size=4", "algorithm.groups_per_step=2", "rollout.num_steps=4",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm",
    [
        # Flow-GRPO's sampler on SD3: Flow-SDE, CFG in rollout and training, members spread over 2 workers.
        ["algorithm.sampler=flow_sde", "algorithm.noise_level=0.7", "algorithm.grad_accum_samples=8",
         "rollout.num_workers=2", "rollout.spread_groups=true", "algorithm.shared_noise=false"],
        # DGPO's SD3 recipe: CFG in rollout, none in training.
        ["algorithm={name: dgpo, group_size: 4, groups_per_step: 2, trunc_steps: 2, num_train_timesteps: 2}",
         "model.train_guidance_scale=1.0", "rollout.micro_batch_size=4"],
    ],
    ids=["dancegrpo-flow-sde", "dgpo"],
)  # fmt: skip
def test_sd3_trains_with_both_algorithms(ray_cluster, tmp_path, algorithm):
    """Flow-SDE through the session's Ray cluster (2 workers sharing a group), driven from this process (no new
    interpreter importing torch and diffusers: the actors are what is on Ray); DGPO, whose rollouts ship a subset of
    that (final latents, the same conditioning), in process (run.in_process=true)."""
    if "dgpo" in algorithm[0]:
        proc = run_main("cluster/tiny.yaml", "run.in_process=true", *COMMON, *algorithm, f"run.output_root={tmp_path}")
    else:
        proc = run_main("cluster/tiny.yaml", *COMMON, *algorithm, f"run.output_root={tmp_path}", env={"RAY_ADDRESS": ray_cluster.address})
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = printed_run_dir(proc.stdout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["groups/trained"] for r in records] == [2.0, 2.0]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in records)
    if "dgpo" not in algorithm[0]:
        assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records), "CFG rollout and training must agree exactly"
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(run_dir / "export")  # the exported, trained pipeline
    assert pipeline.transformer.config.in_channels == 16
