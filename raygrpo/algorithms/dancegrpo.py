"""DanceGRPO (Xue et al., arXiv 2505.07818): GRPO on the reverse SDE of a rectified flow.

Rollout (what the algorithm asks of the rollout side, :class:`RolloutSpec`):
    G samples per prompt from the Dance-SDE (``raygrpo.sampling.flow``, g = eta = 0.3 for FLUX),
    all members of a group starting from the *same* initial noise (stochasticity comes only from
    the per-step SDE noise), recording the trajectory x_0..x_T and the per-step log-probs.

Advantages: per reward, group-normalised and clipped (``advantages.py``).

Loss, for each sample i, reward k and trained step j (reference doc §6.1, §5.3)::

    rho_ij   = exp( log pi_theta(x_{j+1} | x_j) - log pi_old(x_{j+1} | x_j) )
    L_k,ij   = max( -A_k,i * rho_ij, -A_k,i * clip(rho_ij, 1 - eps, 1 + eps) )
    L        = sum_k w_k * L_k,ij / (grad_accum * n_trained_steps)

where log pi is the element-mean Gaussian log-density (so eps = 1e-4 is meaningful). The trained
steps of each sample are a fresh random subset: a random permutation of the first T - 1
transitions (DanceGRPO always drops the last, near-data one), of which the first
floor((T - 1) * timestep_fraction) are kept. ``backward`` runs once per (sample, step) and the
optimizer steps every ``grad_accum_samples`` samples, after clipping the gradient norm. No KL and
no reference model (DanceGRPO has none).

Logged beside the loss, as a diagnostic only (it is no term of the loss and has no gradient):
``approx_kl``, the k3 estimator of KL(pi_old || pi_theta) over the trained transitions, with
r_ij = log pi_theta - log pi_old as above::

    approx_kl = mean_ij( exp(r_ij) - 1 - r_ij )        (>= 0, unbiased on samples of pi_old)

Since log pi is the element mean, this is the KL per latent element. Within one update it grows as
the optimizer steps move pi_theta away from the sampling policy; with ``max_staleness`` >= 1 it also
measures how far behind the samples were.

Defaults follow the DanceGRPO FLUX recipe (group 12, 16 steps, eta 0.3, shift 3, fraction 0.6,
clip 1e-4, AdamW lr 1e-5 wd 1e-4, grad norm 1.0). Deviations:

* Rewards that fail for a group member drop the whole group (DanceGRPO substitutes -1).
* ``grad_accum_samples`` counts samples across the groups of a step; DanceGRPO counts per rank.
  With M learner ranks each rank accumulates ``grad_accum_samples / M`` of its own samples per
  optimizer step and only the window's last backward all-reduces (DanceGRPO syncs every backward).
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from raygrpo.config import Config
from raygrpo.contracts import ConditioningBatch, LearnerMetrics, Rollout, TrainGroup, as_tensor
from raygrpo.learner.shard import Shard, clip_grad_norm
from raygrpo.sampling import step_transition


@dataclass(frozen=True)
class RolloutSpec:
    """What rollout must record for this algorithm."""

    sampler: str  # one of raygrpo.sampling.SAMPLERS
    noise_level: float  # eta (dance_sde) or a (flow_sde)
    shared_noise: bool  # one initial noise per group
    record_trajectory: bool  # keep x_0..x_T and the per-step log-probs


class VelocityModel(Protocol):
    """What the algorithm needs of the policy network (e.g. ``raygrpo.models.FluxModel``)."""

    def velocity(self, latents: torch.Tensor, sigmas: torch.Tensor, cond: ConditioningBatch) -> torch.Tensor: ...


def rollout_spec(config: Config) -> RolloutSpec:
    algo = config.algorithm
    return RolloutSpec(sampler=algo.sampler, noise_level=algo.noise_level, shared_noise=algo.shared_noise, record_trajectory=True)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's pessimistic surrogate ``max(-A rho, -A clip(rho, 1-eps, 1+eps))``, elementwise."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def trained_steps(num_steps: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random subset of the first T - 1 transitions, ``floor((T - 1) * fraction)`` of them."""
    usable = num_steps - 1
    return rng.permutation(usable)[: math.floor(usable * fraction)]


