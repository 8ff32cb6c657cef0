"""DDIM-eta in flow coordinates (raygrpo/sampling/ddim.py) against diffusers' DDIMScheduler.step and the Gaussian formula."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from raygrpo.config import Config
from raygrpo.sampling import (
    alpha_bar_to_sigma,
    ddim_transition,
    ode_step,
    sigma_to_alpha_bar,
    step_transition,
    vp_scale,
)

SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _scheduler(num_steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(**SD_SCHEDULE)
    scheduler.set_timesteps(num_steps)
    return scheduler


def _grid(scheduler: DDIMScheduler) -> torch.Tensor:
    """The DDIM grid as flow sigmas [T+1] (what StableDiffusionModel.sigma_grid('ddim') returns)."""
    alpha_bars = torch.cat([scheduler.alphas_cumprod[scheduler.timesteps].double(), torch.tensor([float(scheduler.final_alpha_cumprod)])])
    return alpha_bar_to_sigma(alpha_bars).float()


def test_sigma_and_alpha_bar_are_inverse_and_y_is_the_flow_interpolation():
    alpha_bar = torch.linspace(1e-4, 1 - 1e-4, 101, dtype=torch.float64)
    sigma = alpha_bar_to_sigma(alpha_bar)
    torch.testing.assert_close(sigma_to_alpha_bar(sigma), alpha_bar, rtol=0, atol=1e-12)
    # y = x_t / s = (1 - sigma) x0 + sigma eps for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    x0, eps = torch.randn(2, 101, dtype=torch.float64)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    torch.testing.assert_close(x_t / vp_scale(sigma), (1 - sigma) * x0 + sigma * eps)
    assert float(sigma_to_alpha_bar(torch.tensor(1.0))) == 0.0 and float(sigma_to_alpha_bar(torch.tensor(0.0))) == 1.0


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_transition_reproduces_diffusers_step(eta):
    """Every step of a 10-step SD schedule: s_prev * y_prev equals DDIMScheduler.step(..., eta, variance_noise=z)."""
    scheduler = _scheduler(10)
    grid = _grid(scheduler)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)  # [B, C, h, w] VP latents
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.randn(x.shape, generator=generator)  # a stand-in for the UNet's epsilon prediction
        z = torch.randn(x.shape, generator=generator)
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=z).prev_sample  # [B, C, h, w]
        y = x / vp_scale(grid[i]).float()
        v = (eps - y) / (1 - grid[i])  # flow velocity of this epsilon at y (raygrpo/models/sd.py)
        step = ddim_transition(y, v, grid[i], grid[i + 1], eta)
        got = step.sample(noise=z) * vp_scale(grid[i + 1]).float()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_eta_zero_is_the_euler_step():
    grid = _grid(_scheduler(8))
    y, v = torch.randn(2, 3, 4, 4, dtype=torch.float32), torch.randn(2, 3, 4, 4)
    for i in range(len(grid) - 1):
        step = ddim_transition(y, v, grid[i], grid[i + 1], 0.0)
        torch.testing.assert_close(step.mean, ode_step(y, v, grid[i], grid[i + 1]), rtol=1e-6, atol=1e-6)
        assert float(step.std.abs().max()) == 0.0


def test_log_prob_is_the_x_space_gaussian_plus_a_schedule_constant():
    """log p_y = element-mean log N(x_prev; mean_x, std_x^2) + log s_prev, so ratios are the x-space ratios."""
    scheduler = _scheduler(10)
    grid = _grid(scheduler)
    i, eta = 3, 1.0
    generator = torch.Generator().manual_seed(1)
    y, v = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    step = ddim_transition(y, v, grid[i], grid[i + 1], eta)
    y_next = step.sample(generator)
    # Reference: the x-space DDIM Gaussian as DDPO/DanceGRPO write it, from abar alone.
    t, prev = scheduler.timesteps[i], scheduler.timesteps[i + 1]
    a, a_prev = scheduler.alphas_cumprod[t].double(), scheduler.alphas_cumprod[prev].double()
    s, s_prev = vp_scale(grid[i]).double(), vp_scale(grid[i + 1]).double()
    x = y.double() * s
    eps = y.double() + (1 - grid[i].double()) * v.double()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    std_x = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    mean_x = a_prev.sqrt() * x0 + (1 - a_prev - std_x**2).sqrt() * eps
    x_prev = y_next.double() * s_prev
    reference = (-((x_prev - mean_x) ** 2) / (2 * std_x**2) - std_x.log() - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob(y_next).double(), reference + s_prev.log(), rtol=0, atol=2e-5)
    # The constant cancels: the log-ratio of two candidate samples is the same in y and in x.
    other = step.sample(generator)
    x_other = other.double() * s_prev
    reference_other = (-((x_other - mean_x) ** 2) / (2 * std_x**2) - std_x.log() - 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close((step.log_prob(y_next) - step.log_prob(other)).double(), reference - reference_other, rtol=0, atol=2e-5)


@pytest.mark.parametrize("shape", [(3, 16, 8), (3, 4, 2, 4, 4)])
def test_step_transition_dispatches_ddim_for_any_latent_rank(shape):
    grid = _grid(_scheduler(6))
    x, v = torch.randn(shape), torch.randn(shape)
    step = step_transition("ddim", 1.0, x, v, grid, 2)
    direct = ddim_transition(x, v, grid[2], grid[3], 1.0)
    torch.testing.assert_close(step.mean, direct.mean)
    assert step.std.shape == (shape[0],) + (1,) * (len(shape) - 1)
    # Per-sample indices (the learner's random subsets) give each sample its own step.
    index = torch.tensor([0, 2, 4])
    batched = step_transition("ddim", 1.0, x, v, grid, index)
    for b, j in enumerate(index.tolist()):
        single = ddim_transition(x[b : b + 1], v[b : b + 1], grid[j], grid[j + 1], 1.0)
        torch.testing.assert_close(batched.mean[b : b + 1], single.mean)
        torch.testing.assert_close(batched.std[b : b + 1], single.std)
    assert torch.isfinite(batched.log_prob(batched.sample(torch.Generator().manual_seed(0)))).all()


def _config(family: str, sampler: str, noise_level: float = 1.0) -> dict:
    return {
        "model": {"family": family},
        "rewards": [{"name": "jpeg", "kind": "jpeg_compressibility"}],
        "algorithm": {"name": "dancegrpo", "sampler": sampler, "noise_level": noise_level},
        "data": {"prompts": ["a cat"]},
    }


def test_config_pairs_ddim_with_sd_only():
    assert Config.model_validate(_config("sd", "ddim")).algorithm.sampler == "ddim"
    for sampler in ("dance_sde", "flow_sde"):
        with pytest.raises(ValueError, match="variance-preserving.*sampler: ddim"):
            Config.model_validate(_config("sd", sampler, 0.3))
    with pytest.raises(ValueError, match="'ddim' is for variance-preserving.*model.family='flux'"):
        Config.model_validate(_config("flux", "ddim"))
    with pytest.raises(ValueError, match=r"DDIM's eta here and must be in \(0, 1\]"):
        Config.model_validate(_config("sd", "ddim", 1.5))
    dgpo = {**_config("sd", "ddim"), "algorithm": {"name": "dgpo", "sampler": "euler"}}
    assert Config.model_validate(dgpo).model.family == "sd"
