"""DGPO, Direct Group Preference Optimization (Luo et al., arXiv 2510.08425, ICLR 2026).

Rollout (:func:`rollout_spec`): deterministic ODE sampling (DPM-Solver++(2M) on the flow-sigma grid
by default, or Euler), fresh initial noise per sample. A rollout carries only the final latents
and the conditioning once per group: no trajectory, no log-probs.

Objective (paper Eq. 17, velocity form of the released code). For a group g of G samples with
advantages A_i, one shared timestep sigma and one shared noise eps::

    x_t     = (1 - sigma) x0_i + sigma eps,        v* = eps - x0_i
    l_i     = mean_elements (v_theta(x_t) - v*)^2           (denoising loss of the policy)
    l_ref_i = mean_elements (v_ref(x_t)   - v*)^2           (of the reference, no gradient)
    S_g     = beta / G * sum_i A_i (l_i - l_ref_i)          (detached; summed over every rank holding g)
    L_DGPO  = -log sigmoid(-S_g)                            (the paper's loss)

The released code optimises a surrogate with the same gradient up to the positive factor beta
(d L_DGPO / d l_i = sigmoid(S_g) * beta/G * A_i)::

    L = mean_i sigmoid(S_g) * A_i * l_i  +  kl_beta * mean_i mean_elements (v_theta - v_base)^2

sigmoid(S_g) is a per-group gate: near 1 while the policy still ranks the group no better than
the reference, near 0 once it does. Additions of the released code (reference doc §1.6), each
switchable: the velocity-space KL against the frozen base, and a PPO-style clip on the denoising
loss: with ratio_i = exp(l_old_i - l_i) against the fast-EMA ("old") policy, l_i is detached when
A_i > 0 and ratio_i > 1 + eps, or A_i < 0 and ratio_i < 1 - eps (``clip_kl`` detaches the KL too).

Micro-batches (``micro_batch_size`` m below the group's G members; the learner's memory on video
models). Once the gate and the clip mask are fixed, the surrogate's gradient is a sum over members,
``sigmoid(S_g) / G * sum_i A_i grad l_i  (+ kl_beta / G * sum_i grad kl_i)``, so it splits over
micro-batches; but S_g needs every member's l_i before the first backward. A split group therefore
runs, at each sigma: (1) without gradients, one micro-batch per forward, l_ref_i, l_old_i, v_base and
the policy's own l_i for all G members, then the detached sigmoid(S_g) and clip mask; (2) per
micro-batch b a forward with gradients and one loss term (one backward) of ``sum_{i in b}
[sigmoid(S_g) A_i l_i + kl_beta kl_i] / M`` (l_i, kl_i detached where the clip mask says so; the
learner divides by the step's sample count). The micro-batches' gradients add up to the whole
group's, equal up to float rounding (the same per-member numbers, summed in another order), and the
loss normalisation and the single gradient sync per update (the learner's, on the last term) are
unchanged. The price is one more no-gradient forward of the
policy per member; a group trained whole (m >= G, or None) takes its l_i from its one forward.
Each shadow (reference, fast EMA, frozen base) is swapped in once per sigma for all of the rank's
groups: a swap rebinds every trainable parameter (FSDP: copies each shard in and back,
raygrpo/learner/ema.py), while the outputs it yields are latent-sized. Activations are held for
one micro-batch (2m rows with CFG in training).

Timesteps (the "timestep clip"): each update draws M = num_train_timesteps distinct indices from
{0..trunc_steps} of the rollout grid (the released code's truncated grid: 6 of 10 steps keeps sigma
above shift_3(0.3)), or, with ``trunc_steps: null``, M values t ~ U[t_min, 1] in unshifted time,
sigma = shift(t) (the paper). The same t serve every sample of the update and each group shares
one noise per t. One optimizer step per update, then the EMAs move:

* fast EMA, decay min(0.3, 0.001 k) after optimizer step k: the PPO clip's old policy, optionally
  the reference (``reference: fast_ema``, Mode 2b), and the sampling policy after
  ``switch_ema_ref`` steps;
* slow EMA, decay min((1 + k)/(10 + k), 0.9) every 8 steps: the weights of checkpoints/evaluation.

Reference: the frozen base, i.e. the network with its LoRA adapter disabled (no second copy), or
for full fine-tuning a frozen snapshot of the starting weights.

Deviations: several rewards are combined as sum_k w_k A_k of per-reward advantages (the reference
trains one reward at a time). Whole groups stay on one learner rank, so the gate's group sum is
local; ``group_gate_logit(process_group=...)`` covers groups spread over ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from raygrpo.algorithms.base import LossTerm, RolloutSpec, StepDraws, WindowGroup
from raygrpo.algorithms.forward_process import (
    GroupTensors,
    base_weights,
    frozen_snapshot,
    group_tensors,
    micro_batches,
    velocities,
    velocity,
)
from raygrpo.config import Config, DGPOConfig
from raygrpo.contracts import Rollout, as_tensor
from raygrpo.learner.ema import ParameterShadow, fast_ema_decay, slow_ema_decay
from raygrpo.sampling import shift_sigmas


def rollout_spec(config: Config) -> RolloutSpec:
    algo = config.algorithm
    return RolloutSpec(sampler=algo.sampler, noise_level=0.0, shared_noise=algo.shared_noise, record_trajectory=False)


def denoising_loss(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Velocity MSE per sample, mean over every non-batch element: ``[B, ...] -> [B]``."""
    return ((v.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def group_gate_logit(
    advantages: torch.Tensor,
    loss: torch.Tensor,
    loss_ref: torch.Tensor,
    beta: float,
    group_size: int | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """``S_g = beta / G * sum_i A_i (l_i - l_ref_i)``, detached; returns a scalar.

    Inputs are ``[G_local]``: this rank's members of the group. When a group is split over learner
    ranks, pass the whole ``group_size`` G and the ``process_group`` of the ranks holding it: the
    partial sums are all-reduced so every rank gates with the same S_g (released code, §1.4).
    """
    partial = (advantages * (loss.detach() - loss_ref.detach())).sum()
    if process_group is not None:
        torch.distributed.all_reduce(partial, group=process_group)
    return (beta / (group_size or advantages.numel())) * partial


def dgpo_exact_loss(advantages: torch.Tensor, loss: torch.Tensor, loss_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's ``-log sigmoid(-S_g)`` with gradients through ``loss`` (used to check the surrogate)."""
    s = (beta / advantages.numel()) * (advantages * (loss - loss_ref.detach())).sum()
    return -torch.nn.functional.logsigmoid(-s)


def dgpo_surrogate(advantages: torch.Tensor, loss: torch.Tensor, loss_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``mean_i sigmoid(S_g) A_i l_i`` with the gate detached: the released code's loss for one group."""
    gate = torch.sigmoid(group_gate_logit(advantages, loss, loss_ref, beta))
    return (gate * advantages * loss).mean()


def ppo_clip_mask(advantages: torch.Tensor, loss: torch.Tensor, loss_old: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Which samples lose their gradient: ratio = exp(l_old - l) outside the band on the advantage's side. ``[G]`` bool."""
    ratio = torch.exp(loss_old - loss.detach())
    return ((advantages > 0) & (ratio > 1 + clip_range)) | ((advantages < 0) & (ratio < 1 - clip_range))


def training_sigmas(
    algo: DGPOConfig, rollout_sigmas: torch.Tensor, shift: float, rng: np.random.Generator, trainable=None
) -> torch.Tensor:
    """The M noise levels of one update, shared by every sample (the timestep clip). ``[M]`` float32.

    ``trainable`` (``ModelAdapter.trainable_levels``; None: every level) restricts them to the levels the trained
    network owns (Wan 2.2's two experts, raygrpo/models/wan_experts.py): ``trunc_steps`` draws among the owned grid
    levels, the uniform draw is redrawn where it falls outside them (the uniform law conditioned on the owned
    levels). Every level owned: the draws are the unrestricted ones, the random stream unchanged."""
    if algo.trunc_steps is not None:
        candidates = np.arange(algo.trunc_steps + 1)
        if trainable is not None:
            candidates = candidates[trainable(rollout_sigmas[: algo.trunc_steps + 1]).cpu().numpy()]
            if len(candidates) < algo.num_train_timesteps:
                raise ValueError(
                    f"the trained expert owns {len(candidates)} of the first {algo.trunc_steps + 1} grid levels, fewer than "
                    f"num_train_timesteps={algo.num_train_timesteps}: raise trunc_steps or train the other expert (model.train_expert)"
                )
        indices = rng.choice(candidates, size=algo.num_train_timesteps, replace=False)
        return rollout_sigmas[torch.as_tensor(indices)].float()
    t = torch.as_tensor(rng.uniform(algo.t_min, 1.0, size=algo.num_train_timesteps), dtype=torch.float64)
    sigmas = shift_sigmas(t, shift).float()
    if trainable is None:
        return sigmas
    for _ in range(1000):
        outside = ~trainable(sigmas).cpu()
        if not outside.any():
            return sigmas
        t = torch.as_tensor(rng.uniform(algo.t_min, 1.0, size=int(outside.sum())), dtype=torch.float64)
        sigmas[outside] = shift_sigmas(t, shift).float()
    raise ValueError(f"t_min={algo.t_min} at shift {shift} leaves (almost) no noise level to the trained expert (model.train_expert)")


def no_grad_forwards(algo: DGPOConfig, members: int) -> int:
    """How many forwards without gradients each member of a group of ``members`` gets at each sigma, besides
    its policy forward with gradients, as :meth:`DGPO._reference_terms` and ``_group_terms`` run them: the
    reference; the fast EMA for the clip's l_old unless it is the reference; the frozen base for the KL
    unless it is the reference; and the policy itself when the group is split into micro-batches.
    (The resource planner counts FLOPs with it; tests/test_plan.py checks it against the forwards run.)"""
    old = (algo.clip_dsm or algo.clip_kl) and algo.reference != "fast_ema"
    base = algo.reference != "frozen" and algo.kl_beta != 0
    split = len(micro_batches(members, algo.micro_batch_size)) > 1
    return 1 + int(old) + int(base) + int(split)


class DGPO:
    """The learner half. ``setup`` creates the shadows (fast/slow EMA, frozen snapshot) once."""

    on_policy_ratio = False  # its ratios exp(l_old - l) compare with the fast EMA, not with the sampling policy

    def __init__(self, config: Config):
        self.config = config
        self.algo: DGPOConfig = config.algorithm
        self.spec = rollout_spec(config)
        self.optimizer_steps = 0

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        self.model, self.device = model, parameters[0].device
        self.fast_ema = ParameterShadow(parameters)
        self.slow_ema = ParameterShadow(parameters)
        self.frozen = frozen_snapshot(parameters, lora)  # None with LoRA: the base is the adapter switched off

    def _frozen_base(self) -> AbstractContextManager:
        return base_weights(self.model, self.frozen)

    def _reference(self) -> AbstractContextManager:
        return self.fast_ema.swapped() if self.algo.reference == "fast_ema" else self._frozen_base()

    def sampling_weights(self) -> AbstractContextManager:
        """The weights rollout samples with: the fast EMA once ``switch_ema_ref`` steps have passed."""
        return self.fast_ema.swapped() if self.optimizer_steps >= self.algo.switch_ema_ref else nullcontext()

    def evaluation_weights(self) -> AbstractContextManager:
        return self.slow_ema.swapped()

    def window_samples(self, world_size: int) -> None:
        return None  # one optimizer step per update: the whole step is one window

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """The update's M sigmas, then at each sigma one noise per group slot of the step, in order.

        One noise per group at each sigma, shared by its members (paper §3: variance reduction).
        ``per_group[k][t]`` is group k's ``[1, ...]`` noise at sigma t.
        """
        sigmas = training_sigmas(self.algo, as_tensor(example.sigmas), self.config.rollout.shift, rng, self.model.trainable_levels)  # [M]
        noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        shape = (1, *example.final_latents.shape[1:])
        at_sigma = [[torch.randn(shape, generator=noise_gen) for _ in range(total_groups)] for _ in range(len(sigmas))]
        per_group = [[at_sigma[t][k] for t in range(len(sigmas))] for k in range(total_groups)]
        return StepDraws(per_group, shared=sigmas, extras={"sigma_min": float(sigmas.min())})

    def loss_terms(self, policy, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """At each sigma, every group's terms (one per micro-batch), each shadow swapped in once per sigma."""
        device = self.device
        sigmas = draws.shared.to(device)  # [M]
        groups = [group_tensors(wg, device) for wg in window]
        for t_index, sigma in enumerate(sigmas):
            noise = [wg.draw[t_index].to(device).expand_as(g.x0) for wg, g in zip(window, groups)]
            x_t = [(1 - sigma) * g.x0 + sigma * eps for g, eps in zip(groups, noise)]  # each [G, ...]
            targets = [eps - g.x0 for g, eps in zip(groups, noise)]  # each [G, ...] v* = eps - x0
            references = self._reference_terms(groups, x_t, targets, sigma)
            for k, (wg, group) in enumerate(zip(window, groups)):
                last = t_index == len(sigmas) - 1 and k == len(groups) - 1
                yield from self._group_terms(group, wg.slot, x_t[k], targets[k], sigma, *references[k], len(sigmas), last)

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        k, algo = self.optimizer_steps, self.algo
        self.fast_ema.update(fast_ema_decay(k, algo.fast_ema_max_decay, algo.fast_ema_decay_rate))
        if k % algo.slow_ema_every == 0:
            self.slow_ema.update(slow_ema_decay(k, algo.slow_ema_decay))

    def _reference_terms(
        self, groups: list[GroupTensors], x_t: list[torch.Tensor], targets: list[torch.Tensor], sigma: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Per group ``(l_ref [G], l_old [G] or None, v_base [G, ...])``, each shadow swapped in once for every group."""
        algo = self.algo
        refs = self._evaluate(self._reference(), groups, x_t, targets, sigma)
        if not (algo.clip_dsm or algo.clip_kl):
            olds = [None] * len(groups)
        elif algo.reference == "fast_ema":
            olds = [loss for loss, _ in refs]  # the old policy of the clip is the reference itself: one evaluation
        else:
            olds = [loss for loss, _ in self._evaluate(self.fast_ema.swapped(), groups, x_t, targets, sigma)]
        if algo.reference == "frozen" or algo.kl_beta == 0:
            bases = [v for _, v in refs]
        else:
            bases = [v for _, v in self._evaluate(self._frozen_base(), groups, x_t, targets, sigma)]
        return [(loss_ref, loss_old, v_base) for (loss_ref, _), loss_old, v_base in zip(refs, olds, bases)]

    def _group_terms(
        self,
        group: GroupTensors,
        slot: int,
        x_t: torch.Tensor,
        target: torch.Tensor,
        sigma: torch.Tensor,
        loss_ref: torch.Tensor,
        loss_old: torch.Tensor | None,
        v_base: torch.Tensor,
        n_sigmas: int,
        last: bool,
    ) -> Iterator[LossTerm]:
        """One group at one sigma, given its reference terms: the detached gate and clip mask, then a term per
        micro-batch, ``sum_{i in b} [sigmoid(S_g) A_i l_i + kl_beta kl_i] / M`` (l_i, kl_i detached where clipped).

        ``last``: this group is the update's last at its last sigma, so its last term is the window's final one.
        """
        algo = self.algo
        slices = micro_batches(len(group.x0), algo.micro_batch_size)
        needs_old = loss_old is not None
        # The gate needs every member's l_i before any backward: a group trained in one forward gets them from
        # that forward; a split group from a no-gradient pass of the policy first (module docstring).
        whole = self._policy(group, x_t, target, sigma, slices[0]) if len(slices) == 1 else None
        loss = whole[1].detach() if whole is not None else self._evaluate(nullcontext(), [group], [x_t], [target], sigma)[0][0]
        gate = torch.sigmoid(group_gate_logit(group.advantages, loss, loss_ref, algo.beta))
        clipped = torch.zeros_like(loss, dtype=torch.bool)  # [G]
        if needs_old:
            clipped = ppo_clip_mask(group.advantages, loss, loss_old, algo.clip_range)
        ratios = torch.exp(loss_old - loss) if needs_old else None  # [G]
        for j, rows in enumerate(slices):
            v, loss_b = whole if whole is not None else self._policy(group, x_t, target, sigma, rows)  # [b, ...], [b]
            used = torch.where(clipped[rows], loss_b.detach(), loss_b) if algo.clip_dsm else loss_b
            kl = ((v - v_base[rows]) ** 2).flatten(1).mean(dim=1)  # [b]
            if algo.clip_kl:
                kl = torch.where(clipped[rows], kl.detach(), kl)
            yield LossTerm(
                loss=((gate * group.advantages[rows] * used).sum() + algo.kl_beta * kl.sum()) / n_sigmas,
                slot=slot,
                final=last and j == len(slices) - 1,
                ratios=ratios[rows] if ratios is not None else None,
                clipped=clipped[rows],
                extras={"gate_mean": gate, "kl": kl.detach().mean()},
            )

    def _evaluate(
        self,
        weights: AbstractContextManager,
        groups: list[GroupTensors],
        x_t: list[torch.Tensor],
        targets: list[torch.Tensor],
        sigma: torch.Tensor,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group ``(l [G], v [G, ...])`` under ``weights`` (swapped in once) without gradients, a micro-batch per forward."""
        sigmas = [sigma.expand(len(g.x0)) for g in groups]  # [G] each
        vs = velocities(self.model, weights, groups, x_t, sigmas, self.algo.micro_batch_size)
        return [(denoising_loss(v, target), v) for v, target in zip(vs, targets)]

    def _policy(self, group: GroupTensors, x_t: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, rows: slice):
        """``(v [b, ...], l [b])`` of the trained weights on micro-batch ``rows``, with gradients."""
        v = velocity(self.model, group, x_t, sigma.expand(len(x_t)), rows)
        return v, denoising_loss(v, target[rows])
