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

Batched rollout (``rollout.micro_batch_size`` m > 1). A forward's numerics depend on its batch, so a
log-prob recomputed at batch 1 from a rollout sampled at batch m drifts from the recorded one (on CPU
by about one float32 ulp of the ratio, 1.2e-7; in bf16 on GPU by far more), and the first ratio leaves
exactly 1. The learner therefore recomputes each rollout micro-batch in one forward of the same members,
in the same order: the m members share their trained steps (one draw per micro-batch, where DanceGRPO
draws per sample) and a term covers the micro-batch at one step. The first ratio is then exactly 1 again
(tests/test_dancegrpo.py). This holds when the learner sees the rollout's micro-batches whole: every member
trained (no ``best_of_n``), groups not spread over workers, ``group_size`` and the per-rank window
``grad_accum_samples / num_ranks`` multiples of m (the config checks these). m = 1 is DanceGRPO exactly.

The learner's per-term math (log-density, ratio, the surrogate's slope) runs without autograd, and the backward starts
at the network's velocity with the closed-form gradient (:func:`surrogate_gradient`, tested against autograd;
``LossTerm.output`` and ``gradient``): on small latents the twenty-odd small operations autograd would record per term,
or a custom ``autograd.Function``'s Python backward, cost as much as the network's own forward. For the same reason a
group's advantages are folded into two per-member weights once (:class:`Surrogate`), and the surrogate's value,
which no backward needs, is summed once per window group over its terms' ratios and carried by its last term. The step
constants and noise levels come from per-grid tables built once per run (:meth:`DanceGRPO._grid`,
``GridSteps.step_constants``), and a micro-batch's recorded steps from one ``unbind``, not indexed per term.

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
from dataclasses import dataclass, field

import numpy as np
import torch

from raygrpo.algorithms.base import LossTerm, RolloutSpec, StepDraws, WindowGroup
from raygrpo.config import Config
from raygrpo.contracts import ConditioningBatch, Rollout, as_tensor
from raygrpo.sampling import GridSteps, grid_steps


