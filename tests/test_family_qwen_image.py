"""Qwen-Image and Qwen-Image-Edit end to end on CPU, in process, 2 steps each, through the real controller: DanceGRPO
(true CFG in rollout and training) and DGPO (true CFG in rollout, none in training) on both, and Flow-GRPO (its KL to
the reference) on Qwen-Image-Edit, whose groups carry their reference image (cluster/prompts/edit_example.jsonl)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raygrpo.config import load_config
from raygrpo.controller import Controller
from raygrpo.data.prompts import load_prompts

from .conftest import ROOT

SMALL = ["model.guidance_scale=4.0", "model.max_sequence_length=48", "train.steps=2", "algorithm.group_size=4",
         "algorithm.groups_per_step=2", "rollout.num_steps=4", "run.in_process=true"]  # fmt: skip
EDIT = ["model.family=qwen_image_edit", "data.prompts=null", f"data.prompt_file={ROOT / 'cluster' / 'prompts' / 'edit_example.jsonl'}"]
DANCEGRPO = ["algorithm.grad_accum_samples=8"]
DGPO = ["algorithm={name: dgpo, group_size: 4, groups_per_step: 2, sampler: dpmpp_2m, trunc_steps: 2, num_train_timesteps: 2}",
        "model.train_guidance_scale=1.0", "rollout.micro_batch_size=4"]  # fmt: skip
FLOW_GRPO = ["algorithm.group_size=4", "algorithm.grad_accum_samples=8", "rollout.micro_batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny.yaml", ["model.family=qwen_image", *DANCEGRPO]),
        ("tiny.yaml", ["model.family=qwen_image", *DGPO]),
        ("tiny.yaml", [*EDIT, *DANCEGRPO]),
        ("tiny.yaml", [*EDIT, *DGPO]),
        ("tiny_flow_grpo.yaml", [*EDIT, *FLOW_GRPO]),
    ],
    ids=["dancegrpo-t2i", "dgpo-t2i", "dancegrpo-edit", "dgpo-edit", "flow-grpo-edit"],
)
def test_qwen_image_trains(tmp_path, preset, overrides):
    config = load_config(ROOT / "cluster" / preset, [*SMALL, *overrides])
    Controller(config, tmp_path / "run", load_prompts(config.data)).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and [r["groups/trained"] for r in rows] == [2.0, 2.0]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and np.isfinite(r["learner/loss"]) for r in rows)
    assert rows[0]["learner/grad_norm"] > 0
    if config.algorithm.name != "dgpo":
        # The learner recomputes the rollout's log-probs with the same true CFG, padded text and reference tokens.
        assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in rows), "CFG rollout and training must agree exactly"
