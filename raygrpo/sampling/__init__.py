"""Samplers: the denoising steps rollout takes and the learner re-evaluates.

Modules, each depending only on those above it:

- ``transition``: :class:`Transition`, the Gaussian of one step and its element-mean log-prob; every step is
  affine in (x, v) (:class:`StepCoefficients`), so a grid's steps are computed once (:class:`GridSteps`);
- ``flow``: rectified-flow steps (ODE, Dance-SDE, Flow-SDE) and DanceGRPO's sigma schedule;
- ``ddim``: DDIM-eta for variance-preserving models, in flow coordinates;
- ``cps``: Coefficients-Preserving Sampling (Flow-GRPO's ``sde_type="cps"``), its log-prob without Gaussian constants;
- ``ode``: deterministic solvers (Euler, DPM-Solver++(2M)) for DGPO and evaluation;
- ``samplers``: the samplers by name (:func:`grid_steps`, :func:`step_transition`, :func:`sigma_grid`).
"""

from raygrpo.sampling.cps import CpsGridSteps, cps_coefficients, cps_grid_steps
from raygrpo.sampling.ddim import alpha_bar_to_sigma, ddim_transition, sigma_to_alpha_bar, vp_scale
from raygrpo.sampling.flow import (
    dance_sde_transition,
    flow_sde_transition,
    ode_step,
    predicted_x0,
    sde_transition,
    shift_sigmas,
    sigma_schedule,
)
from raygrpo.sampling.ode import ODE_SOLVERS, dpm_flow_sigmas, make_ode_solver
from raygrpo.sampling.samplers import SAMPLERS, grid_steps, sigma_grid, step_transition
from raygrpo.sampling.transition import GridSteps, StepCoefficients, Transition

__all__ = [
    "ODE_SOLVERS",
    "CpsGridSteps",
    "cps_coefficients",
    "cps_grid_steps",
    "dpm_flow_sigmas",
    "make_ode_solver",
    "grid_steps",
    "sigma_grid",
    "SAMPLERS",
    "alpha_bar_to_sigma",
    "ddim_transition",
    "sigma_to_alpha_bar",
    "vp_scale",
    "GridSteps",
    "StepCoefficients",
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