def rollout_spec(config: Config) -> RolloutSpec:
    algo = config.algorithm
    return RolloutSpec(sampler=algo.sampler, noise_level=algo.noise_level, shared_noise=algo.shared_noise, record_trajectory=True)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """PPO's pessimistic surrogate ``max(-A rho, -A clip(rho, 1-eps, 1+eps))``, elementwise."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def trained_steps(num_steps: int, fraction: float, rng: np.random.Generator, trainable: np.ndarray | None = None) -> np.ndarray:
    """A random subset of the first T - 1 transitions, ``floor((T - 1) * fraction)`` of them.

    ``trainable`` ``[T]`` bool (``ModelAdapter.trainable_levels`` of the grid's levels): where it leaves some of
    those transitions out (Wan 2.2's two experts: the trained one owns its side of the boundary,
    raygrpo/models/wan_experts.py), the subset is ``floor(n * fraction)`` of the ``n`` transitions it keeps."""
    usable = num_steps - 1
    if trainable is None or trainable[:usable].all():
        return rng.permutation(usable)[: math.floor(usable * fraction)]
    owned = np.flatnonzero(trainable[:usable])
    if math.floor(len(owned) * fraction) == 0:
        raise ValueError(
            f"the trained expert owns {len(owned)} of the {usable} trainable steps, and timestep_fraction {fraction} of them is "
            "none: raise rollout.num_steps or algorithm.timestep_fraction, or train the other expert (model.train_expert)"
        )
    return rng.permutation(owned)[: math.floor(len(owned) * fraction)]


class DanceGRPO:
    """The learner half: the clipped surrogate of every trained (sample, step), one term per backward."""

    on_policy_ratio = True  # rho = pi_theta / pi_old of the recorded transition: exactly 1 before the first step

    def __init__(self, config: Config):
        self.config = config
        self.algo = config.algorithm
        self.spec = rollout_spec(config)
        # Samples per rollout forward: the learner recomputes each micro-batch's log-probs in one forward of the
        # same members, so the first ratio is exactly 1 at any micro-batch (module docstring).
        self.micro_batch = config.rollout.micro_batch_size
        self._grids: dict[bytes, _Grid] = {}  # see _grid

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        """No reference model and no EMA: where the tensors go, and the model (which noise levels it trains)."""
        self.model, self.device = model, parameters[0].device
        self._zero = torch.zeros((), device=self.device)  # the loss of a term whose value its window group's last carries

    def window_samples(self, world_size: int) -> int:
        # Each rank accumulates its 1/M share of a window; the M shares together are one window.
        return max(1, self.algo.grad_accum_samples // world_size)

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """Every trained member's timesteps, group by group in the step's order; the members of one rollout
        micro-batch share theirs (one draw per micro-batch: one per member at ``rollout.micro_batch_size`` 1)."""
        usable = len(example.sigmas) - 1
        fraction, m = self.algo.timestep_fraction, self.micro_batch
        trainable = self.model.trainable_levels(as_tensor(example.sigmas[:-1])).cpu().numpy()  # [T]: step j's level is sigma_j
        per_group = []
        for _ in range(total_groups):
            batches = [trained_steps(usable, fraction, rng, trainable) for _ in range(-(-members // m))]
            per_group.append([batches[row // m] for row in range(members)])
        return StepDraws(per_group)

    def sampling_weights(self) -> AbstractContextManager:
        return nullcontext()  # rollout samples with the current weights

    def evaluation_weights(self) -> AbstractContextManager:
        return nullcontext()

    def after_optimizer_step(self) -> None:
        """Nothing follows the weights."""

    def loss_terms(self, policy, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """One term per (rollout micro-batch, trained step j): ``sum_{i in batch} sum_k w_k L_k,ij / n_steps`` (the module
        docstring's L), the batch's members in one forward as rollout sampled them.

        What no backward needs is computed once per window group, over all its terms' ratios, and rides on its last
        term: the surrogate's value (:meth:`Surrogate.value`; the earlier terms' ``loss`` is 0 unless ``step_loss`` adds
        to it), the clip fraction (``LossTerm.clipped`` then covers the group's terms) and ``approx_kl`` (the update's
        figure is then a mean over window groups, equal in size unless a window boundary cuts a group). The window's
        summed loss is the same; each term carries only its gradient, a few small operations."""
        device, clip = self.device, self.algo.clip_range
        for wg in window:
            rollout, train = wg.rollout, wg.train
            grid = self._grid(rollout.sigmas)
            start = rollout.sde_steps[0]  # trajectory[:, k] is x at grid step start + k (0 without an SDE window)
            weights = torch.tensor(train.reward_weights, device=device)  # [K]; a copy: the array may be a read-only object-store view
            # The group's window members at once (a copy each per group, not per micro-batch); micro-batches are row slices.
            members = train.members[wg.rows]  # [r]
            trajectory = as_tensor(rollout.trajectory[members], device)  # [r, W+1, ...]: the recorded steps (W = T without a window)
            old_log_probs = as_tensor(rollout.log_probs[members], device)  # [r, W]
            advantages = as_tensor(train.advantages[:, members].T, device)  # [r, K]
            conds: dict[int, ConditioningBatch] = {}  # by micro-batch size: read-only expanded views, shared
            # by the number of trained steps n (one per group in practice): (w_k / n, the group's surrogate)
            folded: dict[int, tuple[torch.Tensor, Surrogate]] = {}
            ratios, log_ratios, uppers, lowers = [], [], [], []  # every term's of the group, for its last
            batches = _rollout_batches(wg.rows, self.micro_batch)
            lo = 0
            for b, rows in enumerate(batches):
                part, lo = slice(lo, lo + len(rows)), lo + len(rows)  # the micro-batch's rows of the tensors above
                n = len(rows)
                # Every recorded step of the micro-batch as views, one unbind each: per term, three selects would cost more.
                xs, batch_old_log_probs = trajectory[part].unbind(1), old_log_probs[part].unbind(1)  # W+1 of [n, ...], W of [n]
                batch_advantages = advantages[part]
                cond = conds.get(n)
                if cond is None:
                    cond = conds[n] = ConditioningBatch.of(rollout.conditioning, n, device)
                trained = wg.draw[rows[0]]  # shared by the micro-batch: positions k among the recorded steps
                if len(trained) not in folded:
                    step_weights = weights / len(trained)  # [K]: w_k / n_steps
                    folded[len(trained)] = step_weights, Surrogate.of(advantages, step_weights, clip)
                step_weights, surrogate = folded[len(trained)]
                surrogate = surrogate.rows(part)
                for s, k in enumerate(trained.tolist()):
                    j = start + k  # the grid step
                    step = TrainedStep(
                        grid.steps, grid.sigmas, j, grid.level(j, n), xs[k].contiguous(), xs[k + 1], cond, batch_old_log_probs[k],
                        batch_advantages, step_weights, surrogate,
                    )  # fmt: skip
                    out = self.step_loss(policy, step)
                    ratios.append(out.ratio)
                    log_ratios.append(out.log_ratio)
                    uppers.append(surrogate.upper)
                    lowers.append(surrogate.lower)
                    loss, clipped, extras = out.loss, None, out.extras
                    last = b == len(batches) - 1 and s == len(trained) - 1  # the group's last term
                    if last:
                        ratio = torch.cat(ratios)  # [terms * n]
                        if not out.surrogate_in_loss:
                            value = Surrogate(torch.cat(uppers), torch.cat(lowers), clip).value(ratio)
                            loss = value if loss is None else loss + value
                        clipped = (ratio - 1).abs() > clip
                        log_ratio = torch.cat(log_ratios).double()  # float64: r is near float32's resolution
                        extras = extras | {"approx_kl": (torch.expm1(log_ratio) - log_ratio).mean()}  # k3, see the module docstring
                    yield LossTerm(
                        loss=self._zero if loss is None else loss,
                        slot=wg.slot,
                        final=last and wg is window[-1],
                        ratios=out.ratio,
                        clipped=clipped,
                        extras=extras,
                        output=out.output,
                        gradient=out.gradient,
                    )

    def _grid(self, sigmas: np.ndarray) -> _Grid:
        """The grid ``sigmas`` ``[T+1]`` on the learner's device, its steps and noise levels, built once per distinct
        grid and kept (a run has one grid, or a few: MixGRPO's windows, Wan's experts), so that every term's step
        constants and level are lookups (``GridSteps.step_constants``, :meth:`_Grid.level`), not fresh tensors."""
        key = np.ascontiguousarray(sigmas).tobytes()
        cached = self._grids.get(key)
        if cached is None:
            if len(self._grids) >= 64:  # bounded: grids that vary per rollout would otherwise pile up
                self._grids.clear()
            grid = as_tensor(sigmas, self.device)
            cached = self._grids[key] = _Grid(grid, grid_steps(self.spec.sampler, self.spec.noise_level, grid))
        return cached

    def step_loss(self, policy, step: TrainedStep) -> StepLoss:
        """Extension point (Flow-GRPO adds its KL and GRPO-Guard): one trained step of a micro-batch, its surrogate's
        gradient in closed form at v, its ratios and statistics (``loss_terms`` adds the surrogate's value, the clip
        fraction and ``approx_kl`` once per window group)."""
        v = policy.velocity(step.x, step.sigma, step.cond)  # [n, ...]
        gradient, ratio, log_ratio = surrogate_gradient(step.steps, step.x, v, step.x_next, step.index, step.old_log_prob, step.surrogate)
        return StepLoss(None, ratio, log_ratio, {}, v, gradient)


@dataclass
class StepLoss:
    """What :meth:`DanceGRPO.step_loss` gives for one trained step: the :class:`LossTerm`'s loss, output and gradient
    (``LossTerm`` says how its gradient reaches the network), the ratios and statistics."""

    # scalar: what L has of this step besides the plain surrogate's value (Flow-GRPO's KL, differentiable), None: nothing
    loss: torch.Tensor | None
    ratio: torch.Tensor  # [n] the importance ratios (clip and ratio metrics), detached
    log_ratio: torch.Tensor  # [n] log pi_theta - log pi_old of the plain ratio, detached (approx_kl)
    extras: dict[str, torch.Tensor]  # 0-dim statistics of this step
    output: torch.Tensor | None = None  # [n, ...] v, where backward starts with ``gradient``; None: from ``loss`` alone
    gradient: torch.Tensor | None = None  # [n, ...] d L / d v
    # ``loss`` holds the clipped surrogate itself (GRPO-Guard's, of rho_hat); False: ``loss_terms`` adds the plain
    # surrogate's value of ``ratio``, once per window group
    surrogate_in_loss: bool = False


@dataclass
class TrainedStep:
    """One trained step j of a rollout micro-batch of n members, as :meth:`DanceGRPO.step_loss` takes it."""

    steps: GridSteps  # the rollout's steps (coefficients of every step of its grid)
    sigmas: torch.Tensor  # [T+1] the rollout's grid
    index: int  # j, the grid step
    sigma: torch.Tensor  # [n] sigma_j, each member's noise level (read-only: shared by every term at step j)
    x: torch.Tensor  # [n, ...] x_j as rollout fed it
    x_next: torch.Tensor  # [n, ...] the recorded x_{j+1}
    cond: ConditioningBatch  # expanded to n
    old_log_prob: torch.Tensor  # [n] log pi_old(x_{j+1} | x_j), recorded by rollout
    advantages: torch.Tensor  # [n, K]
    weights: torch.Tensor  # [K] w_k / n_steps
    surrogate: Surrogate  # the micro-batch's advantages and weights, folded


@dataclass
class _Grid:
    """One sigma grid on the learner's device (:meth:`DanceGRPO._grid`), with what every term at one of its steps reads."""

    sigmas: torch.Tensor  # [T+1]
    steps: GridSteps
    levels: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # see level

    def level(self, index: int, n: int) -> torch.Tensor:
        """``[n]`` sigma_index for n members, made once (an expanded view): per term, a select and an expand."""
        level = self.levels.get((index, n))
        if level is None:
            level = self.levels[(index, n)] = self.sigmas[index].expand(n)
        return level


@dataclass
class Surrogate:
    """The clipped surrogate of n members (a window group's, or a micro-batch of them: :meth:`rows`) at any of their
    trained steps, the K rewards folded into two weights per member. Each reward's branch is decided by its
    advantage's sign (A > 0: ``-A min(rho, 1 + eps)``; A < 0: ``-A max(rho, 1 - eps)``; A = 0: 0), so with eps the
    clip range::

        sum_k w_k max(-A_ik rho_i, -A_ik clip(rho_i, 1 - eps, 1 + eps)) = upper_i min(rho_i, 1 + eps) + lower_i max(rho_i, 1 - eps)
        upper_i = -sum_k w_k max(A_ik, 0),        lower_i = -sum_k w_k min(A_ik, 0)

    and its derivative in log rho_i is autograd's of :func:`clipped_surrogate` (where the branches tie, inside the band
    and at its edges, each gets half and clamp passes its half on, so the unclipped branch keeps the whole)::

        d / d log rho_i = rho_i (upper_i [rho_i <= 1 + eps] + lower_i [rho_i >= 1 - eps])

    Per term that is six operations on ``[n]`` where the ``[n, K]`` form took twelve; the value, which no backward
    needs, is summed once per window group (tests/test_advantages_and_loss.py checks both against autograd)."""

    upper: torch.Tensor  # [n] <= 0
    lower: torch.Tensor  # [n] >= 0
    clip_range: float

    @classmethod
    def of(cls, advantages: torch.Tensor, weights: torch.Tensor, clip_range: float) -> Surrogate:
        """From ``advantages`` ``[n, K]`` and the rewards' ``weights`` ``[K]`` (DanceGRPO: ``w_k / n_steps``)."""
        return cls(-(weights * advantages.clamp(min=0)).sum(dim=1), -(weights * advantages.clamp(max=0)).sum(dim=1), clip_range)

    def rows(self, part: slice) -> Surrogate:
        """The surrogate of the members ``part`` (a micro-batch of a group's)."""
        return Surrogate(self.upper[part], self.lower[part], self.clip_range)

    def value(self, ratios: torch.Tensor) -> torch.Tensor:
        """The surrogate summed over ``ratios`` ``[..., n]`` (each member's ratios at one or more steps), a scalar."""
        return (self.upper * ratios.clamp(max=1 + self.clip_range) + self.lower * ratios.clamp(min=1 - self.clip_range)).sum()

    def slope(self, ratio: torch.Tensor) -> torch.Tensor:
        """``[n]`` the derivative of the surrogate in ``log rho``, at the ratios ``ratio`` ``[n]``."""
        return ratio * (self.upper * (ratio <= 1 + self.clip_range) + self.lower * (ratio >= 1 - self.clip_range))


def surrogate_gradient(
    steps: GridSteps,
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    index: int,
    old_log_prob: torch.Tensor,
    surrogate: Surrogate,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d L / d v, rho, log rho)`` of ``n`` samples at one step, all detached, ``L`` the ``surrogate`` of
    ``rho = exp(log pi(x_next | x, v) - old_log_prob)`` (``x, v, x_next`` ``[n, ...]``, ``old_log_prob`` ``[n]``); the
    gradient ``[n, ...]`` of v's dtype::

        g_i = d L / d v_i = d L / d log pi_i * d log pi_i / d v_i        (d L / d log pi_i: Surrogate.slope)

    The step's log-density and its gradient in v come from ``GridSteps.log_prob_with_gradient`` (bit for bit the
    rollout's log-prob). None of it runs through autograd: the learner starts the backward at v with g
    (``LossTerm.output`` and ``gradient``). Autograd itself would record about twenty small operations per term, a
    custom ``autograd.Function`` costs a Python call in every backward, and a linear term ``L + (<v, g> - <v, g>)`` (used
    before) four more operations and their backward nodes: on small latents each costs a noticeable share of the
    network's own forward. tests/test_advantages_and_loss.py checks g against autograd.
    """
    log_prob, d_log_prob = steps.log_prob_with_gradient(x, v, x_next, index)  # [n], [n, ...]; no autograd
    log_ratio = log_prob - old_log_prob  # [n]
    ratio = torch.exp(log_ratio)  # [n]
    gradient = d_log_prob * surrogate.slope(ratio).reshape(-1, *([1] * (d_log_prob.ndim - 1)))  # [n, ...]: d L / d v
    return gradient.to(v.dtype), ratio, log_ratio


def _rollout_batches(rows: np.ndarray, micro_batch: int) -> list[np.ndarray]:
    """``rows`` (positions into the trained members, in order) cut where ``row // micro_batch`` changes: the rollout's
    micro-batches when every member is trained, each sharing its draw (:meth:`DanceGRPO.draw`)."""
    cuts = np.flatnonzero(np.diff(rows // micro_batch)) + 1
    return np.split(rows, cuts)