class DanceGRPO:
    """The learner half: one update from a batch of whole groups."""

    def __init__(self, config: Config):
        self.config = config
        self.spec = rollout_spec(config)

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        """Nothing to prepare: no reference model, no EMA."""

    def sampling_weights(self) -> AbstractContextManager:
        return nullcontext()  # rollout samples with the current weights

    def evaluation_weights(self) -> AbstractContextManager:
        return nullcontext()

    def update(
        self,
        policy: VelocityModel,
        parameters: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        batch: list[tuple[TrainGroup, Rollout]],
        rng: np.random.Generator,
        policy_version: int,
        shard: Shard | None = None,
    ) -> LearnerMetrics:
        """``shard``: this rank's part of the step (None: one rank holds the whole batch; see ``learner/shard.py``)."""
        algo, opt = self.config.algorithm, self.config.optimizer
        shard = shard or Shard()
        start = time.perf_counter()
        device = parameters[0].device
        samples = [(group, rollout, int(i)) for group, rollout in batch for i in group.members]
        real = [shard.is_real(k, len(batch)) for k, (group, _) in enumerate(batch) for _ in group.members]  # padding: False
        # Each rank accumulates its 1/M share of a window; the M shares together are one window.
        accum = max(1, algo.grad_accum_samples // shard.world_size)
        n_steps = self.config.trained_timesteps
        # Every sample's timesteps in the step's global order, so M ranks draw what one rank draws.
        usable = len(batch[0][1].sigmas) - 1
        draws = [trained_steps(usable, algo.timestep_fraction, rng) for _ in range(shard.total_samples or len(samples))]
        chosen = shard.pick(draws, shard.sample_offset, len(samples))
        losses, ratios, log_ratios, grad_norms, clipped_terms, first_dev = [], [], [], [], 0, 0.0
        optimizer.zero_grad(set_to_none=True)
        for n, (group, rollout, member) in enumerate(samples):
            sigmas = as_tensor(rollout.sigmas, device)  # [T+1]
            cond = ConditioningBatch.of(rollout.conditioning, 1, device)
            advantages = torch.as_tensor(group.advantages[:, member], device=device)  # [K]
            weights = torch.as_tensor(group.reward_weights, device=device)  # [K]
            if n % accum == 0:
                # The window's real samples over every rank (its last chunk is smaller), so every window averages.
                window = shard.global_sum(sum(real[n : n + accum]))
            scale = shard.loss_scale(real[n])  # M (FSDP averages the M ranks' gradients), 0 for padding
            window_ends = (n + 1) % accum == 0 or n + 1 == len(samples)
            for s, j in enumerate(chosen[n]):
                # One reduce-scatter per window: only its last backward syncs gradients over the ranks.
                shard.gradient_sync(window_ends and s == len(chosen[n]) - 1)
                x = as_tensor(rollout.trajectory[member, j], device)[None]  # [1, S, D]
                x_next = as_tensor(rollout.trajectory[member, j + 1], device)[None]  # [1, S, D]
                v = policy.velocity(x, sigmas[j].reshape(1), cond)  # [1, ...]
                step = step_transition(self.spec.sampler, self.spec.noise_level, x, v, sigmas, int(j))
                log_prob = step.log_prob(x_next)  # [1]
                log_ratio = log_prob - float(rollout.log_probs[member, j])  # [1]
                ratio = torch.exp(log_ratio)  # [1]
                per_reward = clipped_surrogate(ratio.expand_as(advantages), advantages, algo.clip_range)  # [K]
                term = (weights * per_reward).sum()
                (term * scale / (window * n_steps)).backward()
                if not real[n]:
                    continue
                ratio_value = float(ratio.detach())
                if not grad_norms:
                    first_dev = max(first_dev, abs(ratio_value - 1.0))
                losses.append(float(term.detach()))
                ratios.append(ratio_value)
                log_ratios.append(float(log_ratio.detach()))
                clipped_terms += abs(ratio_value - 1.0) > algo.clip_range
            if window_ends:
                grad_norms.append(clip_grad_norm(parameters, opt.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        ratios_np = np.asarray(ratios or [np.nan])  # a rank holding only padding has no terms
        r = np.asarray(log_ratios, np.float64)  # [n_terms]
        approx_kl = float(np.mean(np.expm1(r) - r)) if len(r) else float("nan")  # k3: exp(r) - 1 - r
        return LearnerMetrics(
            policy_version=policy_version,
            loss=float(np.mean(losses)) if losses else float("nan"),
            grad_norm=float(np.mean(grad_norms)),
            clip_fraction=clipped_terms / max(len(ratios), 1),
            ratio_mean=float(ratios_np.mean()),
            ratio_max_abs_dev=float(np.abs(ratios_np - 1).max()),
            first_ratio_max_abs_dev=first_dev,
            optimizer_steps=len(grad_norms),
            samples=sum(real),
            seconds=time.perf_counter() - start,
            extras={"approx_kl": approx_kl},
        )
