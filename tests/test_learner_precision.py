"""bf16 compute: a learner alone in its process shards like a Ray rank, so the first ratio stays exactly 1."""

from __future__ import annotations

import json

import torch

from raygrpo.config import load_config
from raygrpo.controller import Controller
from raygrpo.learner.learner import Learner

from .conftest import ROOT


def test_a_bf16_learner_in_this_process_is_sharded_with_fp32_master_weights():
    learner = Learner(load_config(ROOT / "cluster" / "tiny.yaml", ["model.dtype=bfloat16"]))
    assert learner.sharded and torch.distributed.get_world_size() == 1
    assert all(p.dtype == torch.float32 for p in learner.parameters)


def test_in_process_bf16_dancegrpo_keeps_the_first_ratio_exactly_one_after_weight_syncs(tmp_path):
    """Step 2 samples with the weights the learner exported after step 1: the learner's recomputed log-probs must
    equal the rollout's bit for bit (torch.autocast on an unsharded learner was 3e-4 off here)."""
    config = load_config(
        ROOT / "cluster" / "tiny.yaml",
        ["run.in_process=true", "model.dtype=bfloat16", "train.steps=2", "train.checkpoint_every=0", "logging.tensorboard=false"],
    )
    Controller(config, tmp_path / "run", list(config.data.prompts)).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and [r["learner/first_ratio_max_abs_dev"] for r in rows] == [0.0, 0.0]
