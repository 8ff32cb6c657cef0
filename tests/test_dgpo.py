"""DGPO: the surrogate against the paper's loss and Diffusion-DPO, the gate, shared (t, noise), the timestep
clip, the reference (LoRA disabled, not a copy), the EMAs, and what a DGPO rollout carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raygrpo.algorithms.advantages import group_advantages
from raygrpo.algorithms.dgpo import (
    dgpo_exact_loss,
    dgpo_surrogate,
    group_gate_logit,
    ppo_clip_mask,
    training_sigmas,
)
from raygrpo.config import load_config
from raygrpo.contracts import ConditioningBatch, PromptGroup, TrainGroup
from raygrpo.learner.ema import fast_ema_decay, slow_ema_decay
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch
from raygrpo.rollout.worker import RolloutWorker
from raygrpo.sampling import dpm_flow_sigmas, shift_sigmas
from raygrpo.weights import load_weights

from .conftest import ROOT
from .spawned import split_group_gate
from .two_ranks import RankJob

G = 4


def dgpo_config(*overrides: str):
    base = [f"algorithm.group_size={G}", "model.max_sequence_length=16", "rollout.micro_batch_size=4"]
    return load_config(ROOT / "cluster" / "tiny_dgpo.yaml", [*base, *overrides])


# ----- the loss as functions of per-sample denoising losses -----


def test_surrogate_gradient_is_the_exact_loss_gradient_times_a_positive_factor():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        adv = torch.randn(6, generator=gen)
        loss_ref = torch.rand(6, generator=gen)
        loss = torch.rand(6, generator=gen).requires_grad_(True)
        exact_grad = torch.autograd.grad(dgpo_exact_loss(adv, loss, loss_ref, beta=7.0), loss)[0]
        surrogate_grad = torch.autograd.grad(dgpo_surrogate(adv, loss, loss_ref, beta=7.0), loss)[0]
        # d(-log sigmoid(-S))/dl_i = sigmoid(S) beta/G A_i ; d(surrogate)/dl_i = sigmoid(S) A_i / G
        torch.testing.assert_close(exact_grad, 7.0 * surrogate_grad)
        assert torch.dot(exact_grad, surrogate_grad) > 0


def test_with_two_samples_and_equal_weights_the_loss_is_diffusion_dpo():
    """Wallace et al. 2023: -log sigmoid(-b [(l_w - l_ref_w) - (l_l - l_ref_l)]); DGPO with A = (+1, -1) and b = beta/2."""
    gen = torch.Generator().manual_seed(1)
    beta = 5.0
    for _ in range(5):
        l_w, l_l, r_w, r_l = torch.rand(4, generator=gen).unbind()
        diffusion_dpo = -torch.nn.functional.logsigmoid(-(beta / 2) * ((l_w - r_w) - (l_l - r_l)))
        dgpo = dgpo_exact_loss(torch.tensor([1.0, -1.0]), torch.stack([l_w, l_l]), torch.stack([r_w, r_l]), beta)
        torch.testing.assert_close(dgpo, diffusion_dpo)
    # normalised advantages of two different rewards are +-1 (population std), so the equality is the real setting
    advantages = group_advantages(np.array([[0.9, 0.2]]), adv_clip_max=5.0, eps=0.0, ddof=0)
    assert advantages.tolist() == [[1.0, -1.0]]


def test_no_gradient_flows_through_the_gate():
    adv = torch.tensor([1.0, -0.5, -0.5])
    loss = torch.tensor([0.3, 0.2, 0.4], requires_grad=True)
    loss_ref = torch.tensor([0.25, 0.3, 0.1], requires_grad=True)
    s = group_gate_logit(adv, loss, loss_ref, beta=10.0)
    assert not s.requires_grad
    dgpo_surrogate(adv, loss, loss_ref, beta=10.0).backward()
    expected = torch.sigmoid(s) * adv / 3  # the gate is a constant factor
    torch.testing.assert_close(loss.grad, expected)
    assert loss_ref.grad is None


def test_ppo_clip_detaches_only_on_the_advantage_side():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0])
    loss = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
    loss_old = torch.tensor([0.7, 0.3, 0.3, 0.7, 0.505])  # ratio = exp(l_old - l)
    assert ppo_clip_mask(adv, loss, loss_old, clip_range=0.01).tolist() == [True, False, True, False, False]


# ----- timesteps -----


def test_timestep_clip_on_the_truncated_grid_and_in_unshifted_time():
    algo = dgpo_config().algorithm
    grid = dpm_flow_sigmas(10, 3.0)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(100):
        sigmas = training_sigmas(algo, grid, 3.0, rng)
        assert len(sigmas) == 4 and len(set(sigmas.tolist())) == 4  # M distinct steps
        assert all(s in grid[:7].tolist() for s in sigmas.tolist())
        seen.update(sigmas.tolist())
    assert min(seen) >= float(shift_sigmas(torch.tensor(0.3), 3.0)) and len(seen) == 7  # t_min = 0.3 unshifted
    paper = dgpo_config("algorithm.trunc_steps=null", "algorithm.t_min=0.4").algorithm
    draws = torch.cat([training_sigmas(paper, grid, 3.0, rng) for _ in range(200)])
    assert float(draws.min()) >= float(shift_sigmas(torch.tensor(0.4), 3.0)) and float(draws.max()) <= 1.0


# ----- on the real tiny FLUX -----


@pytest.fixture(scope="module")
def dgpo_pair():
    torch.set_num_threads(1)
    config = dgpo_config()
    return config, RolloutWorker(config), Learner(config)


def rollout_and_group(worker, group_id=0, seed=3, rewards=(0.1, 0.5, 0.2, 0.9)):
    rollout, media, _ = worker.generate(PromptGroup(group_id, 0, "a lighthouse at dawn", G, seed, worker.policy_version))
    advantages = group_advantages(np.array([rewards]), 5.0, 1e-4, 0)
    return rollout, TrainGroup(rollout, group_id, advantages, np.array([1.0], np.float32), np.arange(G))


def test_a_dgpo_rollout_carries_final_latents_only(dgpo_pair):
    config, worker, _ = dgpo_pair
    rollout, _ = rollout_and_group(worker)
    assert rollout.trajectory is None and rollout.log_probs is None
    assert rollout.final_latents.shape[0] == G and not np.array_equal(rollout.final_latents[0], rollout.final_latents[1])
    grpo = RolloutWorker(load_config(ROOT / "cluster" / "tiny.yaml", [f"algorithm.group_size={G}", "rollout.num_steps=10", "model.max_sequence_length=16"]))
    grpo_rollout, _, _ = grpo.generate(PromptGroup(0, 0, "a lighthouse at dawn", G, 3, 0))
    # A GRPO sample carries T+1 latents plus log-probs; DGPO one latent (conditioning once per group in both).
    assert grpo_rollout.nbytes > 8 * rollout.nbytes


def test_every_group_shares_one_noise_and_the_update_shares_its_timesteps(dgpo_pair, monkeypatch):
    config, worker, learner = dgpo_pair
    batch = [rollout_and_group(worker, k, seed=10 + k) for k in range(2)]
    calls = []
    original = learner.model.velocity

    def recording(latents, sigmas, *args, **kwargs):
        calls.append((latents.detach().clone(), sigmas.detach().clone()))
        return original(latents, sigmas, *args, **kwargs)

    monkeypatch.setattr(learner.model, "velocity", recording)
    learner.update(RankBatch.whole([g for _, g in batch]))
    sigmas_used = set()
    for latents, sigmas in calls:
        assert len(set(sigmas.tolist())) == 1  # one t for every member of the forward
        sigmas_used.add(round(float(sigmas[0]), 6))
    assert len(sigmas_used) == 4  # M shared timesteps for the whole update, both groups
    # the noise: x_t - (1 - sigma) x0 = sigma * eps must be the same tensor for every member of a group
    for latents, sigmas in calls:
        sigma = float(sigmas[0])
        for rollout, _ in batch:
            x0 = torch.as_tensor(rollout.final_latents)
            eps = (latents - (1 - sigma) * x0) / sigma
            if torch.allclose(eps[0], eps[1], atol=1e-5):
                assert all(torch.allclose(eps[0], eps[i], atol=1e-5) for i in range(G))
                break
        else:
            pytest.fail("a forward whose members do not share one noise")


def test_lora_reference_is_the_base_with_the_adapter_off_and_sync_is_lora_only():
    torch.set_num_threads(1)
    config = dgpo_config("model.lora={rank: 4, alpha: 8}", "algorithm.reference=frozen", "optimizer.lr=0.05")
    worker, learner = RolloutWorker(config), Learner(config)
    assert learner.algorithm.frozen is None  # no copy of the network
    assert all("lora" in n for n in learner.synced_names) and learner.synced_names
    x = torch.randn(2, *learner.model.latent_shape)
    embeds, pooled = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        base_before = learner.model.velocity(x, torch.tensor([0.7, 0.7]), ConditioningBatch(embeds, pooled))
    for step in range(2):
        rollout, group = rollout_and_group(worker, step, seed=step)
        learner.update(RankBatch.whole([group]))
        message = learner.export_weights()
        assert message.partial and set(message.arrays) == learner.synced_names
        load_weights(worker.model.transformer, message)
    with torch.no_grad():
        trained = learner.model.velocity(x, torch.tensor([0.7, 0.7]), ConditioningBatch(embeds, pooled))
        with learner.algorithm._frozen_base():
            base_after = learner.model.velocity(x, torch.tensor([0.7, 0.7]), ConditioningBatch(embeds, pooled))
        on_worker = worker.model.velocity(x, torch.tensor([0.7, 0.7]), ConditioningBatch(embeds, pooled))
    assert not torch.allclose(trained, base_before)  # the adapter learned something
    torch.testing.assert_close(base_after, base_before)  # the reference is the untouched base
    torch.testing.assert_close(on_worker, trained)  # LoRA-only sync reproduces the policy on the rollout side


def test_ema_schedules_and_which_weights_go_where(dgpo_pair):
    assert [fast_ema_decay(k, 0.3, 0.001) for k in (0, 100, 300, 1000)] == [0.0, 0.1, 0.3, 0.3]
    assert slow_ema_decay(0, 0.9) == pytest.approx(0.1) and slow_ema_decay(1000, 0.9) == 0.9
    config = dgpo_config("algorithm.switch_ema_ref=1", "algorithm.slow_ema_every=1", "optimizer.lr=0.05")
    worker, learner = RolloutWorker(config), Learner(config)
    start = [p.detach().clone() for p in learner.parameters]
    for step in range(3):
        rollout, group = rollout_and_group(worker, step, seed=step)
        learner.update(RankBatch.whole([group]))
    live = [p.detach().clone() for p in learner.parameters]
    exported = learner.export_weights()
    fast = learner.algorithm.fast_ema.values
    names = [n for n, p in learner.model.transformer.named_parameters() if p.requires_grad]
    # after the switch step rollout receives the fast EMA, not the live weights; the live weights are restored
    assert any(not torch.equal(torch.from_numpy(exported.arrays[n]), l) for n, l in zip(names, live))
    assert all(torch.equal(torch.from_numpy(exported.arrays[n]), f) for n, f in zip(names, fast))
    assert all(torch.equal(p.detach(), l) for p, l in zip(learner.parameters, live))
    # the slow EMA moved from the start but lags the live weights
    slow = learner.algorithm.slow_ema.values
    assert any(not torch.equal(s, s0) for s, s0 in zip(slow, start))
    assert any(not torch.equal(s, l) for s, l in zip(slow, live))


def test_sd3_rolls_out_with_cfg_and_trains_without(monkeypatch):
    """DGPO Mode 1: the rollout forward carries the conditional and unconditional batch, the learner's only the conditional."""
    torch.set_num_threads(1)
    config = dgpo_config("model.family=sd3", "model.guidance_scale=4.5", "model.train_guidance_scale=1.0", "model.max_sequence_length=16")
    worker, learner = RolloutWorker(config), Learner(config)
    assert (worker.model.guidance_scale, learner.model.guidance_scale) == (4.5, 1.0)
    batch_sizes = {"rollout": [], "learner": []}
    for role, model in (("rollout", worker.model), ("learner", learner.model)):
        forward = model.transformer.forward

        def recording(*args, _role=role, _forward=forward, **kwargs):
            batch_sizes[_role].append(kwargs["hidden_states"].shape[0])
            return _forward(*args, **kwargs)

        monkeypatch.setattr(model.transformer, "forward", recording)
    rollout, group = rollout_and_group(worker)
    assert rollout.final_latents.shape == (G, 16, 8, 8)  # SD3 latents are unpacked [C, h, w]
    metrics = learner.update(RankBatch.whole([group]))
    assert set(batch_sizes["rollout"]) == {2 * G}  # CFG: [uncond; cond] in one forward
    assert set(batch_sizes["learner"]) == {G}  # no CFG in training
    assert np.isfinite(metrics.loss) and metrics.samples == G


