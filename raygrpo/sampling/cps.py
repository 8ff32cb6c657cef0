"""Coefficients-Preserving Sampling (CPS, Wang & Yu, arXiv 2509.05952), Flow-GRPO's ``sde_type="cps"``.

Convention as :mod:`raygrpo.sampling.flow`: ``x_sigma = (1 - sigma) x0 + sigma eps``, ``v ~ eps - x0``. The
Flow-SDE injects noise whose variance is not matched by the drift, so its samples carry more noise than the
noise level they are labelled with (the paper's diagnosis). CPS instead re-mixes the step's two predictions so
that the coefficients of x0 and of the noise at ``sigma_next`` are exactly those of the forward process::

    x0_hat   = x - sigma v                        (predicted data)
    eps_hat  = x + (1 - sigma) v                  (predicted noise)
    std      = sigma_next sin(eta pi / 2)
    mean     = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) eps_hat
             = (1 - sigma_next) x0_hat + sigma_next cos(eta pi / 2) eps_hat
    x_next   = mean + std z,     z ~ N(0, I)

so ``x_next = (1 - sigma_next) x0_hat + sigma_next (cos eps_hat + sin z)`` with a unit-variance noise mix. Regrouped
by x and v (the affine form every sampler here has, :class:`~raygrpo.sampling.transition.StepCoefficients`),
with ``c = sigma_next cos(eta pi / 2)``::

    a = (1 - sigma_next) + c
    b = c (1 - sigma) - (1 - sigma_next) sigma

``eta = 0`` is the Euler ODE step (``a = 1``, ``b = sigma_next - sigma``); ``eta = 1`` draws fresh noise
(DDPM-like). The last step (``sigma_next = 0``) has ``std = 0``: it is deterministic, ``x_next = x0_hat``.

Log-probability: the released code (yifan123/flow_grpo, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
``sde_step_with_logprob(..., sde_type="cps")``) drops every constant of the Gaussian, the ``1/(2 std^2)`` included::

    log pi_cps(x_next | x) = -mean_elements (x_next - mean)^2

and we follow it exactly (:class:`CpsGridSteps`), where every other sampler uses the element-mean Gaussian of
:mod:`raygrpo.sampling.transition`. It is not a normalised density: the log-ratio of a step is the Gaussian one
times ``2 std^2``, which is small (std <= sigma_next), so ratios stay near 1 and Flow-GRPO clips them at 1e-5.
It is also finite at the deterministic last step (0 there), where a Gaussian log-density is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raygrpo.sampling.transition import GridSteps, StepCoefficients, Transition


def cps_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> StepCoefficients:
    """``(a, b, std)`` of the CPS step (module docstring), elementwise over float32 tensors of one shape."""
    angle = eta * math.pi / 2
    keep = sigma_next * math.cos(angle)  # sqrt(sigma_next^2 - std^2): the predicted noise's share
    data = 1 - sigma_next  # the predicted data's share
    return StepCoefficients(a=data + keep, b=keep * (1 - sigma) - data * sigma, std=sigma_next * math.sin(angle))


@dataclass
class CpsTransition(Transition):
    """A CPS step: sampled as any Gaussian step, its log-prob without the Gaussian's constants (module docstring)."""

    def log_prob(self, x_next: torch.Tensor) -> torch.Tensor:
        """``-mean_elements (x_next - mean)^2``, shape ``[B]`` float32 (finite where std is 0)."""
        return -(x_next.float() - self.mean).square().flatten(1).mean(dim=1)


@dataclass
class CpsGridSteps(GridSteps):
    """:class:`GridSteps` of the CPS sampler: its transitions and log-probs drop the Gaussian constants.

    ``GridSteps.log_prob_with_gradient`` computes ``mean_e(d^2) * precision - log_norm``; with ``precision = -1`` and
    ``log_norm = 0`` that is exactly :meth:`CpsTransition.log_prob`, bit for bit (``m * -1 - 0 == -m``), and its
    gradient ``d log pi / d v = 2 b (x_next - mean) / n``.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        std = self.coefficients.std
        self.precision, self.log_norm = torch.full_like(std, -1.0), torch.zeros_like(std)

    def transition(self, x: torch.Tensor, v: torch.Tensor, index: int | torch.Tensor) -> Transition:
        step = super().transition(x, v, index)
        return CpsTransition(step.mean, step.std, step.deterministic)


def cps_grid_steps(sigmas: torch.Tensor, eta: float) -> CpsGridSteps:
    """Every CPS step of schedule ``sigmas`` ([T+1]) at noise level ``eta`` in [0, 1]."""
    if not 0 <= eta <= 1:
        raise ValueError(f"the CPS noise level eta must be in [0, 1] (Flow-GRPO-Fast: 0.8), got {eta}")
    sigma, sigma_next = sigmas[:-1].float(), sigmas[1:].float()  # [T] each
    return CpsGridSteps(cps_coefficients(sigma, sigma_next, eta), deterministic=eta == 0)


__all__ = ["CpsGridSteps", "CpsTransition", "cps_coefficients", "cps_grid_steps"]
