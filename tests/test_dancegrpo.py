"""DanceGRPO on the real tiny FLUX, in process (the same RolloutWorker / Learner classes Ray runs)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from raygrpo.algorithms.advantages import group_advantages
from raygrpo.config import load_config
from raygrpo.contracts import ConditioningBatch, PromptGroup, Rollout, TrainGroup, as_tensor
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch
from raygrpo.rollout.worker import RolloutWorker
from raygrpo.sampling import step_transition
from raygrpo.weights import load_weights

from .conftest import ROOT

G = 4


def make_config(*overrides: str):
    base = [f"algorithm.group_size={G}", "rollout.num_steps=6", "model.max_sequence_length=16", "algorithm.grad_accum_samples=4"]
    return load_config(ROOT / "cluster" / "tiny.yaml", [*base, *overrides])


@pytest.fixture(scope="module")
def worker_and_learner():
    torch.set_num_threads(1)
    config = make_config()
    return RolloutWorker(config), Learner(config)


def train_group(rollout: Rollout, advantages: np.ndarray, weights=(1.0,), members=None) -> TrainGroup:
    members = np.arange(G) if members is None else members
    return TrainGroup(rollout, rollout.group.group_id, advantages.astype(np.float32), np.asarray(weights, np.float32), members)


def update(learner: Learner, *groups: TrainGroup):
    return learner.update(RankBatch.whole(list(groups)))


def test_rollout_records_a_consistent_trajectory(worker_and_learner):
    worker, _ = worker_and_learner
    rollout, media, info = worker.generate(PromptGroup(0, 0, "a lighthouse at dawn", G, seed=7, policy_version=0))
    assert rollout.trajectory.shape[:2] == (G, 7) and rollout.log_probs.shape == (G, 6)
    assert media.images.shape == (G, 64, 64, 3) and media.images.dtype == np.uint8
    assert info.rollout_bytes == rollout.nbytes > 0
    # DanceGRPO: one initial noise for the whole group; members then diverge through the SDE noise
    assert all(np.array_equal(rollout.trajectory[0, 0], rollout.trajectory[i, 0]) for i in range(G))
    assert not np.array_equal(rollout.trajectory[0, -1], rollout.trajectory[1, -1])
    # another group (another seed) starts elsewhere; same seed reproduces exactly
    other, _, _ = worker.generate(PromptGroup(1, 0, "a lighthouse at dawn", G, seed=8, policy_version=0))
    assert not np.array_equal(other.trajectory[0, 0], rollout.trajectory[0, 0])
    again, _, _ = worker.generate(PromptGroup(2, 0, "a lighthouse at dawn", G, seed=7, policy_version=0))
    assert np.array_equal(again.trajectory, rollout.trajectory)


def test_fresh_noise_option_gives_each_member_its_own_start():
    worker = RolloutWorker(make_config("algorithm.shared_noise=false"))
    rollout, _, _ = worker.generate(PromptGroup(0, 0, "a cat", G, seed=7, policy_version=0))
    assert not np.array_equal(rollout.trajectory[0, 0], rollout.trajectory[1, 0])


def test_learner_recomputes_the_rollout_log_probs_exactly(worker_and_learner):
    """At the rollout's own weights every recomputed log-prob equals the recorded one: ratio exactly 1."""
    worker, learner = worker_and_learner
    load_weights(worker.model.transformer, learner.export_weights())
    rollout, _, _ = worker.generate(PromptGroup(3, 1, "a red sports car", G, seed=11, policy_version=worker.policy_version))
    model, sigmas = learner.model, as_tensor(rollout.sigmas)
    embeds = as_tensor(rollout.conditioning.prompt_embeds)[None]
    pooled = as_tensor(rollout.conditioning.pooled_prompt_embeds)[None]
    with torch.no_grad():
        for member in range(G):
            for j in range(len(rollout.sigmas) - 1):
                x = as_tensor(rollout.trajectory[member, j])[None]
                v = model.velocity(x, sigmas[j].reshape(1), ConditioningBatch(embeds, pooled))
                step = step_transition("dance_sde", 0.3, x, v, sigmas, j)
                log_prob = step.log_prob(as_tensor(rollout.trajectory[member, j + 1])[None])
                assert float(log_prob) == float(rollout.log_probs[member, j]), (member, j)
                assert float(torch.exp(log_prob - float(rollout.log_probs[member, j]))) == 1.0
    # and through the learner's update: the ratio before the first optimizer step is exactly 1
    advantages = group_advantages(np.array([[0.1, 0.4, 0.2, 0.3]]), 5.0)
    snapshot = copy.deepcopy(learner.model.transformer.state_dict())
    metrics = update(learner, train_group(rollout, advantages))
    assert metrics.first_ratio_max_abs_dev == 0.0
    assert metrics.extras["approx_kl"] == 0.0  # every term on-policy: r = 0 exactly
    assert metrics.optimizer_steps == 1 and metrics.samples == G
    changed = any(not torch.equal(snapshot[k], v) for k, v in learner.model.transformer.state_dict().items())
    assert changed, "the update must change the weights"