GATE_VALUES = torch.rand(3, 6, generator=torch.Generator().manual_seed(0))  # rows: A, l, l_ref; 6 members


def rank_jobs() -> dict[str, RankJob]:
    """This module's job of the session's 2-rank processes (tests/two_ranks.py): a group's gate split over the ranks."""
    return {"dgpo.split_group_gate": RankJob(split_group_gate, (GATE_VALUES,))}


def test_the_gate_of_a_group_split_over_two_ranks_is_the_whole_groups(two_ranks):
    """Two gloo processes, each with half of a group, gate with exactly the S_g of the whole group."""
    whole = float(group_gate_logit(GATE_VALUES[0], GATE_VALUES[1], GATE_VALUES[2], beta=3.0))
    assert two_ranks["dgpo.split_group_gate"] == pytest.approx([whole, whole], rel=1e-6)


# ----- micro-batches -----


def _state(learner: Learner) -> list[torch.Tensor]:
    """Every tensor an update reads or moves: parameters, the shadows (fast/slow EMA, frozen snapshot)."""
    algo = learner.algorithm
    return [*learner.parameters, *algo.fast_ema.values, *algo.slow_ema.values, *(algo.frozen.values if algo.frozen else [])]


class _GradientRecorder:
    """An optimizer that only keeps the gradient it is asked to step with."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters, self.grads = parameters, []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters:
            p.grad = None

    def step(self) -> None:
        self.grads = [p.grad.clone() for p in self.parameters]


# Each clip_range lies between two members' |ratio - 1| (about 1e-5 apart) of the compared update: a member
# right at the band's edge would flip its clip decision with float rounding.
@pytest.mark.parametrize(
    "overrides",
    [["algorithm.clip_range=3e-4"], ["model.lora={rank: 4, alpha: 8}", "algorithm.reference=frozen", "algorithm.clip_range=1.28e-4"]],
    ids=["full-fast-ema-reference", "lora-frozen-reference"],
)
def test_micro_batches_give_the_whole_group_gradient(dgpo_pair, monkeypatch, overrides):
    """micro_batch_size 1 and 2 of G = 4 against whole groups, from one state after a first update (so the
    gate is away from 1/2 and the clip acts): the same gradient (the parameter update of SGD) and metrics.

    Run in float64 the gradients agree to 3e-16 of the largest element; in float32 they differ by up to
    ~5e-6 of it (a member's forward rounds differently at another batch size, and the advantage-weighted
    sum cancels). A gate or a normalisation that were wrong for a split group would be off by 1e-3 or more.
    """
    _, worker, _ = dgpo_pair
    rollouts = [rollout_and_group(worker, k, seed=30 + k, rewards=tuple(np.random.default_rng(k).normal(size=G))) for k in range(2)]
    batch = RankBatch.whole([group for _, group in rollouts])
    # A fast EMA that lags the policy by 30% after one step: the clip's old policy and the reference differ from it.
    learner = Learner(dgpo_config("algorithm.fast_ema_decay_rate=0.3", *overrides))
    algorithm, recorder = learner.algorithm, _GradientRecorder(learner.parameters)
    learner.optimizer = torch.optim.SGD(learner.parameters, lr=1.0)
    learner.update(batch)
    learner.optimizer = recorder
    start = [t.detach().clone() for t in _state(learner)]
    velocity = learner.model.velocity
    results = {}
    for size in (None, 1, 2):
        with torch.no_grad():  # the shadows moved after the last comparison's step
            for tensor, value in zip(_state(learner), start):
                tensor.copy_(value)
        algorithm.optimizer_steps = 1
        algorithm.algo = learner.config.algorithm.model_copy(update={"micro_batch_size": size})
        rows = []
        monkeypatch.setattr(learner.model, "velocity", lambda x, *a, **k: rows.append(len(x)) or velocity(x, *a, **k))
        learner.rng = np.random.default_rng(1)
        metrics = learner.update(batch)
        assert set(rows) == {size or G}  # every forward, with or without gradients, is one micro-batch
        results[size] = metrics, recorder.grads
    whole, whole_grads = results[None]
    assert 0 < whole.clip_fraction < 1 and abs(whole.extras["gate_mean"] - 0.5) > 1e-4
    scale = max(float(g.abs().max()) for g in whole_grads)
    for size in (1, 2):
        metrics, grads = results[size]
        assert max(float((g - g0).abs().max()) for g, g0 in zip(grads, whole_grads)) < 2e-5 * scale
        assert metrics.clip_fraction == whole.clip_fraction and metrics.samples == whole.samples
        for key in ("loss", "grad_norm", "ratio_mean"):
            assert getattr(metrics, key) == pytest.approx(getattr(whole, key), rel=1e-5, abs=1e-7)
        assert metrics.extras == pytest.approx(whole.extras, rel=1e-5, abs=1e-7)
