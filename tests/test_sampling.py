"""The sampler steps against their closed forms (reference doc §2) and against diffusers' Euler step."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from raygrpo.sampling import (
    dance_sde_transition,
    flow_sde_transition,
    grid_steps,
    ode_step,
    predicted_x0,
    shift_sigmas,
    sigma_schedule,
    step_transition,
)


@pytest.fixture
def xv():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=gen)  # [B, S, D]
    v = torch.randn(3, 16, 8, generator=gen)
    return x, v


def test_schedule_endpoints_shift_and_order():
    sigmas = sigma_schedule(16, shift=3.0)
    assert sigmas.shape == (17,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    plain = torch.linspace(1, 0, 17)
    assert torch.allclose(sigmas, 3 * plain / (1 + 2 * plain))
    assert torch.allclose(shift_sigmas(plain, 1.0), plain)
    with pytest.raises(ValueError, match="num_steps"):
        sigma_schedule(0, 3.0)


def test_dance_sde_matches_danceGRPO_two_part_form(xv):
    """DanceGRPO writes the mean as the ODE mean plus dsigma * (-eta^2/2) * score_hat."""
    x, v = xv
    sigma, sigma_next, eta = 0.7, 0.55, 0.3
    dsigma = sigma_next - sigma
    x0_hat = x - sigma * v
    score_hat = -(x - (1 - sigma) * x0_hat) / sigma**2
    expected_mean = x + dsigma * v + dsigma * (-(eta**2) / 2) * score_hat
    step = dance_sde_transition(x, v, sigma, sigma_next, eta)
    torch.testing.assert_close(step.mean, expected_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.std.expand_as(x), torch.full_like(x, eta * math.sqrt(sigma - sigma_next)))


def test_flow_sde_matches_flowGRPO_form(xv):
    """Flow-GRPO writes the mean as x (1 + g^2 dsigma / (2 sigma)) + v (1 + g^2 (1 - sigma) / (2 sigma)) dsigma;
    at sigma = 1 only the denominator of g = a sqrt(sigma / (1 - sigma)) takes sigma_max."""
    x, v = xv
    a, sigma_max = 0.7, 0.93
    for sigma, sigma_next in [(0.6, 0.45), (1.0, 0.93)]:
        g = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1.0 else sigma)))
        dsigma = sigma_next - sigma
        expected = x * (1 + g**2 * dsigma / (2 * sigma)) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dsigma
        step = flow_sde_transition(x, v, sigma, sigma_next, a, sigma_max)
        torch.testing.assert_close(step.mean, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step.std.flatten(), torch.full((3,), g * math.sqrt(-dsigma)))


def test_flow_sde_hand_computed_first_and_later_step():
    """a = 0.7 on the grid [1, 0.75, 0.5, 0], x = 1, v = 2 (dsigma = -0.25 at both steps).

    Step 0, sigma = 1: g = 0.7 sqrt(1 / (1 - 0.75)) = 1.4 (numerator 1, denominator from sigma_max = 0.75),
    std = 1.4 * 0.5 = 0.7, mean = 1 - 0.25 (2 + 1.96 / 2 * (1 + 0 * 2)) = 0.255.
    Step 1, sigma = 0.75: g^2 = 0.49 * 3 = 1.47, std = sqrt(1.47) * 0.5 = 0.35 sqrt(3),
    mean = 1 - 0.25 (2 + 1.47 / 1.5 * (1 + 0.25 * 2)) = 0.1325.
    (sigma_max in the numerator too, the old bug, gave step 0 a std of 0.7 sqrt(0.75) = 0.606.)
    """
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.0])
    x, v = torch.ones(2, 1), torch.full((2, 1), 2.0)  # [B, D]
    expected = {0: (0.255, 0.7), 1: (0.1325, 0.35 * math.sqrt(3))}
    for index, (mean, std) in expected.items():
        step = step_transition("flow_sde", 0.7, x, v, sigmas, index)
        torch.testing.assert_close(step.mean, torch.full((2, 1), mean), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(step.std, torch.full((2, 1), std), rtol=1e-6, atol=1e-6)
    # the log-density at the mean is -log std - log(2 pi) / 2: -log 0.7 - 0.918939 at step 0
    first = step_transition("flow_sde", 0.7, x, v, sigmas, 0)
    torch.testing.assert_close(first.log_prob(first.mean), torch.full((2,), -math.log(0.7) - 0.5 * math.log(2 * math.pi)))
    # samples at different steps in one batch (the learner's random subsets) get each their own g
    mixed = step_transition("flow_sde", 0.7, x, v, sigmas, torch.tensor([0, 1]))
    torch.testing.assert_close(mixed.mean.flatten(), torch.tensor([0.255, 0.1325]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed.std.flatten(), torch.tensor([0.7, 0.35 * math.sqrt(3)]), rtol=1e-6, atol=1e-6)


def test_zero_noise_sde_equals_ode(xv):
    x, v = xv
    sigmas = sigma_schedule(8, 3.0)
    for i in range(8):
        ode = ode_step(x, v, sigmas[i], sigmas[i + 1])
        for sampler in ("dance_sde", "flow_sde"):
            step = step_transition(sampler, 0.0, x, v, sigmas, i)
            torch.testing.assert_close(step.mean, ode, rtol=0, atol=0)
            torch.testing.assert_close(step.sample(torch.Generator().manual_seed(1)), ode, rtol=0, atol=0)
        # and with noise, a zero draw gives the SDE mean, not the ODE: the drift correction is real
        noisy = step_transition("dance_sde", 0.3, x, v, sigmas, i)
        assert torch.equal(noisy.sample(noise=torch.zeros_like(x)), noisy.mean)


def test_ode_step_equals_diffusers_euler(xv):
    x, v = xv
    sigmas = sigma_schedule(6, 3.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].numpy().tolist(), device="cpu")
    sample = x.clone()
    ours = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(v, t, sample, return_dict=False)[0]
        ours = ode_step(ours, v, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-5)


def test_log_prob_is_element_mean_gaussian_density(xv):
    x, v = xv
    step = dance_sde_transition(x, v, 0.8, 0.6, 0.3)
    x_next = step.sample(torch.Generator().manual_seed(3))
    normal = torch.distributions.Normal(step.mean.double(), step.std.double().expand_as(step.mean))
    expected = normal.log_prob(x_next.double()).flatten(1).mean(1).float()
    torch.testing.assert_close(step.log_prob(x_next), expected, rtol=1e-6, atol=1e-6)
    assert step.log_prob(x_next).shape == (3,)
    # the mean is the most likely point; moving away lowers the density
    assert bool((step.log_prob(step.mean) > step.log_prob(x_next)).all())
    with pytest.raises(ValueError, match="std > 0"):
        step_transition("ode", 0.0, x, v, sigma_schedule(4, 1.0), 0).log_prob(x)


def test_grid_log_prob_with_gradient_is_the_transition_log_prob_and_autograd_gradient(xv):
    """GridSteps.log_prob_with_gradient (the learner's): bit for bit Transition.log_prob, which rollout records (the
    on-policy ratio is exactly 1), and autograd's gradient of it in v, for every stochastic sampler."""
    x, v = xv
    sigmas = sigma_schedule(6, 3.0)
    for sampler, level in (("dance_sde", 0.3), ("flow_sde", 0.7), ("ddim", 1.0)):
        steps = grid_steps(sampler, level, sigmas)
        for j in (0, 2, 4):  # DDIM's last step (into sigma = 0) has std 0
            x_next = steps.transition(x, v, j).sample(torch.Generator().manual_seed(j))
            plain = v.clone().requires_grad_(True)
            expected = steps.transition(x, plain, j).log_prob(x_next)  # [B]
            (gradient,) = torch.autograd.grad(expected.sum(), plain)
            got, d_v = steps.log_prob_with_gradient(x, v, x_next, j)
            assert torch.equal(got, expected.detach()), (sampler, j)
            torch.testing.assert_close(d_v, gradient, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="std > 0"):
        grid_steps("ode", 0.0, sigmas).log_prob_with_gradient(x, v, x, 0)