def test_batched_rollout_keeps_the_first_ratio_exactly_one(monkeypatch):
    """rollout.micro_batch_size 2: the learner recomputes each rollout micro-batch in one forward of the same two
    members (sharing their trained steps), so the first ratio stays 1 (recomputed at batch 1 it is ~1.2e-7 off)."""
    config = make_config("rollout.micro_batch_size=2")
    worker, learner = RolloutWorker(config), Learner(config)
    load_weights(worker.model.transformer, learner.export_weights())
    rollout, _, _ = worker.generate(PromptGroup(6, 1, "a lighthouse at dawn", G, seed=13, policy_version=worker.policy_version))
    sizes, velocity = [], learner.model.velocity
    monkeypatch.setattr(learner.model, "velocity", lambda x, *a, **k: sizes.append(len(x)) or velocity(x, *a, **k))
    metrics = update(learner, train_group(rollout, group_advantages(np.array([[0.1, 0.4, 0.2, 0.3]]), 5.0)))
    assert metrics.first_ratio_max_abs_dev <= 1e-6  # 0.0 on CPU here
    assert sizes == [2] * (G // 2 * config.trained_timesteps) and metrics.samples == G
    with pytest.raises(ValueError, match="micro_batch_size=3.*group_size=4 is not a multiple"):
        make_config("rollout.micro_batch_size=3")


def _sgd_delta(config, rollout, advantages, weights, seed=0):
    """Parameter change of one DanceGRPO update with plain SGD (linear in the gradient)."""
    learner = Learner(config)
    before = [p.detach().clone() for p in learner.parameters]
    learner.optimizer = torch.optim.SGD(learner.parameters, lr=1.0)
    learner.rng = np.random.default_rng(seed)
    update(learner, train_group(rollout, advantages, weights))
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(learner.parameters, before)])


def test_several_rewards_are_per_reward_advantages_with_weighted_losses(worker_and_learner):
    """L = sum_k w_k L_k: the update for two rewards is the weighted sum of the single-reward updates."""
    worker, _ = worker_and_learner
    config = make_config("optimizer.max_grad_norm=1e9", "rewards=[{name: a, kind: brightness}, {name: b, kind: jpeg_compressibility}]")
    fresh = RolloutWorker(config)
    rollout, _, _ = fresh.generate(PromptGroup(4, 2, "a bowl of fruit", G, seed=5, policy_version=0))
    a1 = group_advantages(np.array([[1.0, 2.0, 3.0, 4.0]]), 5.0)
    a2 = group_advantages(np.array([[4.0, 1.0, 1.0, 2.0]]), 5.0)
    both = _sgd_delta(config, rollout, np.concatenate([a1, a2]), (0.7, 1.4))
    first = _sgd_delta(config, rollout, a1, (1.0,))
    second = _sgd_delta(config, rollout, a2, (1.0,))
    assert both.abs().max() > 0
    torch.testing.assert_close(both, 0.7 * first + 1.4 * second, rtol=1e-4, atol=1e-5 * float(both.abs().max()))


