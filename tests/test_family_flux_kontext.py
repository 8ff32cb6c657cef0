"""FLUX.1 Kontext image editing end to end on the tiny build, in process: each prompt group carries its reference image
from the data file through rollout (encoded once per group) to the learner, with DanceGRPO, DGPO and Flow-GRPO."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from .conftest import run_main
from .test_run_in_process import IN_PROCESS, records, run_folder

PRESET = "cluster/tiny_flux_kontext.yaml"
SMALL = ["train.steps=2", "rollout.num_steps=4", "train.checkpoint_every=0"]
ALGORITHMS = {
    # The preset's Flow-GRPO (Flow-SDE a = 0.9, fresh noise per member, global std, no KL).
    "flow_grpo": ["algorithm.group_size=4", "algorithm.grad_accum_samples=8"],
    "dancegrpo": ["algorithm={name: dancegrpo, group_size: 4, groups_per_step: 2, sampler: dance_sde, noise_level: 0.3, "
                  "shared_noise: true, timestep_fraction: 0.6, grad_accum_samples: 8}"],
    # The export is DGPO's slow EMA: updated every step here, so that 2 steps move it.
    "dgpo": ["algorithm={name: dgpo, group_size: 4, groups_per_step: 2, sampler: dpmpp_2m, trunc_steps: 2, num_train_timesteps: 2, "
             "slow_ema_every: 1}", "rollout.micro_batch_size=4"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_kontext_edits_train_with_each_algorithm(tmp_path, algorithm):
    proc = run_main(PRESET, IN_PROCESS, *SMALL, *ALGORITHMS[algorithm], f"run.output_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = run_folder(tmp_path)
    rows = records(run_dir)
    assert [r["groups/trained"] for r in rows] == [2.0, 2.0]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in rows)
    if algorithm == "dgpo":
        assert all(0 <= r["learner/gate_mean"] <= 1 for r in rows)
    else:  # on policy: the learner's forward over [noisy ; reference] tokens reproduces the sampler's log-probs exactly
        assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in rows)
    from diffusers import FluxKontextPipeline

    exported = FluxKontextPipeline.from_pretrained(run_dir / "export")  # the trained editing pipeline
    base = FluxKontextPipeline.from_pretrained(json.loads((run_dir / "export" / "raygrpo_export.json").read_text())["pretrained_folder"])
    trained, start = exported.transformer.state_dict(), base.transformer.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_a_prompt_source_without_reference_images_is_refused_before_any_worker(tmp_path):
    proc = run_main(PRESET, IN_PROCESS, "data.prompt_file=null", "data.prompts=[make it blue]", f"run.output_root={tmp_path}")
    assert proc.returncode == 2
    assert "model.family='flux_kontext' is image editing and needs a conditioning image per prompt" in proc.stderr
