"""Where a diffusers network lives and what dtype it holds, cheaply.

diffusers' ``ModelMixin.device`` and ``.dtype`` walk every submodule looking for offloading and
layer-wise casting hooks on each call; the adapters ask several times per forward, which was a quarter
of a tiny rollout's time. raygrpo attaches no such hooks, so the first parameter answers.
"""

from __future__ import annotations

import torch


def network_device(network: torch.nn.Module) -> torch.device:
    return next(network.parameters()).device


def network_dtype(network: torch.nn.Module) -> torch.dtype:
    """The dtype of the first floating-point parameter (what inputs are cast to before the forward)."""
    return next(p.dtype for p in network.parameters() if p.is_floating_point())


def network_placement(network: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """``(network_device(network), network_dtype(network))`` in one walk over the parameters: a forward asks for
    both, and each walk costs microseconds (more than a small model's per-call work in a learner's inner loop)."""
    parameters = network.parameters()
    first = next(parameters)
    if first.is_floating_point():
        return first.device, first.dtype
    return first.device, next(p.dtype for p in parameters if p.is_floating_point())
