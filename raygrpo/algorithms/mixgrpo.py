"""MixGRPO (Li et al., arXiv 2507.21802): GRPO on a sliding window of SDE steps, ODE steps everywhere else.

Rollout (:func:`rollout_spec`). Of the T steps of the shifted grid ``sigma = shift(linspace(1, 0, T+1))`` (the
Dance-SDE's, ``raygrpo.sampling.flow.sigma_schedule``), the steps of the window ``W(l) = [l, l + w)`` are SDE steps
(Flow-SDE with a = 0.7 by default, the released script's ``--flow_grpo_sampling``; Dance-SDE as an option), recorded
with their log-probs; every other step is the deterministic Euler step ``x + (sigma_{i+1} - sigma_i) v``. A group
therefore records w + 1 latents and w log-probs (``Rollout.window``), about (w+1)/(T+1) of DanceGRPO's payload. All
members of a group start from one noise (DanceGRPO's ``--init_same_noise``, the paper's Algorithm 1 line 6), so they
share the Euler prefix and branch inside the window only.

Window schedule (:class:`SlidingWindow`, the paper's §3.2 and Algorithm 1; released ``GRPOTrainingStates``). With
``m`` the training steps completed when the group was sampled (its ``policy_version``), tau the shift interval, s the
stride and ``L = T - 1 - w`` the last start whose window stays inside the trainable steps 0..T-2::

    progressive, wrap (default): l = s * ((m // tau) mod (L // s + 1))     released --roll_back: back to 0 past the end
    progressive, stop:           l = min(s * (m // tau), L)                  Algorithm 1: l <- min(l + s, T - w)
    random:                      l ~ U{0..L}, drawn from (run.seed, m)      a new window every training step
    frozen:                      l = 0                                        the paper's "Frozen" / MixGRPO-Flash*

With ``train.max_staleness`` k > 0, a group is sampled with the weights of up to k updates ago and stamped with that
version (``rollout/scheduler.py`` stamps the version the learner held when it submitted the group), so the window
follows the version that sampled the group: it lags the training step by up to k steps, and the groups of one step
may sit in two windows (each group's window is recorded with it, so the learner trains the steps it sampled).

Loss. DanceGRPO's per-step clipped surrogate (``dancegrpo.Surrogate``, reference doc dancegrpo-flowgrpo.md §6.1) on
every window step of every sample, in order (the released trainer loops ``for t in W(l)``), each term divided by w::

    rho_ij = exp( log pi_theta(x_{j+1} | x_j) - log pi_old(x_{j+1} | x_j) ),          j in W(l)
    L      = sum_k w_k * max( -A_k,i rho_ij, -A_k,i clip(rho_ij, 1 - eps, 1 + eps) ) / (grad_accum * w)

with the per-element-mean Gaussian log-density of the window's SDE (ODE steps have no density and no term). The
first ratio of an update is exactly 1 (the learner recomputes the window's steps on the very grid the rollout used).
No KL and no reference model (the released script's ``kl_coeff`` is 0).

MixGRPO-Flash (``flash: true``; the paper's §3.3, released ``dpm_apply_strategy="post"``). Before and inside the
window nothing changes (the paper: accelerating before the window amplifies the solver's error through the SDE).
After it, the remaining steps are compressed and taken with DPM-Solver++(2M) (``raygrpo.sampling.ode.DPMSolverPP2M``,
midpoint, first order into sigma 0), which is fed every step's data prediction ``x - sigma v`` from step 0 on, as the
released sampler updates its DPM state at every step, so the first step after the window is already second order.
The group's grid (:class:`FlashGrid`; the window ends at ``stop = l + w``, ``t = linspace(1, 0, T+1)``)::

    n      = max( int((T - stop + 1) * r), 2 )                  points after the window, r = flash_compression (0.4)
    sigmas = [ sigma_0 .. sigma_stop,  shift(linspace(t_stop, 0, n))[1:] ]

so the rollout records its own grid (``Rollout.sigmas``), and the learner evaluates the window's steps on it (they
are unchanged). With T = 25, w = 4 and l = 0: 4 SDE steps then 7 DPM steps instead of 21 Euler steps.

Defaults (the released ``scripts/finetune/finetune_flux_grpo_MixGRPO.sh`` and ``fastvideo/train_grpo_flux.py``): 25
steps, shift 3, window 4, tau 25, stride 1, roll-back on, Flow-SDE eta 0.7, group 12, shared initial noise, clip
1e-4, advantage clip 5, AdamW lr 1e-5 wd 1e-4, grad norm 1.0, per-reward advantages summed with weights
(``advantage_aggr``). Deviations:

* Windows are always whole and inside the steps 0..T-2 (the last step, into sigma 0, is never trained, as in
  DanceGRPO). The released schedule lets the start run to T-2 and cuts the window short there (down to an empty one);
  its trainer's ``max_timesteps = T - 2`` with an exclusive range keeps its windows inside 0..T-3. Algorithm 1 lets the
  last window reach step T-1.
* ``random`` draws one start per training step from (run.seed, step); the released code draws an unseeded one per
  rank. Its ``decay`` / ``exp_decay`` interval schedules are not implemented (the paper's Table 4: constant is best).
* Flash keeps at least one step after the window (the released ``max(..., 1)`` points would leave the grid short of
  sigma 0 when the window ends near it).
* Several rewards: each reward's group-normalised advantage is clipped at adv_clip_max and weighted in the loss
  (DanceGRPO's way, ``advantages.py``); the released ``advantage_aggr`` sums the weighted advantages, then clips the sum.
* CPS inside the window (the paper's v7 option) is not offered here; ``raygrpo/algorithms/flow_grpo.py`` has CPS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raygrpo.algorithms.base import RolloutSpec, StepDraws
from raygrpo.algorithms.dancegrpo import DanceGRPO
from raygrpo.config import Config, MixGRPOConfig
from raygrpo.contracts import PromptGroup, Rollout
from raygrpo.sampling import shift_sigmas


@dataclass(frozen=True)
class SlidingWindow:
    """MixGRPO's SDE window of a group, from the training steps done when it was sampled (module docstring)."""

    size: int  # w
    strategy: str  # "progressive" | "random" | "frozen"
    shift_interval: int  # tau, in training steps
    stride: int  # s
    wrap: bool  # progressive: back to step 0 past the last whole window (else stay there)
    seed: int  # random: one start per (seed, training step)

    def start(self, version: int, num_steps: int) -> int:
        """The first SDE step ``l`` after ``version`` training steps on a grid of ``num_steps`` steps."""
        last = num_steps - 1 - self.size  # the last start whose window ends before the final step
        if last < 0:
            raise ValueError(f"an SDE window of {self.size} steps does not fit in the {num_steps - 1} trainable steps")
        if self.strategy == "frozen":
            return 0
        if self.strategy == "random":
            return int(np.random.default_rng([self.seed, version]).integers(0, last + 1))
        moves = version // self.shift_interval
        if self.wrap:
            return self.stride * (moves % (last // self.stride + 1))
        return min(self.stride * moves, last)

    def bounds(self, group: PromptGroup, num_steps: int) -> tuple[int, int]:
        """``[l, l + w)``, keyed on the group's policy version (training steps completed)."""
        start = self.start(group.policy_version, num_steps)
        return start, start + self.size


@dataclass(frozen=True)
class FlashGrid:
    """MixGRPO-Flash's steps after the window: DPM-Solver++(2M) on a compressed tail of the grid (module docstring)."""

    compression: float  # r: the fraction of the steps after the window that remain
    shift: float  # the grid's time shift (rollout.shift): the tail is uniform in unshifted time, then shifted
    solver: str = "dpmpp_2m"

    def sigmas(self, sigmas: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """The group's grid: ``sigmas`` ``[T+1]`` up to the window's end, then the compressed tail down to 0."""
        num_steps, stop = len(sigmas) - 1, window[1]
        points = max(int((num_steps - stop + 1) * self.compression), 2)
        t_stop = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[stop]  # the unshifted time of sigma_stop
        tail = shift_sigmas(torch.linspace(float(t_stop), 0.0, points, dtype=torch.float64), self.shift).float()  # [n]
        return torch.cat([sigmas[: stop + 1], tail[1:].to(sigmas.device)])  # [stop + n]


def rollout_spec(config: Config) -> RolloutSpec:
    algo: MixGRPOConfig = config.algorithm
    window = SlidingWindow(
        algo.window_size, algo.window_strategy, algo.shift_interval, algo.window_stride, algo.window_wrap, seed=config.run.seed
    )
    return RolloutSpec(
        sampler=algo.sampler,
        noise_level=algo.noise_level,
        shared_noise=algo.shared_noise,
        record_trajectory=True,
        sde_window=window,
        post_window=FlashGrid(algo.flash_compression, config.rollout.shift) if algo.flash else None,
    )


class MixGRPO(DanceGRPO):
    """DanceGRPO's learner on the recorded window: every window step of every trained member, in order."""

    def __init__(self, config: Config):
        super().__init__(config)
        self.spec = rollout_spec(config)

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """Nothing random: each member trains the positions 0..w-1 of its recorded window (``DanceGRPO.loss_terms``
        maps position k to grid step ``start + k`` of its own rollout). Logs the example group's window start."""
        positions = np.arange(self.algo.window_size)
        return StepDraws([[positions] * members for _ in range(total_groups)], extras={"window_start": float(example.sde_steps[0])})
