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
floor((T - 1) * timestep_fraction) are kept. ``backward`` runs once per (sample, step) (one :class:`LossTerm`
each) and the optimizer steps every ``grad_accum_samples`` samples (the learner's window, after it
clips the gradient norm). No KL and no reference model (DanceGRPO has none).

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
  optimizer step (:meth:`DanceGRPO.window_samples`) and only the window's last backward all-reduces
  (DanceGRPO syncs every backward; ``learner.reduce_every_backward`` does that too).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from raygrpo.algorithms.base import LossTerm, RolloutSpec, StepDraws, WindowGroup
from raygrpo.config import Config
from raygrpo.contracts import ConditioningBatch, Rollout, as_tensor
from raygrpo.sampling import step_transition


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
    """The learner half: the clipped surrogate of every trained (sample, step), one term per backward."""

    on_policy_ratio = True  # rho = pi_theta / pi_old of the recorded transition: exactly 1 before the first step

    def __init__(self, config: Config):
        self.config = config
        self.algo = config.algorithm
        self.spec = rollout_spec(config)

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        """No reference model and no EMA: only where the tensors go."""
        self.device = parameters[0].device

    def window_samples(self, world_size: int) -> int:
        # Each rank accumulates its 1/M share of a window; the M shares together are one window.
        return max(1, self.algo.grad_accum_samples // world_size)

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """Every trained member's timesteps, group by group in the step's order."""
        usable = len(example.sigmas) - 1
        fraction = self.algo.timestep_fraction
        return StepDraws([[trained_steps(usable, fraction, rng) for _ in range(members)] for _ in range(total_groups)])

    def sampling_weights(self) -> AbstractContextManager:
        return nullcontext()  # rollout samples with the current weights

    def evaluation_weights(self) -> AbstractContextManager:
        return nullcontext()

    def after_optimizer_step(self) -> None:
        """Nothing follows the weights."""

    def loss_terms(self, policy, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """One term per (sample, trained step j): ``sum_k w_k L_k,ij / n_steps`` (the module docstring's L)."""
        device, clip = self.device, self.algo.clip_range
        for wg in window:
            rollout = wg.rollout
            sigmas = as_tensor(rollout.sigmas, device)  # [T+1]
            cond = ConditioningBatch.of(rollout.conditioning, 1, device)
            weights = torch.tensor(wg.train.reward_weights, device=device)  # [K]; a copy: the array may be a read-only object-store view
            for r, row in enumerate(wg.rows):
                member = int(wg.train.members[row])
                advantages = torch.tensor(wg.train.advantages[:, member], device=device)  # [K]
                steps = wg.draw[row]
                for s, j in enumerate(steps):
                    x = as_tensor(rollout.trajectory[member, j], device)[None]  # [1, S, D]
                    x_next = as_tensor(rollout.trajectory[member, j + 1], device)[None]  # [1, S, D]
                    v = policy.velocity(x, sigmas[j].reshape(1), cond)  # [1, ...]
                    step = step_transition(self.spec.sampler, self.spec.noise_level, x, v, sigmas, int(j))
                    log_ratio = step.log_prob(x_next) - float(rollout.log_probs[member, j])  # [1]
                    ratio = torch.exp(log_ratio)  # [1]
                    per_reward = clipped_surrogate(ratio.expand_as(advantages), advantages, clip)  # [K]
                    value, r_log = float(ratio.detach()), float(log_ratio.detach())
                    yield LossTerm(
                        loss=(weights * per_reward).sum() / len(steps),
                        slot=wg.slot,
                        final=wg is window[-1] and r == len(wg.rows) - 1 and s == len(steps) - 1,
                        ratios=[value],
                        clipped=[abs(value - 1.0) > clip],
                        extras={"approx_kl": math.expm1(r_log) - r_log},  # k3, see the module docstring
                    )
