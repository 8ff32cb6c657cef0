"""Deterministic ODE solvers for rectified-flow rollouts (DGPO samples with DPM-Solver++(2M)).

Convention (as in :mod:`raygrpo.sampling.flow`): ``x_sigma = (1 - sigma) x0 + sigma eps``, sigma walks
from ~1 (noise) down to 0 (data), the network predicts the velocity ``v ~ eps - x0``.

Euler
-----
``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i`` (:func:`raygrpo.sampling.flow.ode_step`).

DPM-Solver++(2M), flow parameterisation
----------------------------------------
Source: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
arXiv 2211.01095 (Alg. 2, multistep second order, data prediction), in the form diffusers'
``DPMSolverMultistepScheduler`` implements with ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
``solver_type="midpoint"``, ``prediction_type="flow_prediction"``, ``use_flow_sigmas=True`` — the
"Flow-DPMSolver" of Sana, which DGPO (arXiv 2510.08425) uses for its rollouts.

A rectified flow is a Gaussian path with ``alpha_t = 1 - sigma_t`` and noise level ``sigma_t``; its
half-log-SNR and the data prediction implied by a velocity are::

    lambda_t = log(alpha_t) - log(sigma_t)
    x0_i     = x_i - sigma_i v_i                      (diffusers' flow_prediction conversion)

With ``s = sigma_i`` (current), ``t = sigma_{i+1}`` (next), ``h = lambda_t - lambda_s``:

* first order, DPM-Solver++(1) = DDIM in data prediction::

      x_{i+1} = (sigma_t / sigma_s) x_i - alpha_t (exp(-h) - 1) x0_i

* second order, multistep, midpoint type (diffusers' ``solver_type="midpoint"``)::

      h_prev = lambda_s - lambda_{sigma_{i-1}},  r0 = h_prev / h
      D0 = x0_i,  D1 = (x0_i - x0_{i-1}) / r0
      x_{i+1} = (sigma_t / sigma_s) x_i - alpha_t (exp(-h) - 1) (D0 + D1 / 2)

  i.e. the first-order update applied to the extrapolated data prediction
  ``x0_i + (h / (2 h_prev)) (x0_i - x0_{i-1})``.

Which order each step uses follows diffusers' ``step``: first order at step 0 (no history), at the final
step when ``lower_order_final`` and at any step into sigma = 0; second order otherwise. (diffusers gates
``lower_order_final`` on fewer than 15 steps, but with ``final_sigmas_type="zero"`` it always takes the
last step at first order, so for every grid ending at 0 — all DGPO uses — the two agree.)

Closed-form coefficients (why no logs appear in the code)
---------------------------------------------------------
``exp(-h) = (alpha_s sigma_t) / (sigma_s alpha_t)``, so the first-order coefficient is
``-alpha_t (exp(-h) - 1) = alpha_t - alpha_s sigma_t / sigma_s``, finite at both ends of the flow:

* sigma_t = 0 (final step): lambda_t = +inf, exp(-h) = 0 and the update returns ``x0_i`` exactly.
* sigma_s = 1 (a grid that starts at pure noise): alpha_s = 0, lambda_s = -inf, exp(-h) = 0 again and
  the step is finite. diffusers sidesteps this by starting its flow grid at ``shift(1 - 1/1000)``
  (0.9997 for shift 3, see :func:`dpm_flow_sigmas`); here a grid starting at exactly 1 is accepted and
  the exact limits are taken. The cost: at step 1, h_prev = +inf, so r0 = inf and D1 = 0 — step 1 is
  first order too. Use :func:`dpm_flow_sigmas` to get diffusers' (and DGPO's) behaviour.

Substituting ``x0 = x - sigma_s v`` into the first-order update gives ``x + (sigma_t - sigma_s) v``:
in the flow parameterisation DPM-Solver++(1) *is* the Euler step, so the two solvers differ only by the
second-order correction ``(alpha_t - alpha_s sigma_t / sigma_s) D1 / 2``.

The step coefficients are scalars per grid point, computed once in float64 from the float32 grid (the
same grid values diffusers uses); the tensor arithmetic runs in float32, as diffusers upcasts to.
"""

from __future__ import annotations

import hashlib
import math
from typing import Protocol

import torch
from torch import Tensor

from raygrpo.sampling.flow import ode_step, shift_sigmas

