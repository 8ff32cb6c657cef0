"""Diff-Instruct*: the pseudo-Huber score direction and the generator's divergence gradient (hand-computed values),
the fake score's DSM loss and its optimizer on a shadow, the differentiable rewards against the pools' numpy ones,
the config's errors, a short run of the preset (full fine-tuning and LoRA), and an exact resume with the fake score's
optimizer state in the checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raygrpo.algorithms.di_star import divergence_loss, fake_score_loss, score_direction
from raygrpo.algorithms.distill import ShadowOptimizer
from raygrpo.config import ConfigError, load_config
from raygrpo.learner.ema import ParameterShadow
from raygrpo.reward import make_reward
from raygrpo.reward.differentiable import DIFFERENTIABLE_KINDS

from .conftest import ROOT, train_in_process
from .students import comparable, differences, straight_and_resumed
from .test_learner_group import make_batch, make_config

PRESET = ROOT / "cluster" / "tiny_di_star.yaml"


def test_score_direction_against_hand_computed_values():
    v_fake, v_ref, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([0.5])
    # y = -(1 - t)/t (v_fake - v_ref) = [-1, 0]; c = huber_c sqrt(2) = 1 -> d'(y) = y / sqrt(1 + 1)
    assert torch.allclose(score_direction(v_fake, v_ref, t, 1 / math.sqrt(2)), torch.tensor([[-1 / math.sqrt(2), 0.0]]))
    assert torch.allclose(score_direction(v_fake, v_ref, torch.tensor([0.25]), 1e-12), torch.tensor([[-1.0, 0.0]]))  # unit norm


def test_the_divergence_moves_the_generator_toward_the_references_denoised_image():
    x0 = torch.tensor([[0.2, -0.1, 0.4]], requires_grad=True)
    v_fake, v_ref, t = torch.tensor([[0.5, 0.0, -1.0]]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([0.5])
    direction = score_direction(v_fake, v_ref, t, 1e-3)
    divergence_loss(x0, direction).sum().backward()
    assert torch.allclose(x0.grad, direction)  # the per-sample gradient is d'(y_t) itself
    # x0_hat = x_t - t v: the reference's minus the fake's denoised image is t (v_fake - v_ref); descent follows it.
    assert torch.dot(-x0.grad[0], t * (v_fake - v_ref)[0]) > 0


def test_fake_score_loss_is_flow_matching():
    v, eps, x0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, -1.0]])
    assert fake_score_loss(v, eps, x0).item() == pytest.approx(((1 - 0.5) ** 2 + (2 - 1.5) ** 2) / 2)


def test_the_shadow_optimizer_trains_the_shadow_not_the_live_weights():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    live = list(net.parameters())
    before = [p.detach().clone() for p in live]
    shadow = ParameterShadow(live)
    opt = ShadowOptimizer(shadow, lr=0.1, betas=(0.9, 0.999), max_grad_norm=10.0)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    losses = [opt.step(lambda: ((net(x) - y) ** 2).mean()).item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(live, before))
    assert not torch.equal(shadow.values[0], before[0])


@pytest.mark.parametrize("kind, params", [("contrast", {}), ("brightness", {}), ("brightness", {"target": 0.3}), ("color", {"target": "red"})])
def test_differentiable_rewards_match_the_pools(kind, params):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    pool = make_reward(kind, params).score(images, ["a red apple"] * 3)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255).requires_grad_(True)
    torch_score = DIFFERENTIABLE_KINDS[kind](params)(pixels, ["a red apple"] * 3)
    assert np.allclose(torch_score.detach().numpy(), pool, atol=1e-5)
    torch_score.sum().backward()
    assert pixels.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.num_steps=4"], r"one-step generator: set rollout.num_steps: 1"),
        (["algorithm.t_min=0.9", "algorithm.t_max=0.5"], r"t_min=0.9 must be below t_max=0.5"),
        (["algorithm={name: dgpo}"], r"rollout.num_steps=1: only one-step generators"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET, overrides)


@pytest.mark.slow
def test_the_tiny_preset_runs_two_steps_in_process(tmp_path):
    run_dir, rows = train_in_process(PRESET, tmp_path, "train.steps=2")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["learner/fake_dsm"]) and r["learner/samples"] == 16 for r in rows)
    # The fake score starts as the reference (same guidance) and has taken its first DSM step before the first
    # generator term: the gap between the two scores is already there.
    assert all(r["learner/score_gap"] > 0 for r in rows)


@pytest.mark.slow
def test_a_lora_generator_runs_two_steps_in_process(tmp_path):
    """LoRA: the reference is the adapter switched off, the fake score a second adapter's values on the same base."""
    run_dir, rows = train_in_process(PRESET, tmp_path, "train.steps=2", "model.lora={rank: 4, alpha: 8}")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["learner/fake_dsm"]) and r["learner/score_gap"] > 0 and r["learner/grad_norm"] > 0 for r in rows)
    final = run_dir / "checkpoint-final"
    assert (final / "transformer_lora").is_dir() and not (final / "transformer").exists()


@pytest.mark.slow
def test_a_resumed_learner_continues_bit_exactly_with_the_fake_scores_optimizer(tmp_path):
    """Two updates straight equal one update, save, a new learner loading it, one update: parameters, AdamW state, the
    fake score's values and its AdamW moments and step count, the counters, the generator and the metrics."""
    config = make_config("tiny_di_star.yaml")
    batch = make_batch(config, 4)
    a, c, metrics_a, metrics_c = straight_and_resumed(config, batch[:2], batch[2:], tmp_path)
    assert differences(a, c) == []
    assert comparable(metrics_a) == comparable(metrics_c) and np.isfinite(metrics_c.extras["fake_dsm"])
    # the moments carried over are real ones: the fake score took one step per update
    moments = c.algorithm.fake_optimizer.state_dict()
    assert int(moments["0.step"]) == 2 and any(t.abs().sum() > 0 for k, t in moments.items() if k.endswith(".exp_avg"))
