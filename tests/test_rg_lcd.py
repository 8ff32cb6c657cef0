"""RG-LCD: the consistency distance, the teacher's step, the latent reward model's pair loss (hand-computed values)
and that it learns a pool's ordering, LCM's multistep sampler, the config's errors, a short run of the preset (full
fine-tuning and LoRA), and an exact resume with the latent reward model in the checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raygrpo.algorithms.distill import LatentRewardModel, lrm_pair_loss, AuxiliaryOptimizer
from raygrpo.algorithms.rg_lcd import consistency_distance, teacher_step
from raygrpo.config import ConfigError, load_config
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch
from raygrpo.learner.state import TrainingStateError
from raygrpo.sampling import make_ode_solver

from .conftest import ROOT, train_in_process
from .students import comparable, differences, straight_and_resumed
from .test_learner_group import make_batch, make_config

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


@pytest.mark.slow
def test_a_lora_student_runs_two_steps_in_process(tmp_path):
    """LoRA: the student is an adapter on the frozen teacher (the adapter switched off), the target an adapter EMA."""
    run_dir, rows = train_in_process(PRESET, tmp_path, "train.steps=2", "model.lora={rank: 4, alpha: 8}")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["learner/distill"]) and np.isfinite(r["learner/lrm_loss"]) and r["learner/grad_norm"] > 0 for r in rows)
    final = run_dir / "checkpoint-final"
    assert (final / "transformer_lora").is_dir() and not (final / "transformer").exists()


@pytest.mark.slow
def test_a_resumed_learner_continues_bit_exactly_with_its_latent_reward_model(tmp_path):
    """Two updates straight equal one update, save, a new learner loading it, one update: parameters, AdamW state, the
    target EMA, the LRM's weights and AdamW state, the counters, the generator and the second update's metrics."""
    config = make_config("tiny_rg_lcd.yaml")
    assert config.algorithm.reward_source == "latent"
    batch = make_batch(config, 4)
    a, c, metrics_a, metrics_c = straight_and_resumed(config, batch[:2], batch[2:], tmp_path)
    assert differences(a, c) == []
    assert comparable(metrics_a) == comparable(metrics_c) and np.isfinite(metrics_c.extras["lrm_loss"])
    # The LRM is built at its first use; a resume builds it from the saved sizes before the first update.
    saved = torch.load(tmp_path / "algorithm.pt", weights_only=True)["reward"]
    fresh = Learner(config)
    assert fresh.algorithm.reward.lrm is None
    fresh.load_state(str(tmp_path))
    lrm = fresh.algorithm.reward.lrm.state_dict()
    assert lrm.keys() == saved["lrm"].keys() and all(torch.equal(lrm[k], saved["lrm"][k]) for k in lrm)
    # and the saved LRM is a trained one (a fresh LRM would not do): its AdamW state has taken lrm_steps steps
    assert all(int(s["step"]) == config.algorithm.lrm_steps for s in saved["optimizer"]["state"].values())
    (tmp_path / "algorithm.pt").unlink()
    with pytest.raises(TrainingStateError, match=r"algorithm.pt is missing: the checkpoint is incomplete"):
        Learner(config).load_state(str(tmp_path))


def test_a_cfg_teacher_on_stable_diffusion_keeps_the_negative_while_the_student_trains_without_cfg():
    """SD's teacher guides with CFG (the real preset: 8.0) while the student trains at guidance 1: the learner loads no
    text encoder, so it must keep the empty prompt's encoding for the teacher and still train the policy at 1."""
    config = make_config(
        "tiny_rg_lcd.yaml", "model.family=sd", "model.guidance_scale=1.0", "algorithm.teacher_guidance_scale=4.0",
        "rollout.micro_batch_size=2",
    )
    learner = Learner(config)
    assert learner.model.guidance_scale == 1.0
    assert learner.model.negative_conditioning.prompt_embeds.shape[0] == 77  # CLIP's fixed length: the empty prompt
    metrics = learner.update(RankBatch.whole(make_batch(config, 2)))
    assert math.isfinite(metrics.loss) and metrics.grad_norm > 0