ODE_SOLVERS = ("euler", "dpmpp_2m", "consistency")
"""``consistency``: LCM's multistep sampling of a few-step (consistency) student, :class:`ConsistencySampler`."""


class OdeSolver(Protocol):
    """One deterministic sampling loop over a fixed sigma grid ``[T + 1]``."""

    def step(self, x: Tensor, v: Tensor, index: int) -> Tensor:
        """Map ``x`` at ``sigmas[index]`` to ``sigmas[index + 1]`` given the velocity ``v`` there."""
        ...


def dpm_flow_sigmas(num_steps: int, shift: float, *, num_train_timesteps: int = 1000) -> Tensor:
    """The sigma grid of diffusers' Flow-DPMSolver (``use_flow_sigmas``, ``flow_shift``, final sigma 0).

    diffusers spaces ``1 - linspace(1, 1/num_train_timesteps, T + 1)`` (so the first sigma is
    ``1 - 1/1000``, never 1, keeping lambda finite), applies the time shift, and replaces the smallest
    entry by 0. Computed in float64 and cast to float32 as diffusers does, which reproduces
    ``scheduler.sigmas`` bit for bit. Shape ``[T + 1]`` float32.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    unshifted = 1.0 - torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1, dtype=torch.float64)  # [T+1] up
    sigmas = shift_sigmas(unshifted, shift).flip(0)  # [T+1], descending; the last entry is shift(0) = 0
    sigmas[-1] = 0.0  # diffusers drops shift(0) and appends final_sigmas_type="zero"; the same value, made explicit
    return sigmas.float()


def _validated_grid(sigmas: Tensor) -> list[float]:
    """The grid as python floats after checking it is a strictly decreasing 1-D path inside [0, 1]."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D grid [T+1] with T >= 1, got shape {tuple(sigmas.shape)}")
    grid = [float(s) for s in sigmas.detach().to("cpu", torch.float32)]
    if not (grid[0] <= 1.0 and grid[-1] >= 0.0):
        raise ValueError(f"sigmas must lie in [0, 1], got {grid[0]} ... {grid[-1]}")
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError("sigmas must be strictly decreasing (noise -> data)")
    return grid


class _SequentialSolver:
    """Shared bookkeeping: the grid and the 0, 1, 2, ... call order every solver here enforces.

    Euler does not need the order, but enforcing it for every solver keeps them interchangeable in the
    same loop: a loop that is wrong for the multistep solver fails with Euler as well.
    """

    def __init__(self, sigmas: Tensor):
        self._grid = _validated_grid(sigmas)
        self.sigmas = torch.tensor(self._grid, dtype=torch.float32)  # [T+1], exactly the values stepped on
        self.num_steps = len(self._grid) - 1
        self._next_index = 0

    def _check_index(self, index: int) -> None:
        if index != self._next_index:
            raise RuntimeError(
                f"{type(self).__name__}.step called with index {index}, expected {self._next_index}: steps must "
                f"run 0, 1, ..., {self.num_steps - 1} in order on one solver object per sampling loop"
            )
        if index >= self.num_steps:
            raise RuntimeError(f"{type(self).__name__} has only {self.num_steps} steps; index {index} is past the end")
        self._next_index += 1


class EulerSolver(_SequentialSolver):
    """``x + (sigma_{i+1} - sigma_i) v`` on a fixed grid; float32 in and out."""

    def step(self, x: Tensor, v: Tensor, index: int) -> Tensor:
        self._check_index(index)
        return ode_step(x, v, self._grid[index], self._grid[index + 1])


