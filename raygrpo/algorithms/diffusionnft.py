"""DiffusionNFT, Diffusion Negative-aware FineTuning (Zheng, Chen et al., arXiv 2509.16117, ICLR 2026).

Sources: the paper (§3, Algorithm 1) and the released code, NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` and
``config/nft.py`` / ``config/base.py`` (read for facts; reference doc dgpo-and-related.md §6). Where the two differ
the code is followed, as for DGPO.

Rollout (:func:`rollout_spec`): any deterministic sampler of the "old" policy v_old (the released code: a 10-step
second-order DPM solver, here ``dpmpp_2m`` or ``euler``), fresh initial noise per sample, CFG-free. Only the final
latents x0 and the conditioning (once per group) travel: no trajectory, no log-probs. CFG-free per family and
variant: SD3/SD/Wan/Qwen-Image and FLUX.2 [klein] base sample and train at ``model.guidance_scale`` 1.0 (one
conditional forward; the config refuses anything else, since the loss's v_old must be the velocity that sampled,
and the learner asks the loaded adapter again: ``ModelConfig.guidance_kind``); FLUX.1-dev, HunyuanVideo and FLUX.2
[dev] are guidance-distilled (one forward embedding the guidance value), so they keep their value in both.

Reward mapping. Advantages are group-normalised as DGPO's (per-prompt mean; std over the step with
``global_std``, the released default; population std + 1e-4), A = sum_k w_k A_k, then::

    r = clip( clip(A, -A_max, A_max) / (2 A_max) + 0.5, 0, 1 )          A_max = adv_clip_max = 5

r is the probability that a sample is "positive": 1 at A = A_max, 1/2 at the group mean, 0 at -A_max.

Loss (the paper's §3 objective over the implicit policies, with the released code's x0-space adaptive
weights). For each trained sample, at each of its noise levels t (below), with eps ~ N(0, I) drawn for
that sample and t::

    x_t  = (1 - t) x0 + t eps
    v+   = beta v_theta(x_t) + (1 - beta) sg(v_old(x_t))             (implicit positive policy)
    v-   = (1 + beta) sg(v_old(x_t)) - beta v_theta(x_t)             (implicit negative policy)
    x0+- = x_t - t v+-                                               (their clean predictions)
    l+-  = mean_elements (x0+- - x0)^2 / w+-,   w+- = sg(max(mean_elements |x0+- - x0|, 1e-5))
    L    = A_max / beta * [ r l+ + (1 - r) l- ]  +  kl_beta * mean_elements (v_theta - sg(v_ref))^2

averaged over samples and their noise levels (each LossTerm: its samples' sum divided by the levels per
sample; the learner divides by the samples). The self-normalising weights w make the loss scale-free in
t; A_max / beta is the code's constant (it keeps the gradient's size independent of beta at
initialisation). v_ref is the frozen base: the network with its LoRA adapter disabled, or for full
fine-tuning a frozen snapshot of the start (the released code supports LoRA only); kl_beta = 1e-4.

No importance ratio (``on_policy_ratio = False``, LossTerm.ratios None). Instead, at initialisation
(v_theta = v_old) v+ = v- = v_theta, x0+- = x_t - t v_theta and w+ = w-, so (with x0_hat = x_t - t v_theta, D
elements, r unclipped)::

    L = A_max / beta * mean (x0_hat - x0)^2 / w,    dL/dv_theta = -2 t A (x0_hat - x0) / (D w)

advantage-weighted flow matching whose gradient does not depend on beta (tests/test_diffusionnft.py): a
sample above its group's mean pulls v_theta toward its own flow target, one below pushes it away.

Noise levels: each sample trains on int(T * timestep_fraction) distinct levels of the T-level rollout grid
(sigmas[0..T-1]; 0.99 of 10: 9 levels), its own random choice, as the released code's per-sample
permutation of the scheduler's timesteps (t = timestep / 1000 = sigma); noise i.i.d. per sample and
level. Defaults (``config/nft.py``, SD3.5-M PickScore / GenEval): beta 1.0 (0.1 for OCR and the
multi-reward recipe), kl_beta 1e-4, G = 24, 48 groups per update, lr 3e-4, LoRA r 32 / alpha 64.

Policies, one update = optimizer_steps_per_update optimizer steps (released ``gradient_step_per_epoch``: 1,
OCR 2), each on an equal share of the update's samples:

* "old" (v_old, the sampling policy, :meth:`DiffusionNFT.sampling_weights`): starts as theta; after the
  update's last optimizer step k, theta_old <- d theta_old + (1 - d) theta with d = min(old_ema_max_decay,
  old_ema_decay_rate * max(0, k - old_ema_delay)) (released ``decay_type`` 1: min(0.001 k, 0.5); OCR's
  type 2: 0 for 75 steps, then min(0.0075 (k - 75), 0.999));
* evaluation EMA (checkpoints, evaluation): decay min((1 + k)/(10 + k), 0.9) after every optimizer step.

Deviations: several rewards are combined as sum_k w_k A_k of per-reward advantages (``scoring.combine:
per_reward``) or, as the released ``multi_score``, normalised once as a weighted sum (``weighted_sum``).
The old policy is a shadow of the trained parameters swapped in (for LoRA: the adapter's values) rather
than a second peft adapter; the same values. With optimizer_steps_per_update > 1 each step trains on
consecutive groups of the update (the learner's windows), where the released code shuffles samples over
prompts first. The noise levels are this rollout grid's (DPM-Solver++ on the shifted flow sigmas: 0.9997
.. 0.25 at 10 steps, shift 3); the released solver's grid runs from 1.0 to about 0.009. Noise comes from
a per-group seed of the update's draws, so every learner rank and any micro-batching see the same noise.
With ``train.max_staleness`` >= 1 a sample may come from an older old policy than the v_old it trains
against; the loss needs no likelihood of the sampler, so nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

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
from raygrpo.config import Config, DiffusionNFTConfig
from raygrpo.contracts import Rollout, as_tensor
from raygrpo.learner.ema import ParameterShadow, fast_ema_decay, slow_ema_decay

WEIGHT_FLOOR = 1e-5  # the released code's lower clip of the adaptive weights w


def rollout_spec(config: Config) -> RolloutSpec:
    algo = config.algorithm
    return RolloutSpec(sampler=algo.sampler, noise_level=0.0, shared_noise=algo.shared_noise, record_trajectory=False)


def reward_weight(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """``r = clip(clip(A, -A_max, A_max) / (2 A_max) + 0.5, 0, 1)``: the probability each sample is positive. ``[B]``."""
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / (2 * adv_clip_max) + 0.5).clamp(0.0, 1.0)


def adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``mean (x0_pred - x0)^2 / sg(max(mean |x0_pred - x0|, 1e-5))`` per sample: ``[B, ...] -> [B]``.

    The weight is computed in float64 and detached, as the released code's."""
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().flatten(1).mean(dim=1).clamp(min=WEIGHT_FLOOR)  # [B]
    return ((x0_pred - x0) ** 2).flatten(1).mean(dim=1) / weight.to(x0_pred.dtype)


