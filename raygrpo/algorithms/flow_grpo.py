"""Flow-GRPO (Liu et al., arXiv 2505.05470), its Fast variant, CPS rollouts and GRPO-Guard, on DanceGRPO's machinery.

Sources: the paper and the released code, yifan123/flow_grpo (``scripts/train_sd3.py``, ``scripts/train_sd3_fast.py``,
``config/grpo.py``, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, ``flow_grpo/stat_tracking.py``); reference
doc dancegrpo-flowgrpo.md §2.3, §5.1, §6.1-6.5, §7.1-7.3. GRPO-Guard: Wang et al., arXiv 2510.22319 (Eq. 8, Eq. 12).

Rollout (:func:`rollout_spec`): the Flow-SDE (``raygrpo.sampling.flow``, ``g = a sqrt(sigma / (1 - sigma))``,
a = 0.7 for SD3.5-M) or CPS (``raygrpo.sampling.cps``, eta = 0.8), fresh initial noise per member (``same_latent``
False), a group's members optionally spread over rollout workers (``rollout.spread_groups``).

Advantages (``advantages.py``, the released ``PerPromptStatTracker``): ``A = (r - mean_group) / (std + 1e-4)`` with
the population std (ddof 0) over the whole step (``global_std``, the default) or over the group, clipped at
``adv_clip_max`` 5; the tracker's prompt key is our group (one prompt per group; the released code keys by the
prompt string, so two groups of one prompt in a step would share statistics there). Several rewards: Flow-GRPO sums
the weighted raw rewards first (``scoring.combine: weighted_sum``); ``per_reward`` (DanceGRPO's) works too.

Loss of sample i at trained step j (``train_sd3.py``), DanceGRPO's clipped surrogate plus a KL to the reference::

    rho_ij = exp(log pi_theta(x_{j+1} | x_j) - log pi_old)
    L_ij   = sum_k w_k max(-A_k,i rho_ij, -A_k,i clip(rho_ij, 1 - eps, 1 + eps)) + beta KL_ij
    KL_ij  = mean_elements (mu_theta - mu_ref)^2 / (2 std_dev_j^2) = b_j^2 mean_elements (v_theta - v_ref)^2 / (2 std_dev_j^2)

each term divided by the n trained steps (the learner divides by the window's samples). ``mu = a_j x + b_j v`` is
the step's mean (``StepCoefficients``), so ``mu_theta - mu_ref = b_j (v_theta - v_ref)`` exactly (we compute it so;
the released code subtracts the two means, equal up to rounding). ``std_dev_j`` is what the released
``sde_step_with_logprob`` returns: for the Flow-SDE the diffusion coefficient ``g_j`` (not the step's std
``g_j sqrt(sigma_j - sigma_{j+1})``), for CPS the step's std ``sigma_{j+1} sin(eta pi / 2)``. For the Flow-SDE the
exact KL of the two Gaussians (per element) divides by the step's variance ``g_j^2 |dsigma_j|``: the released KL is
the paper's times ``|dsigma_j|`` (issue #78), kept here as released (rescale beta to match the paper). The
reference is the same network with its LoRA adapter disabled, under no_grad (full fine-tuning: a frozen copy of
the starting weights, ``forward_process.frozen_snapshot`` as DGPO); beta = 0 skips its forward.

Trained steps, as released: the first ``int(T * timestep_fraction)`` steps in order, the same for every sample
(0.99 of T = 10: steps 0..8, never the last, near-data one). The learner recomputes each rollout micro-batch whole
(DanceGRPO's machinery), so the first ratio is exactly 1 on-policy (tests/test_flow_grpo.py).

Flow-GRPO-Fast (``fast_window`` W, ``train_sd3_fast.py`` and ``sd3_pipeline_with_logprob_fast.py``): each group draws a
window start uniformly from ``r0 .. r1 - W`` (:class:`RandomWindow`, from the group's seed so every worker of a spread
group and a regenerated group agree; the released code draws once per sampling call with Python's ``random``), samples
the W window steps with the SDE (or CPS) and every other step with Euler, and only the window's steps are recorded and
trained, in order. Released defaults (``*_fast_nocfg``): W = 3, range (0, T // 2), CPS eta 0.8, no CFG, beta 0, clip 1e-5.

GRPO-Guard (``guard: true``, Flow-SDE only; arXiv 2510.22319). With ``x_{j+1} = mu_old + s eps`` (``s`` the step's std)
and ``Delta = mu_theta - mu_old``, the element-mean log-ratio is ``mean(eps Delta) / s - mean(Delta^2) / (2 s^2)``: its
mean is below 0 and its spread scales with 1/s, which differs across steps, so the clip band misses over-confident
positive updates. RatioNorm (Eq. 8) undoes both, and the gradient reweighting (Eq. 12) equalises the steps::

    log rho_hat_ij = s_j (log rho_ij + mean_elements(Delta_ij^2) / (2 s_j^2))      (= mean(eps Delta), centred)
    L_ij           = delta_j sum_k w_k max(-A_k,i rho_hat_ij, -A_k,i clip(rho_hat_ij, 1 - eps, 1 + eps))
    delta_j        = 1 / (sigma_j - sigma_{j+1})

(delta = beta / dt with Flow-SDE's beta = 1 + a^2 / 2 constant, absorbed into the learning rate, as the paper does for
Flow-GRPO's SDE). ``mu_old`` needs the sampling policy's velocity: the learner evaluates it without gradients with a
snapshot of the weights taken when the update starts (the sampling weights, as ``train.max_staleness`` must be 0),
one extra forward per trained step. On-policy ``Delta = 0`` and ``log rho = 0`` bit for bit, so ``rho_hat`` is exactly 1.

Deviations from the released code: no EMA for evaluation/checkpoints (the released code evaluates an EMA, decay 0.9);
advantages per group rather than per prompt string; optimizer steps every ``grad_accum_samples`` samples (the released
code: twice per epoch); GRPO-Guard's old means come from a weight snapshot instead of being recorded at rollout.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from raygrpo.algorithms.base import RolloutSpec, StepDraws
from raygrpo.algorithms.dancegrpo import DanceGRPO, StepLoss, TrainedStep, clipped_surrogate, surrogate_gradient
from raygrpo.algorithms.forward_process import base_weights, frozen_snapshot
from raygrpo.config import Config, FlowGRPOConfig
from raygrpo.contracts import PromptGroup, Rollout
from raygrpo.learner.ema import ParameterShadow
from raygrpo.sampling.flow import flow_sde_g


@dataclass(frozen=True)
class RandomWindow:
    """Flow-GRPO-Fast's SDE window (an ``SdeWindow``): ``size`` steps starting uniformly in ``low .. high - size``,
    drawn from the group's seed (so deterministic in the group)."""

    size: int
    low: int
    high: int

    def bounds(self, group: PromptGroup, num_steps: int) -> tuple[int, int]:
        if not 0 <= self.low <= self.high - self.size or self.high > num_steps:
            raise ValueError(f"window of {self.size} steps in [{self.low}, {self.high}) does not fit the {num_steps} steps")
        # A stream of its own (the seed also draws the group's noise): the second word keeps the two apart.
        rng = np.random.default_rng(np.random.SeedSequence([group.seed, 0x57494E]))
        start = int(rng.integers(self.low, self.high - self.size + 1))
        return start, start + self.size