def test_samples_have_the_stated_mean_and_std():
    x = torch.zeros(20000, 1)
    v = torch.ones(20000, 1)
    step = dance_sde_transition(x, v, 0.5, 0.25, 0.3)
    draws = step.sample(torch.Generator().manual_seed(0))
    expected_mean = -0.25 * (1 + 0.09 / (2 * 0.5) * 0.5)
    assert abs(draws.mean().item() - expected_mean) < 3 * 0.3 * 0.5 / math.sqrt(20000) * 2
    assert abs(draws.std().item() - 0.3 * 0.5) < 0.003


def test_per_sample_step_indices(xv):
    x, v = xv
    sigmas = sigma_schedule(8, 3.0)
    index = torch.tensor([0, 3, 6])
    batched = step_transition("dance_sde", 0.3, x, v, sigmas, index)
    for b, i in enumerate(index.tolist()):
        single = step_transition("dance_sde", 0.3, x[b : b + 1], v[b : b + 1], sigmas, i)
        torch.testing.assert_close(batched.mean[b : b + 1], single.mean, rtol=0, atol=0)
        torch.testing.assert_close(batched.std[b : b + 1], single.std, rtol=0, atol=0)


def test_predicted_x0_inverts_interpolation():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    sigma = 0.4
    x = (1 - sigma) * x0 + sigma * eps
    torch.testing.assert_close(predicted_x0(x, eps - x0, sigma), x0)


def test_unknown_sampler(xv):
    with pytest.raises(ValueError, match="unknown sampler 'euler_a'"):
        step_transition("euler_a", 0.3, *xv, sigma_schedule(4, 1.0), 0)
