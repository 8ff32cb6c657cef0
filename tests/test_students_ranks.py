"""RG-LCD and Diff-Instruct* on a 2-rank FSDP2 learner (gloo on CPU, the session's two plain processes: tests/two_ranks.py):
each rank trains its whole groups, the two ranks make the update one rank makes, and a resume is exact on every
rank's shard. What a rank holds: its DTensor shard of the student / generator, of the shadows (target EMA, frozen
start, fake score) and of their AdamW moments (sharded state, saved per rank); the whole LRM and its AdamW state,
equal on every rank (replicated state, saved once by rank 0 and read by every rank).

Tolerance as test_learner_group.py's (1e-5 absolute on parameters that one update moves by ~lr = 1e-3 or 1e-2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .students import check_two_updates_on_two_ranks, resume_on_ranks
from .test_learner_group import TOLERANCE, make_batch, make_config
from .two_ranks import RankJob

SCENARIOS = {
    "rg_lcd": ("tiny_rg_lcd.yaml", []),  # latent source: the LRM, replicated
    "di_star_lora": ("tiny_di_star.yaml", ["model.lora={rank: 4, alpha: 8}"]),  # an adapter-sized fake score, sharded
}


def rank_jobs() -> dict[str, RankJob]:
    """This module's jobs of the session's 2-rank processes (tests/two_ranks.py): each scenario's exact resume."""
    jobs = {}
    for name, (preset, overrides) in SCENARIOS.items():
        batch = make_batch(make_config(preset, *overrides), 4)
        jobs[f"students.{name}"] = RankJob(resume_on_ranks, (make_config(preset, *overrides, "learner.num_ranks=2"), batch[:2], batch[2:]))
    return jobs


def _check(two_ranks, name: str):
    """The 2-rank exact resume and the one-rank comparison of the module docstring; A's metrics and what rank 0 saved."""
    preset, overrides = SCENARIOS[name]
    two, (_, b1, b2) = two_ranks[f"students.{name}"], two_ranks.jobs[f"students.{name}"].args
    one, straight = check_two_updates_on_two_ranks(make_config(preset, *overrides), b1, b2, two, TOLERANCE)
    assert straight.samples == 2 * 4
    return one, straight.extras, two


@pytest.mark.slow
def test_rg_lcd_on_two_ranks_keeps_one_latent_reward_model(two_ranks):
    _, extras, two = _check(two_ranks, "rg_lcd")
    assert np.isfinite(extras["lrm_loss"])
    (rank0, rank1) = [replicated for _, replicated in two["ranks"]]
    assert rank0 and rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.slow
def test_di_star_with_lora_on_two_ranks(two_ranks):
    one, extras, _ = _check(two_ranks, "di_star_lora")
    # the fake score is adapter-sized: one value per trained (adapter) parameter
    assert len(one.algorithm.fake.values) == len(one.parameters) and all("lora" in n for n in one.parameter_names)
    assert np.isfinite(extras["fake_dsm"]) and extras["score_gap"] > 0
