"""Samplers: the denoising steps rollout takes and the learner re-evaluates."""

from raygrpo.sampling.ddim import alpha_bar_to_sigma, ddim_transition, sigma_to_alpha_bar, vp_scale
from raygrpo.sampling.flow import (
    SAMPLERS,
    Transition,
    dance_sde_transition,
    flow_sde_transition,
    ode_step,
    predicted_x0,
    sde_transition,
    shift_sigmas,
    sigma_schedule,
    step_transition,
)
from raygrpo.sampling.ode import ODE_SOLVERS, dpm_flow_sigmas, make_ode_solver


def sigma_grid(sampler: str, num_steps: int, shift: float):
    """The rollout's noise levels ``[T+1]``: diffusers' flow-DPMSolver grid for ``dpmpp_2m`` (DGPO),
    else DanceGRPO's shifted ``linspace(1, 0, T+1)``. Flow families only: a VP model's grid (``ddim``) comes
    from its own scheduler, ``StableDiffusionModel.sigma_grid``."""
    if sampler == "ddim":
        raise ValueError("the ddim grid depends on the model's noise schedule: use the model adapter's sigma_grid (family sd)")
    return dpm_flow_sigmas(num_steps, shift) if sampler == "dpmpp_2m" else sigma_schedule(num_steps, shift)


__all__ = [
    "ODE_SOLVERS",
    "dpm_flow_sigmas",
    "make_ode_solver",
    "sigma_grid",
    "SAMPLERS",
    "alpha_bar_to_sigma",
    "ddim_transition",
    "sigma_to_alpha_bar",
    "vp_scale",
    "Transition",
    "dance_sde_transition",
    "flow_sde_transition",
    "ode_step",
    "predicted_x0",
    "sde_transition",
    "shift_sigmas",
    "sigma_schedule",
    "step_transition",
]