def nft_policy_loss(
    v: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adv_clip_max: float,
) -> torch.Tensor:
    """``A_max / beta * [r l+ + (1 - r) l-]`` per sample (module docstring), gradients through ``v`` only. ``[B]``.

    ``v``, ``v_old``, ``x_t``, ``x0``: ``[B, ...]``; ``t`` (noise levels) and ``r`` (reward weights): ``[B]``."""
    v, v_old = v.float(), v_old.detach().float()  # a bfloat16 forward's output: the loss in float32
    column = _column(t, x0)  # [B, 1, ...]
    positive = beta * v + (1 - beta) * v_old  # [B, ...] v+
    negative = (1 + beta) * v_old - beta * v  # [B, ...] v-
    loss_pos = adaptive_x0_loss(x_t - column * positive, x0)  # [B]
    loss_neg = adaptive_x0_loss(x_t - column * negative, x0)  # [B]
    return adv_clip_max / beta * (r * loss_pos + (1 - r) * loss_neg)


def no_grad_forwards(algo: DiffusionNFTConfig) -> int:
    """Forwards without gradients per trained row and noise level, besides the policy's forward with gradients, as
    :meth:`DiffusionNFT.loss_terms` runs them: the old policy's, and the reference's unless kl_beta is 0.
    (The resource planner counts FLOPs with it.)"""
    return 1 + int(algo.kl_beta != 0)


@dataclass
class NFTDraw:
    """One group's draws of an update."""

    levels: np.ndarray  # [members, M] int64: each member's M distinct indices into the rollout grid sigmas[0..T-1]
    noise_seed: int  # seeds the group's noise: at each level j, one [members, ...] draw


