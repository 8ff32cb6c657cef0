"""DDIM-eta steps (DDPO / DanceGRPO's SD recipe) written in flow coordinates, with log-probabilities.

A variance-preserving (VP) diffusion model such as Stable Diffusion 1.x/2.x noises data as::

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps

Dividing by ``s_t = sqrt(abar_t) + sqrt(1 - abar_t)`` gives the rectified-flow form every other
sampler of raygrpo works in (:mod:`raygrpo.sampling.flow`)::

    y = x_t / s_t = (1 - sigma) x0 + sigma eps,     sigma = sqrt(1 - abar_t) / s_t,     v = eps - x0

and back: ``r = sigma / (1 - sigma) = sqrt((1 - abar) / abar)``, so ``abar = 1 / (1 + r^2)``. The
Stable Diffusion adapter (:mod:`raygrpo.models.sd`) presents its UNet in these coordinates, so the
rollout worker and both algorithms stay velocity-based and unchanged.

DDIM step (Song et al., arXiv 2010.02502, Eq. 12 and 16; diffusers ``DDIMScheduler.step``, which
DDPO's and DanceGRPO's ``ddim_step_with_logprob`` extend with a log-prob). From ``t`` to ``prev``,
with ``a = abar_t``, ``a' = abar_prev``::

    x0_hat  = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)
    std_x   = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))
    mean_x  = sqrt(a') x0_hat + sqrt(1 - a' - std_x^2) eps_hat
    x_prev  = mean_x + std_x z,     z ~ N(0, I)

In flow coordinates ``x0_hat = y - sigma v`` and ``eps_hat = y + (1 - sigma) v`` (both follow from
``y = (1 - sigma) x0 + sigma eps`` and ``v = eps - x0``, whatever the network predicts), and the
step is the same Gaussian scaled by ``1 / s_prev``::

    mean_y = mean_x / s_prev,      std_y = std_x / s_prev,      y_prev = mean_y + std_y z

so with the same ``z`` the two samplers visit the very same states (``x = s y``); this module
computes the step from ``(y, v, sigma, sigma_prev, eta)`` only. With ``eta = 0`` the mean is exactly
the Euler step ``y + (sigma_prev - sigma) v``: DDIM is Euler in flow coordinates, so ODE rollouts
(DGPO) need nothing new.

Log-probability: the element-mean Gaussian of :class:`~raygrpo.sampling.transition.Transition`, in y. A
change of variables ``x = s_prev y`` shifts every element's log-density by ``log s_prev``::

    log p_y(y_prev | y) = log p_x(x_prev | x) + log s_prev

``s_prev`` depends only on the schedule, so rollout's and learner's log-probs carry the same
constant and it cancels in the ratio ``exp(log pi_theta - log pi_old)``: the ratio, the clip and
every gradient are exactly those of the x-space (DDPO/DanceGRPO) formula.

Differences from diffusers' ``step``: no ``clip_sample`` / ``thresholding`` (StableDiffusionPipeline
switches sample clipping off for SD configs), and ``prev`` is the next point of the grid the caller
passes (diffusers uses ``t - 1000 // T``, the same point for SD's ``leading`` spacing).
"""

from __future__ import annotations

import torch

from raygrpo.sampling.transition import StepCoefficients, Transition, batch_column


def sigma_to_alpha_bar(sigma: torch.Tensor) -> torch.Tensor:
    """``abar = 1 / (1 + r^2)`` with ``r = sigma / (1 - sigma)``: the VP noise level of a flow sigma (0 at sigma = 1)."""
    sigma = sigma.double() if sigma.dtype != torch.float64 else sigma
    one_minus = 1.0 - sigma
    # abar = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2): the same, finite at sigma = 1.
    return one_minus**2 / (one_minus**2 + sigma**2)


def alpha_bar_to_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    """``sigma = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))``, the inverse of :func:`sigma_to_alpha_bar`."""
    alpha_bar = alpha_bar.double()
    root_a, root_b = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    return root_b / (root_a + root_b)


def vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """``s = sqrt(abar) + sqrt(1 - abar)`` at a flow sigma, so that ``x_t = s * y`` (``s = 1`` at sigma 0 and 1)."""
    alpha_bar = sigma_to_alpha_bar(sigma)
    return alpha_bar.sqrt() + (1.0 - alpha_bar).sqrt()


def ddim_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: torch.Tensor) -> StepCoefficients:
    """``(a, b, std)`` of the DDIM-eta step (module docstring), elementwise over tensors of one shape; float64 inside, float32 out.

    ``mean = c_x0 x0_hat + c_eps eps_hat`` with ``x0_hat = y - sigma v`` and ``eps_hat = y + (1 - sigma) v``, regrouped
    by ``y`` and ``v``: ``a = c_x0 + c_eps``, ``b = c_eps (1 - sigma) - c_x0 sigma``.
    """
    sigma, sigma_next, eta = (t.double() for t in (sigma, sigma_next, eta))
    a, a_next = sigma_to_alpha_bar(sigma), sigma_to_alpha_bar(sigma_next)
    # DDIM's sigma_t(eta), Eq. 16; clamped at 0 against rounding when a_next == a.
    variance = ((1 - a_next) / (1 - a) * (1 - a / a_next)).clamp_min(0.0)
    std_x = eta * variance.sqrt()
    s_next = a_next.sqrt() + (1 - a_next).sqrt()
    coef_x0 = a_next.sqrt() / s_next  # = 1 - sigma_next when eta = 0
    coef_eps = (1 - a_next - std_x**2).clamp_min(0.0).sqrt() / s_next
    return StepCoefficients(
        a=(coef_x0 + coef_eps).float(), b=(coef_eps * (1 - sigma) - coef_x0 * sigma).float(), std=(std_x / s_next).float()
    )


def ddim_transition(
    x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor, eta: float | torch.Tensor
) -> Transition:
    """The DDIM-eta step from ``sigma`` to ``sigma_next`` in flow coordinates (module docstring), float32.

    ``x`` is y (``[B, ...]``), ``v`` the velocity ``eps_hat - x0_hat`` there; ``eta`` in [0, 1]
    (1: DDPM-like, DanceGRPO's SD recipe; 0: deterministic DDIM = Euler, std 0). The schedule
    coefficients are computed in float64 and applied in float32.
    """
    columns = (batch_column(t, x) for t in (sigma, sigma_next, eta))  # each [B, 1, ...]
    return ddim_coefficients(*columns).transition(x, v, deterministic=not isinstance(eta, torch.Tensor) and eta == 0)


__all__ = ["alpha_bar_to_sigma", "ddim_coefficients", "ddim_transition", "sigma_to_alpha_bar", "vp_scale"]
