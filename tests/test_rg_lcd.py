"""RG-LCD: the consistency distance, the teacher's step, the latent reward model's pair loss (hand-computed values)
and that it learns a pool's ordering, LCM's multistep sampler, the config's errors, and a short run of the preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raygrpo.algorithms.distill import LatentRewardModel, lrm_pair_loss, AuxiliaryOptimizer
from raygrpo.algorithms.rg_lcd import consistency_distance, teacher_step
from raygrpo.config import ConfigError, load_config
from raygrpo.sampling import make_ode_solver

from .conftest import ROOT, train_in_process

PRESET = ROOT / "cluster" / "tiny_rg_lcd.yaml"


def test_pseudo_huber_and_l2_distances_against_hand_computed_values():
    f, target = torch.tensor([[0.0, 0.003]]), torch.tensor([[0.004, 0.0]])
    huber = (math.sqrt(0.004**2 + 1e-6) - 1e-3 + math.sqrt(0.003**2 + 1e-6) - 1e-3) / 2
    assert consistency_distance(f, target, "huber", 1e-3).item() == pytest.approx(huber, rel=1e-5)
    assert consistency_distance(f, target, "l2", 1e-3).item() == pytest.approx((16e-6 + 9e-6) / 2, rel=1e-5)


def test_the_teacher_step_is_euler_per_sample():
    x, v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    out = teacher_step(x, v, torch.tensor([0.8, 0.4]), torch.tensor([0.6, 0.0]))
    assert torch.allclose(out, torch.tensor([[1.0 - 0.1, 2.0 + 0.2], [3.0 - 0.8, 4.0]]))


def test_lrm_pair_loss_is_the_kl_to_the_pools_preference():
    # s = [0, 0] (no preference), A = [1, -1], T = 1: p = sigmoid(2), q = 1/2.
    p = 1 / (1 + math.exp(-2))
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert lrm_pair_loss(torch.zeros(2), torch.tensor([1.0, -1.0]), 1.0).item() == pytest.approx(kl, rel=1e-5)
    # Exactly matching score differences (A / T) give 0, for every pair of a group.
    a = torch.tensor([0.3, -1.2, 2.0])
    assert lrm_pair_loss(a / 2.0, a, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_the_latent_reward_model_learns_a_pools_ordering():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16, 8)  # 4 groups of 6 packed latents [S=16, D=8]
    a = x.std(dim=(2, 3))  # the "pool" prefers higher-contrast latents
    a = (a - a.mean(dim=1, keepdim=True)) / a.std(dim=1, keepdim=True)
    text = torch.zeros(6, 3, 5)
    lrm = LatentRewardModel(8, 5, hidden=32)
    opt = AuxiliaryOptimizer(list(lrm.parameters()), lr=1e-2, max_grad_norm=1.0)
    first = None
    for _ in range(150):
        loss = torch.stack([lrm_pair_loss(lrm(x[g], text), a[g], 1.0) for g in range(4)]).mean()
        first = first if first is not None else loss.item()
        opt.step(loss)
    with torch.no_grad():
        s = torch.stack([lrm(x[g], text) for g in range(4)])
    i, j = torch.triu_indices(6, 6, offset=1)
    agree = ((s[:, i] - s[:, j]) * (a[:, i] - a[:, j]) > 0).float().mean().item()
    assert loss.item() < 0.3 * first and agree > 0.9


def test_consistency_sampling_one_step_and_multistep():
    x, v = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    one = make_ode_solver("consistency", torch.tensor([1.0, 0.0]))
    assert torch.equal(one.step(x, v, 0), x - v)  # one-step generation: the clean prediction
    grid = torch.tensor([1.0, 0.5, 0.0])
    both = make_ode_solver("consistency", grid)
    x1 = both.step(x, v, 0)
    noise = (x1 - 0.5 * (x - v)) / 0.5  # the fresh noise of each row
    assert not torch.allclose(noise[0], noise[1]) and 0.3 < noise.std().item() < 3.0
    assert torch.allclose(both.step(x1, v, 1), x1 - 0.5 * v)  # the last step returns the clean prediction
    alone = make_ode_solver("consistency", grid)
    assert torch.equal(alone.step(x[1:2], v[1:2], 0), x1[1:2])  # a row's draws do not depend on its batch


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.family=sd", "model.guidance_scale=7.5"], r"samples without classifier-free guidance.*model.guidance_scale=7.5"),
        (["algorithm.sampler=euler"], r"algorithm.sampler: Input should be 'consistency'"),
        (["algorithm.reward_source=pixels"], r"algorithm.reward_source: Input should be 'pixel' or 'latent'"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET, overrides)


def test_pixel_source_refuses_a_reward_without_gradient():
    from raygrpo.reward.differentiable import differentiable_reward

    config = load_config(PRESET, ["algorithm.reward_source=pixel"])
    with pytest.raises(ValueError, match=r"jpeg \(jpeg_compressibility\) is not differentiable.*reward_source: latent"):
        differentiable_reward(config.rewards)


@pytest.mark.slow
def test_the_tiny_preset_runs_two_steps_in_process(tmp_path):
    run_dir, rows = train_in_process(PRESET, tmp_path, "train.steps=2")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["learner/distill"]) and np.isfinite(r["learner/lrm_loss"]) and r["learner/samples"] == 16 for r in rows)
    assert (run_dir / "checkpoint-final" / "transformer").is_dir()