def rollout_spec(config: Config) -> RolloutSpec:
    algo: FlowGRPOConfig = config.algorithm
    window = None
    if algo.fast_window is not None:
        window = RandomWindow(algo.fast_window, *algo.window_range(config.rollout.num_steps))
    return RolloutSpec(algo.sampler, algo.noise_level, algo.shared_noise, record_trajectory=True, sde_window=window)


def kl_std(sampler: str, noise_level: float, sigmas: torch.Tensor) -> torch.Tensor:
    """``[T]`` the ``std_dev_t`` the released KL divides by: the Flow-SDE's ``g_j``, or CPS's step std (module docstring)."""
    sigma, sigma_next = sigmas[:-1].float(), sigmas[1:].float()  # [T] each
    if sampler == "cps":
        return sigma_next * float(np.sin(noise_level * np.pi / 2))
    return flow_sde_g(sigma, noise_level, sigma_max=float(sigmas[1]))


def kl_to_reference(b: torch.Tensor, v: torch.Tensor, v_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[n]`` ``b^2 mean_elements (v - v_ref)^2 / (2 std^2)``: the released KL of the step means ``mu = a x + b v``."""
    return (b * (v.float() - v_ref.float())).square().flatten(1).mean(dim=1) / (2 * std**2)


def ratio_norm(log_ratio: torch.Tensor, mean_shift_sq: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's RatioNorm (Eq. 8): ``s (log rho + mean(Delta^2) / (2 s^2))``, ``[n]`` from ``[n]`` and the step's std s."""
    return std * log_ratio + mean_shift_sq / (2 * std)


def guard_weight(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """GRPO-Guard's gradient reweighting (Eq. 12, Flow-SDE): ``1 / (sigma_j - sigma_{j+1})``."""
    return 1.0 / (sigma - sigma_next)


class FlowGRPO(DanceGRPO):
    """The learner half: DanceGRPO's per-(micro-batch, step) terms on ordered steps, plus the KL and GRPO-Guard."""

    on_policy_ratio = True  # rho (and GRPO-Guard's rho_hat) are exactly 1 before the first step on-policy

    def __init__(self, config: Config):
        super().__init__(config)
        self.algo: FlowGRPOConfig = config.algorithm
        self.spec = rollout_spec(config)

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        """The reference (LoRA off, or a frozen copy when beta > 0) and GRPO-Guard's snapshot of the update's start."""
        super().setup(model, parameters, lora)
        self.model = model
        self.frozen = frozen_snapshot(parameters, lora) if self.algo.beta > 0 else None
        self.old = ParameterShadow(parameters) if self.algo.guard else None

    def _reference(self) -> AbstractContextManager:
        return base_weights(self.model, self.frozen)

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """No randomness: every sample trains the same recorded steps in order (the window's, or the first
        int(T * fraction)). GRPO-Guard's snapshot takes the weights the update starts from (the sampling weights)."""
        if self.old is not None:
            self.old.update(0.0)
        positions = np.arange(self.algo.trained_step_count(len(example.sigmas) - 1))
        return StepDraws([[positions] * members for _ in range(total_groups)])

    def step_loss(self, policy, step: TrainedStep) -> StepLoss:
        """The surrogate (or GRPO-Guard's) of one trained step plus ``beta / n_steps * sum_i KL_i`` (module docstring)."""
        j = step.index
        # The shadows first: swapping weights in place after the policy's forward would corrupt its saved tensors.
        v_ref = self._velocity(policy, self._reference(), step) if self.algo.beta > 0 else None
        v_old = self._velocity(policy, self.old.swapped(), step) if self.old is not None else None
        v = policy.velocity(step.x, step.sigma, step.cond)  # [n, ...]
        # GRPO-Guard's loss is differentiable (autograd); the plain surrogate's gradient is given at v, its value summed
        # by DanceGRPO.loss_terms once per window group
        loss = output = gradient = None
        if v_old is None:
            gradient, ratio, log_ratio = surrogate_gradient(step.steps, step.x, v, step.x_next, j, step.old_log_prob, step.surrogate)
            output = v
        else:
            loss, ratio, log_ratio = self._guard_loss(step, v, v_old)
        extras = {}  # approx_kl: DanceGRPO.loss_terms, from the plain log-ratio
        if v_ref is not None:
            std = kl_std(self.spec.sampler, self.spec.noise_level, step.sigmas)[j]
            kl = kl_to_reference(step.steps.coefficients.b[j], v, v_ref, std)  # [n]
            n_steps = self.algo.trained_step_count(len(step.sigmas) - 1)
            kl_loss = self.algo.beta * kl.sum() / n_steps
            loss = kl_loss if loss is None else loss + kl_loss
            extras["kl"] = kl.detach().mean()
        return StepLoss(loss, ratio, log_ratio.detach(), extras, output, gradient, surrogate_in_loss=v_old is not None)

    @staticmethod
    def _velocity(policy, weights: AbstractContextManager, step: TrainedStep) -> torch.Tensor:
        """``[n, ...]`` the velocity under ``weights`` swapped in, without gradients."""
        with torch.no_grad(), weights:
            return policy.velocity(step.x, step.sigma, step.cond)

    def _guard_loss(self, step: TrainedStep, v: torch.Tensor, v_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(delta_j sum_{i,k} w_k max(-A rho_hat, -A clip(rho_hat)), rho_hat [n], log rho [n])`` with autograd."""
        j = step.index
        c = step.steps.coefficients
        log_ratio = step.steps.transition(step.x, v, j).log_prob(step.x_next) - step.old_log_prob  # [n]
        shift_sq = (c.b[j] * (v.float() - v_old.float())).square().flatten(1).mean(dim=1)  # [n] mean(Delta^2)
        ratio = torch.exp(ratio_norm(log_ratio, shift_sq, c.std[j]))  # [n] rho_hat
        surrogate = clipped_surrogate(ratio[:, None], step.advantages, self.algo.clip_range)  # [n, K]
        loss = guard_weight(step.sigmas[j], step.sigmas[j + 1]) * (step.weights * surrogate).sum()
        return loss, ratio.detach(), log_ratio
