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
micro-batch b a forward with gradients and the backward of ``sum_{i in b} [sigmoid(S_g) A_i l_i +
kl_beta kl_i] / G`` (l_i, kl_i detached where the clip mask says so). The micro-batches' gradients
add up to the whole group's, equal up to float rounding (the same per-member numbers, summed in
another order), and the loss normalisation and the single gradient sync per update (its last
backward, ``Shard.gradient_sync``) are unchanged. The price is one more no-gradient forward of the
policy per member; a group trained whole (m >= G, or None) takes its l_i from its one forward.
Each shadow (reference, fast EMA, frozen base) is swapped in once per sigma for all of the rank's
groups: for full fine-tuning a swap copies every trainable parameter twice, while the outputs it
yields are latent-sized. Activations are held for one micro-batch (2m rows with CFG in training).

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

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from raygrpo.algorithms.dancegrpo import RolloutSpec
from raygrpo.config import Config, DGPOConfig
from raygrpo.contracts import ConditioningBatch, LearnerMetrics, Rollout, TrainGroup, as_tensor
from raygrpo.learner.ema import ParameterShadow, fast_ema_decay, slow_ema_decay
from raygrpo.learner.shard import Shard, clip_grad_norm
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


def training_sigmas(algo: DGPOConfig, rollout_sigmas: torch.Tensor, shift: float, rng: np.random.Generator) -> torch.Tensor:
    """The M noise levels of one update, shared by every sample (the timestep clip). ``[M]`` float32."""
    if algo.trunc_steps is not None:
        indices = rng.choice(algo.trunc_steps + 1, size=algo.num_train_timesteps, replace=False)
        return rollout_sigmas[torch.as_tensor(indices)].float()
    t = torch.as_tensor(rng.uniform(algo.t_min, 1.0, size=algo.num_train_timesteps), dtype=torch.float64)
    return shift_sigmas(t, shift).float()


@dataclass
class _Group:
    """One group's tensors for an update."""

    x0: torch.Tensor  # [G, ...] final latents of the trained members
    advantages: torch.Tensor  # [G] sum_k w_k A_k
    cond: ConditioningBatch  # expanded to G


@dataclass
class _Terms:
    """One real group's statistics at one sigma (the update's metrics average them)."""

    loss: float  # the group's surrogate, gate * A * l plus the KL term, mean over its members
    gate: float  # sigmoid(S_g)
    kl: float  # mean over members of ||v_theta - v_base||^2
    clipped: list[bool]  # per member: its denoising loss was detached by the PPO clip
    ratios: list[float]  # per member exp(l_old - l); empty without the clip


def _micro_batches(size: int, micro_batch_size: int | None) -> list[slice]:
    """The member slices of a group of ``size``: one slice for None (the whole group)."""
    step = micro_batch_size or size
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]


