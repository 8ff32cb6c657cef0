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
* Flow-SDE (Flow-GRPO, arXiv 2505.05470): ``g = a * sqrt(sigma / (1 - sigma))``; at sigma = 1 only the
  denominator's sigma becomes ``sigma_max`` (the schedule's second entry), so the first step has
  ``g = a / sqrt(1 - sigma_max)`` (see :func:`flow_sde_transition`).

With g = 0 both reduce to the ODE step exactly.

Each step is a :class:`~raygrpo.sampling.transition.Transition`, whose log-probability is the
element-mean Gaussian of reference doc §2.4. Every function takes tensors shaped ``[B, ...]``; sigma
arguments are python floats or tensors that broadcast against ``[B]``.
"""

from __future__ import annotations

import torch

from raygrpo.sampling.transition import StepCoefficients, Transition, batch_column


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """FLUX/SD3 time shift: ``s * sigma / (1 + (s - 1) * sigma)``; shift 1 is the identity."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sigma_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """DanceGRPO's schedule: ``linspace(1, 0, N + 1)`` then the time shift. Shape ``[N + 1]`` float32."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def sde_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, g: torch.Tensor) -> StepCoefficients:
    """``(a, b, std)`` of the shared-drift reverse SDE step, elementwise over float32 tensors of one shape.

    The module docstring's mean regrouped by ``x`` and ``v`` (Flow-GRPO's form), with ``dsigma = sigma_next - sigma``::

        mean = a x + b v,   a = 1 + dsigma g^2 / (2 sigma),   b = dsigma (1 + g^2 (1 - sigma) / (2 sigma)),   std = g sqrt(-dsigma)

    With g = 0 this is ``a = 1, b = dsigma``: the ODE step exactly.
    """
    dsigma = sigma_next - sigma  # negative
    drift = g * g / (2 * sigma)  # g^2 / (2 sigma)
    return StepCoefficients(a=1 + dsigma * drift, b=dsigma * (1 + drift * (1 - sigma)), std=g * torch.sqrt(-dsigma))


def sde_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, g: float | torch.Tensor
) -> Transition:
    """Mean and std of the shared-drift reverse SDE step (module docstring), all in float32.

    x and v are cast to float32 (the step overflows in bf16; Flow-GRPO casts for this reason)."""
    columns = (batch_column(t, x) for t in (sigma, sigma_next, g))  # each [B, 1, ...]
    return sde_coefficients(*columns).transition(x, v, deterministic=not isinstance(g, torch.Tensor) and g == 0)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
    """Deterministic Euler step ``x + (sigma_next - sigma) * v`` in float32."""
    x = x.float()
    dsigma = batch_column(sigma_next, x) - batch_column(sigma, x)
    return x + dsigma * v.float()


def dance_sde_transition(x, v, sigma, sigma_next, eta: float) -> Transition:
    """DanceGRPO's step: constant diffusion coefficient ``g = eta``."""
    return sde_transition(x, v, sigma, sigma_next, eta)


def flow_sde_transition(x, v, sigma, sigma_next, noise_level: float, sigma_max: float) -> Transition:
    """Flow-GRPO's step (arXiv 2505.05470): the shared-drift SDE with ``g = a * sqrt(sigma / (1 - sigma))``.

    At sigma = 1 the denominator would be 0, so there (and only there) it uses ``sigma_max``, the
    schedule's second entry, while the numerator keeps sigma = 1::

        g = a * sqrt(sigma / (1 - sigma))        sigma < 1
        g = a * sqrt(1 / (1 - sigma_max))        sigma = 1 (the first step of a grid that starts at pure noise)

    Source: Flow-GRPO's ``sde_step_with_logprob`` (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
    yifan123/flow_grpo at 54809b5, ``sde_type="sde"``) takes ``sigma_max = scheduler.sigmas[1]`` and
    substitutes it for sigma only inside ``1 - sigma``. Putting ``sigma_max`` in the numerator as well
    would shrink the first step's std by ``sqrt(sigma_max)`` (1.8% for 10 steps at shift 3).
    Since step 0 goes to ``sigma_next = sigma_max``, its std is exactly ``g sqrt(1 - sigma_max) = a``. The
    drift keeps sigma = 1 too, where ``(1 - sigma) v`` vanishes: ``mean = x + dsigma (v + g^2 x / 2)``.
    """
    s = batch_column(sigma, x)  # [B, 1, ...]
    transition = sde_transition(x, v, s, sigma_next, flow_sde_g(s, noise_level, sigma_max))
    transition.deterministic = noise_level == 0
    return transition


def flow_sde_g(sigma: torch.Tensor, noise_level: float, sigma_max: float) -> torch.Tensor:
    """Flow-GRPO's diffusion coefficient at ``sigma`` (any shape, float32): see :func:`flow_sde_transition`."""
    denominator = 1 - torch.where(sigma >= 1.0, torch.full_like(sigma, sigma_max), sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def predicted_x0(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``x0_hat = x - sigma * v``: the clean sample implied by one velocity prediction."""
    x = x.float()
    return x - batch_column(sigma, x) * v.float()
