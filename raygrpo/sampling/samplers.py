"""The samplers by name: the step of each (``step_transition``) and the noise-level grid it walks (``sigma_grid``).

Rollout and learner both go through :func:`step_transition`, so the learner recomputes exactly the
Gaussian that rollout sampled from. The steps themselves live in :mod:`raygrpo.sampling.flow`
(ODE, Dance-SDE, Flow-SDE) and :mod:`raygrpo.sampling.ddim` (DDIM-eta); this module only dispatches.
"""

from __future__ import annotations

import torch

from raygrpo.sampling.ddim import ddim_transition
from raygrpo.sampling.flow import dance_sde_transition, flow_sde_transition, ode_step, sigma_schedule
from raygrpo.sampling.ode import dpm_flow_sigmas
from raygrpo.sampling.transition import Transition, batch_column

SAMPLERS = ("ode", "dance_sde", "flow_sde", "ddim")
"""``ddim``: DDIM-eta for variance-preserving models in flow coordinates (:mod:`raygrpo.sampling.ddim`)."""


def step_transition(
    sampler: str, noise_level: float, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, index: int | torch.Tensor
) -> Transition:
    """The transition of step ``index`` of schedule ``sigmas`` ([T+1]) for one of :data:`SAMPLERS`.

    ``noise_level`` is eta for ``dance_sde`` and ``ddim``, a for ``flow_sde`` and ignored by ``ode``. ``index`` may be
    a ``[B]`` tensor when the samples of a batch sit at different steps (the learner's random subsets).
    ``flow_sde`` takes its ``sigma_max`` from ``sigmas[1]``, as Flow-GRPO takes ``scheduler.sigmas[1]``.
    """
    sigma, sigma_next = sigmas[index], sigmas[torch.as_tensor(index) + 1]
    if sampler == "ode":
        mean = ode_step(x, v, sigma, sigma_next)
        return Transition(mean=mean, std=torch.zeros_like(batch_column(sigma, mean)))
    if sampler == "dance_sde":
        return dance_sde_transition(x, v, sigma, sigma_next, noise_level)
    if sampler == "flow_sde":
        return flow_sde_transition(x, v, sigma, sigma_next, noise_level, sigma_max=float(sigmas[1]))
    if sampler == "ddim":
        return ddim_transition(x, v, sigma, sigma_next, noise_level)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def sigma_grid(sampler: str, num_steps: int, shift: float) -> torch.Tensor:
    """The rollout's noise levels ``[T+1]``: diffusers' flow-DPMSolver grid for ``dpmpp_2m`` (DGPO),
    else DanceGRPO's shifted ``linspace(1, 0, T+1)``. Flow families only: a VP model's grid (``ddim``) comes
    from its own scheduler, ``StableDiffusionModel.sigma_grid``."""
    if sampler == "ddim":
        raise ValueError("the ddim grid depends on the model's noise schedule: use the model adapter's sigma_grid (family sd)")
    return dpm_flow_sigmas(num_steps, shift) if sampler == "dpmpp_2m" else sigma_schedule(num_steps, shift)


__all__ = ["SAMPLERS", "sigma_grid", "step_transition"]