class DGPO:
    """The learner half. ``setup`` creates the shadows (fast/slow EMA, frozen snapshot) once."""

    def __init__(self, config: Config):
        self.config = config
        self.algo: DGPOConfig = config.algorithm
        self.spec = rollout_spec(config)
        self.optimizer_steps = 0

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        self.model = model
        self.fast_ema = ParameterShadow(parameters)
        self.slow_ema = ParameterShadow(parameters)
        # With LoRA the base is the network with the adapter switched off; otherwise keep the start.
        self.frozen = None if lora else ParameterShadow(parameters)

    def _frozen_base(self) -> AbstractContextManager:
        if self.frozen is not None:
            return self.frozen.swapped()
        return _adapters_disabled(self.model.transformer)

    def _reference(self) -> AbstractContextManager:
        return self.fast_ema.swapped() if self.algo.reference == "fast_ema" else self._frozen_base()

    def sampling_weights(self) -> AbstractContextManager:
        """The weights rollout samples with: the fast EMA once ``switch_ema_ref`` steps have passed."""
        return self.fast_ema.swapped() if self.optimizer_steps >= self.algo.switch_ema_ref else nullcontext()

    def evaluation_weights(self) -> AbstractContextManager:
        return self.slow_ema.swapped()

    def update(
        self,
        policy,
        parameters: list[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        batch: list[tuple[TrainGroup, Rollout]],
        rng: np.random.Generator,
        policy_version: int,
        shard: Shard | None = None,
    ) -> LearnerMetrics:
        """``shard``: this rank's part of the step (None: one rank holds the whole batch; see ``learner/shard.py``)."""
        algo, start = self.algo, time.perf_counter()
        shard = shard or Shard()
        device = parameters[0].device
        groups = [self._group(train_group, rollout, device) for train_group, rollout in batch]
        real = [shard.is_real(k, len(groups)) for k in range(len(groups))]  # padding slots: False
        sigmas = training_sigmas(algo, as_tensor(batch[0][1].sigmas), self.config.rollout.shift, rng).to(device)  # [M]
        noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        # Terms of the whole step over every rank; each rank scales its own by M (FSDP averages gradients).
        n_terms = shard.global_sum(sum(real)) * len(sigmas)
        terms: list[_Terms] = []
        optimizer.zero_grad(set_to_none=True)
        for t_index, sigma in enumerate(sigmas):
            # One noise per group at this sigma, shared by its members (paper §3: variance reduction), drawn
            # for every group slot of the step in order so that M ranks draw what one rank draws.
            drawn = [torch.randn((1, *groups[0].x0.shape[1:]), generator=noise_gen) for _ in range(shard.total_groups or len(groups))]
            noise = [eps.to(device).expand_as(g.x0) for g, eps in zip(groups, shard.pick(drawn, shard.group_offset, len(groups)))]
            x_t = [(1 - sigma) * g.x0 + sigma * eps for g, eps in zip(groups, noise)]  # each [G, ...]
            targets = [eps - g.x0 for g, eps in zip(groups, noise)]  # each [G, ...] v* = eps - x0
            references = self._reference_terms(groups, x_t, targets, sigma)
            for k, group in enumerate(groups):
                last = t_index == len(sigmas) - 1 and k == len(groups) - 1
                scale = shard.loss_scale(real[k]) / n_terms
                term = self._train_group(group, x_t[k], targets[k], sigma, *references[k], scale, shard, last)
                if real[k]:
                    terms.append(term)
        grad_norm = clip_grad_norm(parameters, self.config.optimizer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._after_optimizer_step()
        ratios = np.asarray([r for t in terms for r in t.ratios] or [1.0])
        return LearnerMetrics(
            policy_version=policy_version,
            loss=_mean([t.loss for t in terms]),
            grad_norm=grad_norm,
            clip_fraction=_mean([c for t in terms for c in t.clipped]),
            ratio_mean=float(ratios.mean()),
            ratio_max_abs_dev=float(np.abs(ratios - 1).max()),
            first_ratio_max_abs_dev=float("nan"),  # no log-probs: DGPO has no on-policy ratio to check
            optimizer_steps=1,
            samples=sum(len(g.x0) for g, is_real in zip(groups, real) if is_real),
            seconds=time.perf_counter() - start,
            extras={"gate_mean": _mean([t.gate for t in terms]), "kl": _mean([t.kl for t in terms]), "sigma_min": float(sigmas.min())},
        )

    def _reference_terms(
        self, groups: list[_Group], x_t: list[torch.Tensor], targets: list[torch.Tensor], sigma: torch.Tensor
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

    def _train_group(
        self,
        group: _Group,
        x_t: torch.Tensor,
        target: torch.Tensor,
        sigma: torch.Tensor,
        loss_ref: torch.Tensor,
        loss_old: torch.Tensor | None,
        v_base: torch.Tensor,
        scale: float,
        shard: Shard,
        last: bool,
    ) -> _Terms:
        """One group at one sigma, given its reference terms: the detached gate and clip mask, then its backward(s).

        ``scale`` multiplies the group's loss before backward (rank factor over the step's term count,
        0 for padding); ``last``: this group's last backward is the update's last (the one that syncs).
        """
        algo = self.algo
        size = len(group.x0)
        slices = _micro_batches(size, algo.micro_batch_size)
        needs_old = loss_old is not None
        # The gate needs every member's l_i before any backward: a group trained in one forward gets them from
        # that forward; a split group from a no-gradient pass of the policy first (module docstring).
        whole = self._policy(group, x_t, target, sigma, slices[0]) if len(slices) == 1 else None
        loss = whole[1].detach() if whole is not None else self._evaluate(nullcontext(), [group], [x_t], [target], sigma)[0][0]
        gate = torch.sigmoid(group_gate_logit(group.advantages, loss, loss_ref, algo.beta))
        clipped = torch.zeros_like(loss, dtype=torch.bool)  # [G]
        if needs_old:
            clipped = ppo_clip_mask(group.advantages, loss, loss_old, algo.clip_range)
        total, kl_sum = 0.0, 0.0
        for j, rows in enumerate(slices):
            v, loss_b = whole if whole is not None else self._policy(group, x_t, target, sigma, rows)  # [b, ...], [b]
            used = torch.where(clipped[rows], loss_b.detach(), loss_b) if algo.clip_dsm else loss_b
            kl = ((v - v_base[rows]) ** 2).flatten(1).mean(dim=1)  # [b]
            if algo.clip_kl:
                kl = torch.where(clipped[rows], kl.detach(), kl)
            # Sums over the micro-batch divided by G: a group's micro-batches add up to its mean over members.
            part = (gate * group.advantages[rows] * used).sum() / size + algo.kl_beta * (kl.sum() / size)
            # One reduce-scatter per update: only the last backward syncs gradients over the ranks.
            shard.gradient_sync(last and j == len(slices) - 1)
            (part * scale).backward()
            total += float(part.detach())
            kl_sum += float(kl.detach().sum())
        ratios = torch.exp(loss_old - loss).tolist() if needs_old else []
        return _Terms(loss=total, gate=float(gate), kl=kl_sum / size, clipped=clipped.tolist(), ratios=ratios)

    def _evaluate(
        self,
        weights: AbstractContextManager,
        groups: list[_Group],
        x_t: list[torch.Tensor],
        targets: list[torch.Tensor],
        sigma: torch.Tensor,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group ``(l [G], v [G, ...])`` under ``weights`` (swapped in once) without gradients, a micro-batch per forward."""
        with torch.no_grad(), weights:
            vs = [
                torch.cat([self._velocity(g, x, sigma, rows) for rows in _micro_batches(len(g.x0), self.algo.micro_batch_size)])
                for g, x in zip(groups, x_t)
            ]
        return [(denoising_loss(v, target), v) for v, target in zip(vs, targets)]

    def _policy(self, group: _Group, x_t: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, rows: slice):
        """``(v [b, ...], l [b])`` of the trained weights on micro-batch ``rows``, with gradients."""
        v = self._velocity(group, x_t, sigma, rows)
        return v, denoising_loss(v, target[rows])

    def _velocity(self, group: _Group, x_t: torch.Tensor, sigma: torch.Tensor, rows: slice) -> torch.Tensor:
        x = x_t[rows]
        return self.model.velocity(x, sigma.expand(len(x)), group.cond.rows(rows))

    def _after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        k, algo = self.optimizer_steps, self.algo
        self.fast_ema.update(fast_ema_decay(k, algo.fast_ema_max_decay, algo.fast_ema_decay_rate))
        if k % algo.slow_ema_every == 0:
            self.slow_ema.update(slow_ema_decay(k, algo.slow_ema_decay))

    def _group(self, train_group: TrainGroup, rollout: Rollout, device) -> _Group:
        members = train_group.members
        x0 = as_tensor(rollout.final_latents[members], device)  # [G, ...]
        weighted = (train_group.reward_weights[:, None] * train_group.advantages[:, members]).sum(axis=0)  # [G]
        cond = ConditioningBatch.of(rollout.conditioning, len(members), device)
        return _Group(x0, torch.as_tensor(weighted, dtype=torch.float32, device=device), cond)


def _mean(values: list) -> float:
    """Mean of a statistic; NaN for a rank that holds only padding (the learner group weights ranks by samples)."""
    return float(np.mean(values)) if values else float("nan")


class _adapters_disabled(AbstractContextManager):
    """Evaluate a diffusers model with its (peft) LoRA adapters switched off."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __enter__(self):
        self.transformer.disable_adapters()

    def __exit__(self, *exc):
        self.transformer.enable_adapters()
        return False
