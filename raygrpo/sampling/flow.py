"""Rectified-flow sampling steps with per-step log-probabilities.

Convention (DanceGRPO and Flow-GRPO alike): ``x_sigma = (1 - sigma) * x0 + sigma * eps`` with
sigma = 1 pure noise and sigma = 0 data; the network predicts the velocity ``v ~ eps - x0``.
Sampling walks sigma from 1 down to 0 (``dsigma = sigma_next - sigma < 0``).

ODE (Euler) step::

    x_next = x + dsigma * v

Reverse SDE sharing the ODE's marginals, one Euler-Maruyama step (reference doc §2.1)::

    score  = -(x + (1 - sigma) * v) / sigma          # = -(x - (1-sigma) x0_hat) / sigma^2
    mean   = x + dsigma * (v - g^2 / 2 * score)
           = x + dsigma * (v + g^2 / (2 sigma) * (x + (1 - sigma) * v))
    std    = g * sqrt(-dsigma)
    x_next = mean + std * z,   z ~ N(0, I)

The two papers differ only in the diffusion coefficient g:

* Dance-SDE (DanceGRPO, arXiv 2505.07818): ``g = eta`` (constant; eta = 0.3 for FLUX).
* Flow-SDE (Flow-GRPO, arXiv 2505.05470): ``g = a * sqrt(sigma / (1 - sigma))``, with sigma = 1
  replaced by ``sigma_max`` = the schedule's second entry to avoid dividing by zero.

With g = 0 both reduce to the ODE step exactly.

Log-probability (§2.4): the Gaussian log-density averaged (not summed) over every latent element,
computed in float32::

    log pi(x_next | x) = mean_elements[ -(x_next - mean)^2 / (2 std^2) - log std - log(2 pi) / 2 ]

Every function takes tensors shaped ``[B, ...]``; sigma arguments are python floats or tensors that
broadcast against ``[B]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """FLUX/SD3 time shift: ``s * sigma / (1 + (s - 1) * sigma)``; shift 1 is the identity."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sigma_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """DanceGRPO's schedule: ``linspace(1, 0, N + 1)`` then the time shift. Shape ``[N + 1]`` float32."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


@dataclass
class Transition:
    """The Gaussian policy of one denoising step: ``x_next ~ N(mean, std^2 I)``."""

    mean: torch.Tensor  # [B, ...] float32
    std: torch.Tensor  # [B, 1, ...] float32, broadcastable against mean; 0 for the ODE

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``x_next``; pass ``noise`` to reuse a given z (tests), else z comes from ``generator``."""
        if noise is None:
            # Drawn where the generator lives (CPU generators keep runs reproducible on any device).
            where = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=where).to(self.mean.device)
        return self.mean + self.std * noise

    def log_prob(self, x_next: torch.Tensor) -> torch.Tensor:
        """Element-mean Gaussian log-density of ``x_next``, shape ``[B]`` float32."""
        if bool((self.std <= 0).any()):
            raise ValueError("log_prob needs std > 0: the ODE step (g = 0) is deterministic and has no density")
        std = self.std.float()
        log_density = -((x_next.float() - self.mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI  # [B, ...]
        return log_density.flatten(1).mean(dim=1)  # [B]


def _as_batch_column(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[B]`` tensor as float32 shaped ``[B, 1, ..., 1]`` to broadcast over ``like``."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if tensor.ndim == 0:
        tensor = tensor.expand(like.shape[0])
    return tensor.reshape(-1, *([1] * (like.ndim - 1)))


def sde_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, g: float | torch.Tensor
) -> Transition:
    """Mean and std of the shared-drift reverse SDE step (module docstring), all in float32."""
    x, v = x.float(), v.float()  # [B, ...]; the step overflows in bf16 (Flow-GRPO casts for this reason)
    sigma, sigma_next, g = (_as_batch_column(t, x) for t in (sigma, sigma_next, g))  # [B, 1, ...]
    dsigma = sigma_next - sigma  # [B, 1, ...], negative
    mean = x + dsigma * (v + g**2 / (2 * sigma) * (x + (1 - sigma) * v))  # [B, ...]
    std = g * torch.sqrt(-dsigma)  # [B, 1, ...]
    return Transition(mean=mean, std=std)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
    """Deterministic Euler step ``x + (sigma_next - sigma) * v`` in float32."""
    x = x.float()
    dsigma = _as_batch_column(sigma_next, x) - _as_batch_column(sigma, x)
    return x + dsigma * v.float()


def dance_sde_transition(x, v, sigma, sigma_next, eta: float) -> Transition:
    """DanceGRPO's step: constant diffusion coefficient ``g = eta``."""
    return sde_transition(x, v, sigma, sigma_next, eta)


def flow_sde_transition(x, v, sigma, sigma_next, noise_level: float, sigma_max: float) -> Transition:
    """Flow-GRPO's step: ``g = a * sqrt(sigma / (1 - sigma))``, sigma = 1 replaced by ``sigma_max``."""
    s = _as_batch_column(sigma, x.float())
    s_for_g = torch.where(s >= 1.0, torch.full_like(s, sigma_max), s)
    g = noise_level * torch.sqrt(s_for_g / (1 - s_for_g))
    return sde_transition(x, v, sigma, sigma_next, g.flatten())


def predicted_x0(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``x0_hat = x - sigma * v``: the clean sample implied by one velocity prediction."""
    x = x.float()
    return x - _as_batch_column(sigma, x) * v.float()


SAMPLERS = ("ode", "dance_sde", "flow_sde", "ddim")
"""``ddim``: DDIM-eta for variance-preserving models in flow coordinates (:mod:`raygrpo.sampling.ddim`)."""


def step_transition(
    sampler: str, noise_level: float, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, index: int | torch.Tensor
) -> Transition:
    """The transition of step ``index`` of schedule ``sigmas`` ([T+1]) for one of :data:`SAMPLERS`.

    ``noise_level`` is eta for ``dance_sde`` and ``ddim``, a for ``flow_sde`` and ignored by ``ode``. ``index`` may be
    a ``[B]`` tensor when the samples of a batch sit at different steps (the learner's random subsets).
    Rollout and learner both go through here, so the learner recomputes exactly what rollout sampled.
    """
    sigma, sigma_next = sigmas[index], sigmas[torch.as_tensor(index) + 1]
    if sampler == "ode":
        mean = ode_step(x, v, sigma, sigma_next)
        return Transition(mean=mean, std=torch.zeros_like(_as_batch_column(sigma, mean)))
    if sampler == "dance_sde":
        return dance_sde_transition(x, v, sigma, sigma_next, noise_level)
    if sampler == "flow_sde":
        return flow_sde_transition(x, v, sigma, sigma_next, noise_level, sigma_max=float(sigmas[1]))
    if sampler == "ddim":
        from raygrpo.sampling.ddim import ddim_transition  # here, not at the top: ddim builds on this module

        return ddim_transition(x, v, sigma, sigma_next, noise_level)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
