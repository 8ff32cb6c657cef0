"""The Gaussian policy of one denoising step, shared by every sampler (flow SDEs, DDIM-eta).

Every sampler's step is affine in the current state and the network's velocity (the flow SDEs of
:mod:`raygrpo.sampling.flow`, DDIM-eta of :mod:`raygrpo.sampling.ddim`, and the ODE with ``std = 0``)::

    x_next ~ N(mean, std^2 I),     mean = a x + b v,     (a, b, std) scalars of the step and noise level

Each sampler computes its ``(a, b, std)`` (:class:`StepCoefficients`) elementwise, for one step or for a
whole grid at once (:class:`GridSteps`: once per group on either side, so a step costs two multiplies and
an add); rollout draws from the :class:`Transition` and the learner evaluates its log-density (reference
doc §2.4)::

    log pi(x_next | x) = mean_elements[ -(x_next - mean)^2 / (2 std^2) - log std - log(2 pi) / 2 ]
                       = -mean_elements[(x_next - mean)^2] / (2 std^2) - log std - log(2 pi) / 2

The reduction is a mean over all latent elements (not a sum), computed in float32, as in both
DanceGRPO and Flow-GRPO (std is one value per sample, so it leaves the mean). This module depends on
no sampler, so every sampler module can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass
class Transition:
    """The Gaussian policy of one denoising step: ``x_next ~ N(mean, std^2 I)``."""

    mean: torch.Tensor  # [B, ...] float32
    std: torch.Tensor  # [B, 1, ...] float32, broadcastable against mean; 0 for the ODE
    deterministic: bool = False  # std is 0 (the ODE, or noise level 0): no density. A flag, not a data check (no device sync)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``x_next``; pass ``noise`` to reuse a given z (tests), else z comes from ``generator``."""
        if noise is None:
            # Drawn where the generator lives (CPU generators keep runs reproducible on any device).
            where = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=where).to(self.mean.device)
        return self.mean + self.std * noise

    def log_prob(self, x_next: torch.Tensor) -> torch.Tensor:
        """Element-mean Gaussian log-density of ``x_next`` (module docstring), shape ``[B]`` float32."""
        if self.deterministic:
            raise ValueError("log_prob needs std > 0: the ODE step (g = 0) is deterministic and has no density")
        precision, log_norm = _gaussian_constants(self.std.float().flatten(1)[:, 0])  # [B] each: one std per sample
        return (x_next.float() - self.mean).square().flatten(1).mean(dim=1) * precision - log_norm  # [B]


def _gaussian_constants(std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(-1 / (2 std^2), log std + log(2 pi) / 2)`` elementwise: the log-density is ``mean_e(d^2) * first - second``.
    One function for a batch's stds and a grid's, so both give the same bits."""
    return -0.5 / std.square(), torch.log(std) + _HALF_LOG_2PI


@dataclass
class StepCoefficients:
    """``(a, b, std)`` of ``x_next ~ N(a x + b v, std^2 I)``, float32, all of one shape: ``[T]`` for a grid's steps
    or ``[B, 1, ...]`` for one step of a batch."""

    a: torch.Tensor
    b: torch.Tensor
    std: torch.Tensor

    def transition(self, x: torch.Tensor, v: torch.Tensor, deterministic: bool = False) -> Transition:
        """The step from ``x`` with velocity ``v`` (both ``[B, ...]``); the coefficients broadcast against them."""
        return Transition(mean=self.a * x.float() + self.b * v.float(), std=self.std, deterministic=deterministic)


@dataclass
class GridSteps:
    """Every step of one sigma grid for one sampler, its coefficients computed once (``[T]`` each)."""

    coefficients: StepCoefficients
    deterministic: bool  # the ODE, or a noise level of 0

    def __post_init__(self) -> None:
        # The log-density's constants per step ([T] each; meaningless where std is 0, and never read there).
        self.precision, self.log_norm = _gaussian_constants(self.coefficients.std)
        self._constants: dict[int, list[tuple[torch.Tensor, ...]]] = {}  # see step_constants

    def step_constants(self, index: int, elements: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, precision, log_norm, gradient factor)`` of step ``index`` as 0-dim views, for latents of ``elements``
        values per sample; the gradient factor is ``precision * (-2 / elements) * b`` (:meth:`log_prob_with_gradient`).

        Built for every step at the first call per ``elements`` (one ``unbind`` each), then a list lookup: the learner
        asks once per trained transition, where indexing the ``[T]`` tables would be seven small operations."""
        table = self._constants.get(elements)
        if table is None:
            c = self.coefficients
            factor = self.precision * (-2 / elements) * c.b  # [T]
            table = self._constants[elements] = list(zip(*(t.unbind() for t in (c.a, c.b, self.precision, self.log_norm, factor))))
        return table[index]

    def transition(self, x: torch.Tensor, v: torch.Tensor, index: int | torch.Tensor) -> Transition:
        """Step ``index`` from ``x`` ``[B, ...]``; ``index`` may be a ``[B]`` tensor (samples at different steps)."""
        c = self.coefficients
        if not isinstance(index, torch.Tensor):
            index = int(index)  # numpy integers too
            a, b = c.a[index], c.b[index]  # 0-dim: broadcast over the batch
        else:
            a, b = batch_column(c.a[index], x), batch_column(c.b[index], x)  # [B, 1, ...]
        std = batch_column(c.std[index], x)  # [B, 1, ...]
        return StepCoefficients(a, b, std).transition(x, v, self.deterministic)

    def log_prob_with_gradient(
        self, x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log pi(x_next | x, v) [B], d log pi / d v [B, ...])`` of step ``index``, without autograd.

        The log-prob is ``transition(x, v, index).log_prob(x_next)`` by the same operations, so bit for bit what
        rollout recorded; the gradient is the closed form (module docstring; ``n`` latent elements per sample)::

            d log pi_i / d v = b (x_next - mean)_i / (n std^2)

        The learner backpropagates through it by hand (DanceGRPO's ``surrogate_gradient``): autograd would record about a
        dozen small operations per trained transition, which on small latents cost as much as the network's own.
        """
        if self.deterministic:
            raise ValueError("log_prob needs std > 0: the ODE step (g = 0) is deterministic and has no density")
        a, b, precision, log_norm, factor = self.step_constants(index, math.prod(x.shape[1:]))
        v = v.detach()  # nothing here is recorded (cheaper than entering no_grad)
        residual = x_next.float() - (a * x.float() + b * v.float())  # [B, ...]: x_next - mean
        # Transition.log_prob's operations with this step's constants: the same bits.
        log_prob = residual.square().flatten(1).mean(dim=1) * precision - log_norm  # [B]
        return log_prob, residual * factor


def batch_column(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[B]`` tensor as float32 shaped ``[B, 1, ..., 1]`` to broadcast over ``like`` ``[B, ...]``."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if tensor.ndim == 0:
        tensor = tensor.expand(like.shape[0])
    return tensor.reshape(-1, *([1] * (like.ndim - 1)))


__all__ = ["GridSteps", "StepCoefficients", "Transition", "batch_column"]
