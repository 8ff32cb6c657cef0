"""Flow-GRPO, CPS, Flow-GRPO-Fast and GRPO-Guard: their math against hand-computed values, their configuration errors,
the first ratio exactly 1 through the real rollout worker and learner, and the tiny presets end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from raygrpo.algorithms.flow_grpo import RandomWindow, guard_weight, kl_std, kl_to_reference, ratio_norm
from raygrpo.config import ConfigError, load_config
from raygrpo.contracts import PromptGroup, TrainGroup
from raygrpo.controller import Controller
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch
from raygrpo.rollout.worker import RolloutWorker
from raygrpo.sampling import grid_steps, sigma_schedule
from raygrpo.sampling.flow import flow_sde_g

from .conftest import ROOT

G = 4
PLAIN = ROOT / "cluster" / "tiny_flow_grpo.yaml"
FAST = ROOT / "cluster" / "tiny_flow_grpo_fast.yaml"


def test_cps_step_matches_its_definition_and_hand_computed_coefficients():
    """sigma 0.8 -> 0.5, eta 0.5: std = 0.5 sin(pi/4), mean = 0.5 x0_hat + 0.5 cos(pi/4) eps_hat."""
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    steps = grid_steps("cps", 0.5, sigmas)
    c = math.cos(math.pi / 4) * 0.5
    assert steps.coefficients.a[1].item() == pytest.approx(0.5 + c)
    assert steps.coefficients.b[1].item() == pytest.approx(c * 0.2 - 0.5 * 0.8)
    assert steps.coefficients.std[1].item() == pytest.approx(0.5 * math.sin(math.pi / 4))
    assert steps.coefficients.std[2].item() == 0.0  # into sigma 0: deterministic, mean = x0_hat
    x, v = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    x, v = x[None], v[None]  # [1, 3, 4]
    x0_hat, eps_hat = x - 0.8 * v, x + 0.2 * v
    step = steps.transition(x, v, 1)
    torch.testing.assert_close(step.mean, 0.5 * x0_hat + c * eps_hat)
    torch.testing.assert_close(steps.transition(x, v, 2).mean, x - 0.5 * v)
    # The released log-prob: -mean (x_next - mean)^2, no Gaussian constants; the learner's closed form gives the same bits
    x_next = step.sample(torch.Generator().manual_seed(1))
    log_prob = step.log_prob(x_next)
    assert log_prob.item() == pytest.approx(-((x_next - step.mean) ** 2).mean().item())
    same, grad = steps.log_prob_with_gradient(x, v, x_next, 1)
    assert torch.equal(same, log_prob)
    v_leaf = v.clone().requires_grad_(True)
    steps.transition(x, v_leaf, 1).log_prob(x_next).sum().backward()
    torch.testing.assert_close(grad, v_leaf.grad)
    # eta 0 is the Euler ODE step
    torch.testing.assert_close(grid_steps("cps", 0.0, sigmas).transition(x, v, 1).mean, x - 0.3 * v)


def test_kl_is_the_released_mean_difference_over_twice_the_diffusion_coefficient_squared():
    v, v_ref = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]]), torch.tensor([[[0.0, 0.0]], [[0.0, 1.0]]])  # [2, 1, 2]
    kl = kl_to_reference(torch.tensor(0.5), v, v_ref, torch.tensor(0.2))
    # sample 0: mean((0.5 * [1, 2])^2) = (0.25 + 1) / 2 = 0.625, / (2 * 0.04) = 7.8125; sample 1: 0.125 / 0.08 = 1.5625
    torch.testing.assert_close(kl, torch.tensor([7.8125, 1.5625]))
    sigmas = sigma_schedule(10, 3.0)
    # Flow-SDE: g (not the step's std g sqrt(dsigma)); CPS: the step's std sigma_next sin(eta pi / 2)
    torch.testing.assert_close(kl_std("flow_sde", 0.7, sigmas), flow_sde_g(sigmas[:-1], 0.7, float(sigmas[1])))
    torch.testing.assert_close(kl_std("cps", 0.8, sigmas), grid_steps("cps", 0.8, sigmas).coefficients.std)


def test_guard_ratio_norm_centres_the_log_ratio_and_weights_steps_by_one_over_dsigma():
    # Hand values: s = 0.5, log rho = -0.1, mean(Delta^2) = 0.04 -> 0.5 * -0.1 + 0.04 / 1.0 = -0.01
    assert ratio_norm(torch.tensor([-0.1]), torch.tensor([0.04]), torch.tensor(0.5)).item() == pytest.approx(-0.01)
    # Its meaning (paper Eq. 8): with x_next = mu_old + s eps, the normalised log-ratio is mean(eps * Delta), no 1/s
    gen = torch.Generator().manual_seed(0)
    mu_old, delta, eps = (torch.randn(1, 64, generator=gen) for _ in range(3))
    s = torch.tensor(0.3)
    x_next = mu_old + s * eps
    log_density = lambda mu: -((x_next - mu) ** 2).mean(dim=1) / (2 * s**2) - torch.log(s)  # noqa: E731
    log_rho = log_density(mu_old + delta) - log_density(mu_old)
    torch.testing.assert_close(ratio_norm(log_rho, delta.square().mean(dim=1), s), (eps * delta).mean(dim=1))
    assert guard_weight(torch.tensor(0.8), torch.tensor(0.6)).item() == pytest.approx(5.0)


def test_fast_window_is_deterministic_in_the_group_and_covers_its_range():
    window = RandomWindow(3, 0, 5)
    starts = {window.bounds(PromptGroup(0, 0, "p", 4, seed=s, policy_version=0), 10)[0] for s in range(200)}
    assert starts == {0, 1, 2}
    group = PromptGroup(0, 0, "p", 4, seed=7, policy_version=0)
    assert window.bounds(group, 10) == window.bounds(PromptGroup(1, 3, "q", 2, seed=7, policy_version=5, member_offset=2), 10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.fast_window=5"], r"fast_window=5 is longer than its range \[0, 4\)"),
        (["algorithm.fast_window_range=[2, 8]"], r"r1 <= rollout.num_steps - 1 = 7"),
        (["algorithm.fast_window=null"], "fast_window_range is set but fast_window is not"),
        (["algorithm.guard=true"], "needs the Gaussian log-ratio of sampler: flow_sde"),
        (["algorithm.noise_level=1.5"], "CPS's eta"),
    ],
)
def test_fast_configuration_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FAST, overrides)


def test_plain_configuration_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"timestep_fraction=1.0 trains int\(8 \* fraction\) = 8 steps"):
        load_config(PLAIN, ["algorithm.timestep_fraction=1.0"])
    with pytest.raises(ConfigError, match="algorithm.guard needs train.max_staleness=0"):
        load_config(PLAIN, ["algorithm.guard=true", "train.max_staleness=1"])


SMALL = [f"algorithm.group_size={G}", "algorithm.groups_per_step=1", "algorithm.grad_accum_samples=2", "model.max_sequence_length=16"]


@pytest.mark.parametrize(
    ("preset", "overrides", "trained"),
    [
        (PLAIN, ["rollout.num_steps=4"], 3),  # int(4 * 0.99) = 3 steps, with the KL (beta 0.04)
        (PLAIN, ["rollout.num_steps=4", "algorithm.guard=true", "algorithm.beta=0"], 3),
        (FAST, ["rollout.num_steps=6", "algorithm.fast_window=2", "algorithm.fast_window_range=[1, 5]"], 2),
    ],
    ids=["kl", "guard", "fast"],
)
def test_first_ratio_is_exactly_one_and_only_the_recorded_steps_train(preset, overrides, trained):
    """A group sampled by the real rollout worker, trained by the real learner: two optimizer steps (windows of 2
    samples), the first at the sampling weights, so its ratios are exactly 1; only the recorded steps' noise levels
    reach the network, each once per forward kind per window."""
    config = load_config(preset, [*SMALL, *overrides])
    worker, learner = RolloutWorker(config), Learner(config)
    rollout, _, _ = worker.generate(PromptGroup(0, 0, "a lighthouse at dawn", G, seed=11, policy_version=0))
    start, stop = rollout.sde_steps
    assert rollout.log_probs.shape == (G, stop - start) and stop - start >= trained
    seen: list[float] = []
    velocity = learner.model.velocity
    learner.model.velocity = lambda x, sigma, cond: seen.append(float(sigma[0])) or velocity(x, sigma, cond)
    advantages = np.array([[1.0, -1.0, 0.5, -0.5]], np.float32)
    metrics = learner.update(RankBatch.whole([TrainGroup(rollout, 0, advantages, np.ones(1, np.float32), np.arange(G))]))
    assert metrics.optimizer_steps == 2 and metrics.first_ratio_max_abs_dev == 0.0
    assert np.isfinite(metrics.loss) and metrics.grad_norm > 0
    assert set(seen) == {float(s) for s in rollout.sigmas[start : start + trained]}  # the recorded steps, from the first
    forwards = 1 + int(config.algorithm.beta > 0) + int(config.algorithm.guard)  # policy, reference, GRPO-Guard's old
    assert len(seen) == G * trained * forwards  # every sample (one per rollout micro-batch) at every trained step
    if config.algorithm.beta > 0:
        assert metrics.extras["kl"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", [PLAIN, FAST], ids=["flow_grpo", "flow_grpo_fast"])
def test_tiny_presets_train_in_process(tmp_path, preset):
    config = load_config(preset, ["run.in_process=true", "train.steps=2", *SMALL, "rollout.num_steps=6"])
    Controller(config, tmp_path / "run", list(config.data.prompts)).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 and np.isfinite(r["learner/loss"]) for r in rows)
    assert rows[0]["learner/grad_norm"] > 0
    if config.algorithm.beta > 0:
        assert rows[1]["learner/kl"] > 0  # the policy left the reference after step 1's update
