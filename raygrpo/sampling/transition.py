"""The Gaussian policy of one denoising step, shared by every sampler (flow SDEs, DDIM-eta).

Each sampler turns ``(x, v, sigma, sigma_next)`` into a :class:`Transition`, ``x_next ~ N(mean, std^2 I)``;
rollout draws from it and the learner evaluates its log-density (reference doc §2.4)::

    log pi(x_next | x) = mean_elements[ -(x_next - mean)^2 / (2 std^2) - log std - log(2 pi) / 2 ]

The reduction is a mean over all latent elements (not a sum), computed in float32, as in both
DanceGRPO and Flow-GRPO. This module depends on no sampler, so every sampler module can import it.
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

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw ``x_next``; pass ``noise`` to reuse a given z (tests), else z comes from ``generator``."""
        if noise is None:
            # Drawn where the generator lives (CPU generators keep runs reproducible on any device).
            where = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=where).to(self.mean.device)
        return self.mean + self.std * noise

    def log_prob(self, x_next: torch.Tensor) -> torch.Tensor:
        """Element-mean Gaussian log-density of ``x_next``, shape ``[B]`` float32."""
        if bool((self.std <= 0).any()):
            raise ValueError("log_prob needs std > 0: the ODE step (g = 0) is deterministic and has no density")
        std = self.std.float()
        log_density = -((x_next.float() - self.mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI  # [B, ...]
        return log_density.flatten(1).mean(dim=1)  # [B]


def batch_column(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[B]`` tensor as float32 shaped ``[B, 1, ..., 1]`` to broadcast over ``like`` ``[B, ...]``."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if tensor.ndim == 0:
        tensor = tensor.expand(like.shape[0])
    return tensor.reshape(-1, *([1] * (like.ndim - 1)))


__all__ = ["Transition", "batch_column"]