class DiffusionNFT:
    """The learner half. ``setup`` creates the shadows (old policy, evaluation EMA, frozen snapshot) once."""

    on_policy_ratio = False  # no importance ratio: the loss compares velocities on the forward process

    def __init__(self, config: Config):
        self.config = config
        self.algo: DiffusionNFTConfig = config.algorithm
        self.spec = rollout_spec(config)
        self.optimizer_steps = 0

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        # The config could not read the variant of a FLUX.2 hub id not downloaded yet; the loaded adapter knows it.
        self.algo.check_cfg_free(self.config.model, model.guidance)
        self.model, self.device = model, parameters[0].device
        self.old = ParameterShadow(parameters)  # theta_old = theta at the start (released code: copied before epoch 0)
        self.ema = ParameterShadow(parameters)
        # The frozen base is only the KL's: without it no snapshot is kept (full fine-tuning: a whole copy).
        self.frozen = frozen_snapshot(parameters, lora) if self.algo.kl_beta else None

    def sampling_weights(self) -> AbstractContextManager:
        """Rollout always samples with the old policy."""
        return self.old.swapped()

    def evaluation_weights(self) -> AbstractContextManager:
        return self.ema.swapped()

    def window_samples(self, world_size: int) -> int | None:
        """An equal share of the rank's samples per optimizer step; None (one window) for one step per update."""
        algo = self.algo
        if algo.optimizer_steps_per_update == 1:
            return None
        per_rank = algo.groups_per_step // world_size * (algo.best_of_n or algo.group_size)
        return per_rank // algo.optimizer_steps_per_update

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """Per group slot of the step, in order: each member's M distinct grid levels, and a noise seed."""
        levels = len(example.sigmas) - 1  # T: the grid's noise levels above 0
        m = self.algo.trained_step_count(levels)
        chosen = np.argsort(rng.random((total_groups, members, levels)), axis=-1)[..., :m]  # [groups, members, M]
        seeds = rng.integers(2**62, size=total_groups)
        return StepDraws([NFTDraw(chosen[k], int(seeds[k])) for k in range(total_groups)])

    def loss_terms(self, policy, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """At each of the M levels, every group's terms (one per micro-batch); the old policy and the reference are
        each swapped in once per level for all groups of the window."""
        device, algo = self.device, self.algo
        groups = [group_tensors(wg, device) for wg in window]
        # Each row's M noise levels: its draw's indices into the rollout grid.
        grids = [as_tensor(wg.rollout.sigmas, device, torch.float32) for wg in window]  # [T+1] each
        t_all = [grid[torch.as_tensor(wg.draw.levels[wg.rows])] for grid, wg in zip(grids, window)]  # [n, M] each
        rewards = [reward_weight(g.advantages, algo.adv_clip_max) for g in groups]  # [n] each
        generators = [torch.Generator().manual_seed(wg.draw.noise_seed) for wg in window]
        levels = t_all[0].shape[1]
        for j in range(levels):
            t = [ts[:, j] for ts in t_all]  # [n] each
            # Each group's noise at level j for all its members, then this window's rows (any windowing, the same noise).
            noise = [torch.randn((len(wg.draw.levels), *g.x0.shape[1:]), generator=gen)[wg.rows].to(device)
                     for wg, g, gen in zip(window, groups, generators)]  # fmt: skip
            x_t = [(1 - _column(s, g.x0)) * g.x0 + _column(s, g.x0) * eps for s, g, eps in zip(t, groups, noise)]  # [n, ...] each
            olds = velocities(self.model, self.old.swapped(), groups, x_t, t, algo.micro_batch_size)
            refs = None
            if algo.kl_beta:
                refs = velocities(self.model, base_weights(self.model, self.frozen), groups, x_t, t, algo.micro_batch_size)
            for k, (wg, group) in enumerate(zip(window, groups)):
                last = j == levels - 1 and k == len(groups) - 1
                v_ref = refs[k] if refs is not None else None
                yield from self._group_terms(group, wg.slot, x_t[k], t[k], rewards[k], olds[k], v_ref, levels, last)

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        k, algo = self.optimizer_steps, self.algo
        self.ema.update(slow_ema_decay(k, algo.ema_decay))
        if k % algo.optimizer_steps_per_update == 0:  # the update's last step: the old policy moves once per update
            self.old.update(fast_ema_decay(k, algo.old_ema_max_decay, algo.old_ema_decay_rate, algo.old_ema_delay))

    def _group_terms(
        self,
        group: GroupTensors,
        slot: int,
        x_t: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor,
        v_old: torch.Tensor,
        v_ref: torch.Tensor | None,
        levels: int,
        last: bool,
    ) -> Iterator[LossTerm]:
        """One group at one level: a term per micro-batch, ``sum_{i in b} [policy loss_i + kl_beta kl_i] / M``.

        ``last``: this group is the window's last at its last level, so its last term is the window's final one."""
        algo = self.algo
        slices = micro_batches(len(group.x0), algo.micro_batch_size)
        for i, rows in enumerate(slices):
            v = velocity(self.model, group, x_t, t, rows)  # [b, ...] with gradients
            policy = nft_policy_loss(v, v_old[rows], x_t[rows], group.x0[rows], t[rows], r[rows], algo.beta, algo.adv_clip_max)  # [b]
            kl = ((v - v_ref[rows]) ** 2).flatten(1).mean(dim=1) if v_ref is not None else torch.zeros_like(policy)  # [b]
            yield LossTerm(
                loss=(policy + algo.kl_beta * kl).sum() / levels,
                slot=slot,
                final=last and i == len(slices) - 1,
                extras={"kl": kl.detach().mean(), "old_deviation": ((v.detach() - v_old[rows]) ** 2).mean()},
            )


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[n] -> [n, 1, ...]`` to broadcast per-sample values over ``like``'s elements."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))