def test_accumulation_and_best_of_n_counts(worker_and_learner):
    worker, _ = worker_and_learner
    config = make_config("algorithm.grad_accum_samples=3")
    learner = Learner(config)
    load_weights(worker.model.transformer, learner.export_weights())
    rollout, _, _ = worker.generate(PromptGroup(5, 3, "a city at night", G, seed=9, policy_version=worker.policy_version))
    advantages = group_advantages(np.array([[0.3, 0.1, 0.5, 0.2]]), 5.0)
    metrics = update(learner, *[train_group(rollout, advantages)] * 2)  # 8 samples, an optimizer step every 3 -> 3 steps
    assert (metrics.samples, metrics.optimizer_steps) == (8, 3)
    # later windows are off-policy: their ratios move away from 1, the first window's do not
    assert metrics.first_ratio_max_abs_dev == 0.0 and metrics.ratio_max_abs_dev > 0
    # k3 = mean(rho - 1 - log rho) over the terms: positive once off-policy, at most its value at the ratio furthest from 1
    d = metrics.ratio_max_abs_dev
    assert 0 < metrics.extras["approx_kl"] <= max(d - math.log1p(d), -d - math.log1p(-d))
    metrics = update(learner, train_group(rollout, advantages, members=np.array([2, 1])))
    assert metrics.samples == 2


def test_rollout_refuses_a_stale_policy_version(worker_and_learner):
    worker, _ = worker_and_learner
    with pytest.raises(RuntimeError, match="policy version 99"):
        worker.generate(PromptGroup(6, 0, "a cat", G, seed=1, policy_version=99))


@dataclasses.dataclass(frozen=True)
class FixedWindow:
    """An SdeWindow that always answers the same steps."""

    start: int
    stop: int

    def bounds(self, group: PromptGroup, num_steps: int) -> tuple[int, int]:
        return self.start, self.stop


def test_sde_window_records_only_its_steps_and_takes_euler_steps_elsewhere(worker_and_learner):
    """With ``RolloutSpec.sde_window`` (Flow-GRPO-Fast, MixGRPO) the worker records x and log-probs of the window's
    steps only; before it the group follows the deterministic Euler path, and the recorded log-probs are the window
    steps' densities of the recorded transitions."""
    worker, _ = worker_and_learner
    spec = worker.spec
    worker.spec = dataclasses.replace(spec, sde_window=FixedWindow(2, 4))
    try:
        rollout, _, _ = worker.generate(PromptGroup(5, 0, "a lighthouse at dawn", G, seed=3, policy_version=worker.policy_version))
    finally:
        worker.spec = spec
    assert rollout.window == rollout.sde_steps == (2, 4)
    assert rollout.trajectory.shape[:2] == (G, 3) and rollout.log_probs.shape == (G, 2)
    sigmas = as_tensor(rollout.sigmas)
    cond = ConditioningBatch.of(rollout.conditioning, G)
    with torch.no_grad():
        x = worker.model.initial_noise(torch.Generator().manual_seed(3), 1).float()  # the group's shared noise
        for i in range(2):  # the Euler prefix, identical for every member (batch 1, as the worker's forwards)
            x = x + (sigmas[i + 1] - sigmas[i]) * worker.model.velocity(x, sigmas[i].expand(1), cond.rows(slice(0, 1))).float()
        assert all(torch.equal(x[0], as_tensor(rollout.trajectory[m, 0])) for m in range(G))
        for m in range(G):
            for k in range(2):
                x = as_tensor(rollout.trajectory[m : m + 1, k])
                v = worker.model.velocity(x, sigmas[2 + k].expand(1), cond.rows(slice(0, 1)))
                step = step_transition("dance_sde", 0.3, x, v, sigmas, 2 + k)
                assert torch.equal(step.log_prob(as_tensor(rollout.trajectory[m : m + 1, k + 1])), as_tensor(rollout.log_probs[m : m + 1, k]))
    assert not np.array_equal(rollout.trajectory[0, -1], rollout.trajectory[1, -1])  # the SDE steps branch the members
    with pytest.raises(ValueError, match="trajectory shape"):
        dataclasses.replace(rollout, window=(1, 4))
    with pytest.raises(ValueError, match="not a non-empty range"):
        dataclasses.replace(rollout, window=(4, 4))
