"""The samplers by name: the steps of each (``grid_steps``, ``step_transition``) and the noise-level grid it walks (``sigma_grid``).

Rollout and learner both go through :func:`grid_steps`, so the learner recomputes exactly the
Gaussian that rollout sampled from. The steps themselves live in :mod:`raygrpo.sampling.flow`
(ODE, Dance-SDE, Flow-SDE) and :mod:`raygrpo.sampling.ddim` (DDIM-eta); this module only dispatches.
"""

from __future__ import annotations

import torch

from raygrpo.sampling.cps import cps_grid_steps
from raygrpo.sampling.ddim import ddim_coefficients
from raygrpo.sampling.flow import flow_sde_g, sde_coefficients, sigma_schedule
from raygrpo.sampling.ode import dpm_flow_sigmas
from raygrpo.sampling.transition import GridSteps, StepCoefficients, Transition

SAMPLERS = ("ode", "dance_sde", "flow_sde", "ddim", "cps")
"""``ddim``: DDIM-eta for variance-preserving models in flow coordinates (:mod:`raygrpo.sampling.ddim`); ``cps``:
Coefficients-Preserving Sampling with the released code's constant-free log-prob (:mod:`raygrpo.sampling.cps`)."""


def grid_steps(sampler: str, noise_level: float, sigmas: torch.Tensor) -> GridSteps:
    """Every step of schedule ``sigmas`` ([T+1]) for one of :data:`SAMPLERS`, its coefficients computed once.

    ``noise_level`` is eta for ``dance_sde``, ``ddim`` and ``cps``, a for ``flow_sde`` and ignored by ``ode``.
    ``flow_sde`` takes its ``sigma_max`` from ``sigmas[1]``, as Flow-GRPO takes ``scheduler.sigmas[1]``.
    Rollout and learner build it once per group and take each step from it (:meth:`GridSteps.transition`).
    """
    if sampler == "cps":
        return cps_grid_steps(sigmas, noise_level)  # its own log-prob (no Gaussian constants)
    sigma, sigma_next = sigmas[:-1].float(), sigmas[1:].float()  # [T] each
    if sampler == "ode":
        coefficients = StepCoefficients(torch.ones_like(sigma), sigma_next - sigma, torch.zeros_like(sigma))
    elif sampler == "dance_sde":
        coefficients = sde_coefficients(sigma, sigma_next, torch.full_like(sigma, noise_level))
    elif sampler == "flow_sde":
        coefficients = sde_coefficients(sigma, sigma_next, flow_sde_g(sigma, noise_level, sigma_max=float(sigmas[1])))
    elif sampler == "ddim":
        coefficients = ddim_coefficients(sigma, sigma_next, torch.full_like(sigma, noise_level))
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    return GridSteps(coefficients, deterministic=sampler == "ode" or noise_level == 0)


def step_transition(
    sampler: str, noise_level: float, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, index: int | torch.Tensor
) -> Transition:
    """The transition of step ``index`` of schedule ``sigmas`` ([T+1]) from ``x`` with velocity ``v``: one step of
    :func:`grid_steps` (which a loop over many steps should build once). ``index`` may be a ``[B]`` tensor when the
    samples of a batch sit at different steps."""
    return grid_steps(sampler, noise_level, sigmas).transition(x, v, index)


def sigma_grid(sampler: str, num_steps: int, shift: float) -> torch.Tensor:
    """The rollout's noise levels ``[T+1]``: diffusers' flow-DPMSolver grid for ``dpmpp_2m`` (DGPO),
    else DanceGRPO's shifted ``linspace(1, 0, T+1)``. Flow families only: a VP model's grid (``ddim``) comes
    from its own scheduler, ``StableDiffusionModel.sigma_grid``."""
    if sampler == "ddim":
        raise ValueError("the ddim grid depends on the model's noise schedule: use the model adapter's sigma_grid (family sd)")
    return dpm_flow_sigmas(num_steps, shift) if sampler == "dpmpp_2m" else sigma_schedule(num_steps, shift)


__all__ = ["SAMPLERS", "grid_steps", "sigma_grid", "step_transition"]
