"""Samplers: the denoising steps rollout takes and the learner re-evaluates."""

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

__all__ = [
    "SAMPLERS",
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