class DPMSolverPP2M(_SequentialSolver):
    """DPM-Solver++(2M), data prediction, midpoint correction, flow parameterisation (module docstring).

    Stateful: it remembers the previous step's data prediction, so use one object per sampling loop
    and call ``step`` with index 0, 1, 2, ... Matches diffusers' ``DPMSolverMultistepScheduler`` in
    the Flow-DPMSolver configuration step for step.
    """

    def __init__(self, sigmas: Tensor, lower_order_final: bool = True):
        super().__init__(sigmas)
        self.lower_order_final = lower_order_final
        self._prev_x0: Tensor | None = None  # x0_{i-1}, [B, ...] float32
        grid = self._grid
        # Per-step scalars (float64 on the host): x_{i+1} = ratio_i x_i + data_coef_i D_i.
        self._ratio = [grid[i + 1] / grid[i] for i in range(self.num_steps)]
        self._data_coef = [(1 - grid[i + 1]) - (1 - grid[i]) * grid[i + 1] / grid[i] for i in range(self.num_steps)]
        lambdas = [_half_log_snr(s) for s in grid]  # [-inf when sigma = 1, +inf when sigma = 0]
        # D1 / 2 = (h / (2 h_prev)) (x0_i - x0_{i-1}); 0 when h_prev is infinite (grid starting at sigma 1).
        self._correction = [0.0] * self.num_steps
        for i in range(1, self.num_steps):
            if math.isfinite(lambdas[i + 1]):  # steps into sigma = 0 are always first order
                self._correction[i] = 0.5 * (lambdas[i + 1] - lambdas[i]) / (lambdas[i] - lambdas[i - 1])

    def _second_order(self, index: int) -> bool:
        if index == 0 or self._grid[index + 1] == 0.0:
            return False
        return not (self.lower_order_final and index == self.num_steps - 1)

    def step(self, x: Tensor, v: Tensor, index: int) -> Tensor:
        self._check_index(index)
        x, v = x.float(), v.float()  # [B, ...]; diffusers upcasts the update to float32 as well
        x0 = x - self._grid[index] * v  # [B, ...] data prediction
        data = x0
        if self._second_order(index):
            if self._prev_x0 is None or self._prev_x0.shape != x0.shape:
                raise RuntimeError("DPMSolverPP2M lost its history: the batch shape changed inside one sampling loop")
            data = x0 + self._correction[index] * (x0 - self._prev_x0)
        self._prev_x0 = x0
        return self._ratio[index] * x + self._data_coef[index] * data


class ConsistencySampler(_SequentialSolver):
    """Multistep sampling of a consistency model (LCM, Luo et al., arXiv 2310.04378, Algorithm 3; diffusers'
    ``LCMScheduler.step``): at each level the model's clean prediction, then fresh noise to the next level::

        x0_i    = x_i - sigma_i v_i                               (the consistency function in flow coordinates)
        x_{i+1} = (1 - sigma_{i+1}) x0_i + sigma_{i+1} eps_i       eps_i ~ N(0, I);  the last step returns x0_{T-1}

    A one-level grid ``[sigma_0, 0]`` is one-step generation, ``x0 = x - sigma_0 v`` (Diff-Instruct*'s generator).

    Deviation: ``step`` takes no generator (every solver here has one call form, used alike by rollout, continuous
    batching, eval and the guard), so each row draws its eps_i from a generator seeded with a digest of its own
    starting noise and the step index: a sample's draws are its own, reproducible, and the same whatever other rows
    share its forward (continuous batching).
    """

    def __init__(self, sigmas: Tensor):
        super().__init__(sigmas)
        self._seeds: list[int] = []

    def step(self, x: Tensor, v: Tensor, index: int) -> Tensor:
        self._check_index(index)
        x, v = x.float(), v.float()  # [B, ...]
        if index == 0:
            self._seeds = [_row_seed(row) for row in x]
        x0 = x - self._grid[index] * v  # [B, ...] the clean prediction
        sigma_next = self._grid[index + 1]
        if sigma_next == 0.0:
            return x0
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s + index)) for s in self._seeds])  # [B, ...]
        return (1 - sigma_next) * x0 + sigma_next * noise.to(x.device)


def _row_seed(row: Tensor) -> int:
    """A 62-bit seed from one row's float32 bytes (its starting noise); 0 for a tensor without values (the planner's fake tensors)."""
    if type(row) is not torch.Tensor:
        return 0
    digest = hashlib.blake2b(row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _half_log_snr(sigma: float) -> float:
    """``lambda = log(1 - sigma) - log(sigma)`` with the infinite ends made explicit (math.log(0) raises)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def make_ode_solver(name: str, sigmas: Tensor) -> OdeSolver:
    """A fresh solver of kind ``name`` (one of :data:`ODE_SOLVERS`) for one sampling loop over ``sigmas``."""
    if name == "euler":
        return EulerSolver(sigmas)
    if name == "dpmpp_2m":
        return DPMSolverPP2M(sigmas)
    if name == "consistency":
        return ConsistencySampler(sigmas)
    raise ValueError(f"unknown ODE solver {name!r}; choose one of {ODE_SOLVERS}")
