"""FLUX.2 end to end on CPU, in process, 2 steps each: DanceGRPO and DGPO on the tiny [klein] base (CFG in rollout),
and DiffusionNFT on the tiny [dev] (embedded guidance), through the real controller."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raygrpo.config import load_config
from raygrpo.controller import Controller
from raygrpo.models import tiny_model_folder

from .conftest import ROOT

SMALL = ["model.family=flux2", "model.max_sequence_length=48", "train.steps=2", "algorithm.group_size=4", "algorithm.groups_per_step=2",
         "rollout.num_steps=4", "run.in_process=true"]  # fmt: skip
DGPO = "algorithm={name: dgpo, group_size: 4, groups_per_step: 2, sampler: dpmpp_2m, trunc_steps: 2, num_train_timesteps: 2}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, overrides",
    [
        # DanceGRPO with klein base's CFG (scale 4) in rollout and training: the learner's first ratio is exactly 1.
        ("tiny.yaml", ["model.guidance_scale=4.0", "algorithm.grad_accum_samples=8"]),
        # DGPO's recipe: CFG in rollout, none in training.
        ("tiny.yaml", [DGPO, "model.guidance_scale=4.0", "model.train_guidance_scale=1.0", "rollout.micro_batch_size=4"]),
        # DiffusionNFT (CFG-free) on [dev], whose guidance is an embedding, not a second branch.
        ("tiny_diffusionnft.yaml", ["model.guidance_scale=4.0", "rollout.micro_batch_size=4"]),
    ],
    ids=["dancegrpo-klein", "dgpo-klein", "diffusionnft-dev"],
)
def test_flux2_trains(tmp_path, preset, overrides):
    if preset == "tiny_diffusionnft.yaml":
        overrides = [*overrides, f"model.pretrained={tiny_model_folder('flux2_dev')}"]
    config = load_config(ROOT / "cluster" / preset, [*SMALL, *overrides])
    Controller(config, tmp_path / "run", list(config.data.prompts)).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["groups/trained"] for r in rows] == [2.0, 2.0]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in rows)
    assert rows[0]["learner/grad_norm"] > 0
    if "dancegrpo" in config.algorithm.name:
        assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in rows), "CFG rollout and training must agree exactly"
