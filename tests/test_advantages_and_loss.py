"""Group advantages, best-of-N, timestep subsets and the clipped surrogate against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from raygrpo.algorithms.advantages import advantage_statistics, best_of_n_members, group_advantages
from raygrpo.algorithms.base import LossTerm
from raygrpo.algorithms.dancegrpo import Surrogate, clipped_surrogate, surrogate_gradient, trained_steps
from raygrpo.sampling import grid_steps, sigma_schedule


def test_group_advantages_are_per_reward_unbiased_and_clipped():
    rewards = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 10.0, 50.0]])  # [K=2, G=4]
    adv = group_advantages(rewards, adv_clip_max=5.0)
    std0 = np.std([1, 2, 3, 4], ddof=1)  # torch.std default: unbiased
    np.testing.assert_allclose(adv[0], (np.array([1, 2, 3, 4]) - 2.5) / (std0 + 1e-8), rtol=1e-6)
    std1 = np.std([10, 10, 10, 50], ddof=1)
    np.testing.assert_allclose(adv[1], (np.array([10, 10, 10, 50]) - 20) / (std1 + 1e-8), rtol=1e-6)
    # each reward is normalised on its own: the 10x larger reward does not get larger advantages
    assert abs(adv[1]).max() < 2
    clipped = group_advantages(np.array([[0.0] * 99 + [1.0]]), adv_clip_max=5.0)
    assert clipped.max() == pytest.approx(5.0) and clipped.dtype == np.float32


def test_zero_variance_group_has_zero_advantage():
    adv = group_advantages(np.full((1, 6), 0.7), adv_clip_max=5.0)
    assert np.all(adv == 0)
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(np.ones((1, 1)), 5.0)


def test_best_of_n_keeps_top_and_bottom_by_weighted_advantage():
    adv = np.array([[3, 1, -2, 0, 2, -1, -3, 4], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    chosen = best_of_n_members(adv, np.array([1.0, 1.0]), 4, np.random.default_rng(0))
    assert sorted(chosen.tolist()) == sorted([7, 0, 6, 2])  # top two (4, 3) and bottom two (-3, -2)
    # weights decide the ranking: reward 1 alone with reversed sign flips top and bottom
    adv2 = np.stack([adv[0], -adv[0]])
    assert sorted(best_of_n_members(adv2, np.array([0.0, 1.0]), 2, np.random.default_rng(0)).tolist()) == [6, 7]
    # advantages are not renormalised and the order is shuffled
    orders = {tuple(best_of_n_members(adv, np.array([1.0, 0.0]), 4, np.random.default_rng(s))) for s in range(10)}
    assert len(orders) > 1
    with pytest.raises(ValueError, match="even n"):
        best_of_n_members(adv, np.array([1.0, 1.0]), 3, np.random.default_rng(0))


def test_trained_steps_drop_the_last_transition_and_keep_a_fraction():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        steps = trained_steps(16, 0.6, rng)
        assert len(steps) == math.floor(15 * 0.6) == 9
        assert len(set(steps.tolist())) == 9 and steps.max() <= 14  # step 15 (the last) is never trained
        seen.update(steps.tolist())
    assert seen == set(range(15))  # a random subset, not a fixed one


def test_clipped_surrogate_matches_ppo_cases():
    eps = 0.1
    ratio = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5, 1.05])
    adv = torch.tensor([2.0, 2.0, 2.0, -2.0, -2.0, -1.0])
    expected = torch.tensor(
        [
            -2.0,  # ratio 1: -A
            -2.0 * 1.1,  # A>0, ratio above the band: clipped (pessimistic)
            -2.0 * 0.5,  # A>0, ratio below: unclipped is larger (worse) -> kept
            2.0 * 1.5,  # A<0, ratio above: unclipped is worse -> kept
            2.0 * 0.9,  # A<0, ratio below: clipped
            1.05,  # inside the band
        ]
    )
    torch.testing.assert_close(clipped_surrogate(ratio, adv, eps), expected)


def test_clipped_surrogate_gradient_vanishes_outside_the_band():
    ratio = torch.tensor([1.5, 1.05], requires_grad=True)
    clipped_surrogate(ratio, torch.tensor([1.0, 1.0]), 0.1).sum().backward()
    assert ratio.grad.tolist() == [0.0, -1.0]


def test_surrogate_gradient_and_value_are_the_clipped_surrogate_and_its_autograd_gradient():
    """The learner's DanceGRPO term: the gradient in v (the backward the learner starts at v) of sum_k w_k
    clipped_surrogate on the step's log-prob, as autograd gives it, and the surrogate's value (summed once per window
    group), at rho exactly 1 (on-policy: the branches tie), inside the band and outside it on both sides, for
    advantages of either sign, zero, and mixed signs across two rewards."""
    eps, gen = 1e-3, torch.Generator().manual_seed(0)
    steps = grid_steps("dance_sde", 0.3, sigma_schedule(6, 3.0))
    x, v = torch.randn(5, 16, 8, generator=gen), torch.randn(5, 16, 8, generator=gen)  # [n, S, D]
    x_next = steps.transition(x, v, 2).sample(gen)
    advantages = torch.tensor([[1.0, -0.5], [-2.0, 0.3], [0.7, 1.2], [-1.0, -0.4], [0.0, 2.0]])  # [n, K]
    weights = torch.tensor([0.7, 1.4])
    surrogate = Surrogate.of(advantages, weights, eps)
    on_policy = steps.transition(x, v, 2).log_prob(x_next)  # [n]
    seen_vanishing = 0
    for shift in ([0.0] * 5, [5e-4, -5e-4, 3e-3, -4e-3, 2e-3], [-3e-3, 4e-3, -2e-3, 5e-3, -6e-3]):
        old = on_policy - torch.tensor(shift)
        plain = v.clone().requires_grad_(True)
        ratio_plain = torch.exp(steps.transition(x, plain, 2).log_prob(x_next) - old)
        expected = (weights * clipped_surrogate(ratio_plain[:, None], advantages, eps)).sum()
        expected.backward()
        fused = v.clone().requires_grad_(True)
        gradient, ratio, log_ratio = surrogate_gradient(steps, x, fused, x_next, 2, old, surrogate)
        LossTerm(torch.zeros(()), slot=0, final=True, output=fused, gradient=gradient).backward(torch.tensor(3.0))
        assert not gradient.requires_grad
        torch.testing.assert_close(surrogate.value(ratio), expected.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(fused.grad, 3.0 * plain.grad, rtol=1e-5, atol=1e-9)
        assert torch.equal(ratio, ratio_plain.detach()) and not (ratio.requires_grad or log_ratio.requires_grad)
        # past the band on its advantages' side a sample has no gradient (pessimistic clip)
        vanishing = ((advantages >= 0).all(1) & (ratio > 1 + eps)) | ((advantages <= 0).all(1) & (ratio < 1 - eps))
        assert (plain.grad.flatten(1)[vanishing] == 0).all() and (fused.grad.flatten(1)[vanishing] == 0).all()
        seen_vanishing += int(vanishing.sum())
    assert (ratio > 1 + eps).any() and (ratio < 1 - eps).any(), "the last shifts leave the band on both sides"
    assert seen_vanishing >= 2, "some shift puts a one-sided sample past its clip"
    # the value of several steps' ratios at once (a window group's terms, stacked) is the sum of each step's
    stacked = torch.stack([torch.ones(5), ratio, 1 + 2 * (ratio - 1)])  # [3, n]
    torch.testing.assert_close(surrogate.value(stacked), sum(surrogate.value(r) for r in stacked), rtol=1e-6, atol=1e-7)


def test_advantage_statistics_cover_only_the_trained_members():
    a = np.array([[-1.0, 0.0, 1.0, 2.0], [5.0, 5.0, -5.0, -5.0]], np.float32)  # [K=2, G=4]
    b = np.array([[3.0, -3.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]], np.float32)
    stats = advantage_statistics([a, b], [np.array([0, 3]), np.arange(4)], ["jpeg", "clip"])
    jpeg = [-1.0, 2.0, 3.0, -3.0, 0.5, 0.5]  # group a's members 1 and 2 were not trained (best-of-N)
    assert stats["advantage/jpeg/mean"] == pytest.approx(np.mean(jpeg))
    assert stats["advantage/jpeg/std"] == pytest.approx(np.std(jpeg))
    assert (stats["advantage/jpeg/min"], stats["advantage/jpeg/max"]) == (-3.0, 3.0)
    assert (stats["advantage/clip/min"], stats["advantage/clip/max"]) == (-5.0, 5.0)
    empty = advantage_statistics([], [], ["jpeg"])  # every group dropped: the same keys, NaN
    assert sorted(empty) == ["advantage/jpeg/max", "advantage/jpeg/mean", "advantage/jpeg/min", "advantage/jpeg/std"]
    assert all(math.isnan(v) for v in empty.values())
