"""Shadow copies of the trainable parameters: EMAs and the frozen starting point.

A shadow is evaluated by swapping its values into the live parameters for the duration of a
``with shadow.swapped():`` block, so no second copy of the network (buffers, non-trainable
weights) is ever built. With LoRA only the adapter's parameters are shadowed.

On an FSDP-sharded learner the parameters are DTensors: each shadow value is then a DTensor with
the same placement, so a rank holds (and updates, swaps and checkpoints) only its own shard, and
every operation here is local (no communication).

How a swap moves the values, one way per kind of parameter (chosen once, at construction):

* plain tensors (an unsharded learner: one float32 CPU rank, the benchmarks, most tests): each
  Parameter is rebound to the shadow's tensor (``p.data = value``) and back to its own afterwards,
  O(1) per tensor and no copy. Inside the block the parameter and the shadow value share storage;
  nothing writes to the parameters there (forwards, and ``ShadowOptimizer``'s backward, which only
  fills ``.grad``), and ``values`` keeps its tensors, so optimizers and checkpoints keyed by them are
  undisturbed. A backward through a forward run inside the block must run inside it too (as
  ``ShadowOptimizer`` does): after the block autograd would read the parameters' own values, where
  the copies made it fail on the changed version. On tiny FLUX (66 tensors, the loaded 2-core
  machine) a swap and back took 0.39 ms of CPU with copies, 0.07 ms rebound.
* DTensors (FSDP2): FSDP2 all-gathers from its own sharded storage, of which each DTensor's local
  tensor is a view; a rebound ``.data`` is not seen (checked on one gloo rank: the forward kept the
  old weights), so the values are copied in: the parameters are cloned, the shadow copied into
  them, the clones copied back after the block (three passes over the shard).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor


class ParameterShadow:
    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.values = [p.detach().clone() for p in parameters]
        # Rebinding is invisible to FSDP2's sharded storage (module docstring): copies for DTensors.
        self.rebind = not any(isinstance(p, DTensor) for p in parameters)

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``shadow <- decay * shadow + (1 - decay) * live``."""
        for shadow, live in zip(self.values, self.parameters):
            shadow.mul_(decay).add_(live.detach(), alpha=1.0 - decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The live parameters hold the shadow's values inside the block, their own after it."""
        if self.rebind:
            own = [p.data for p in self.parameters]
            for p, shadow in zip(self.parameters, self.values):
                p.data = shadow
            try:
                yield
            finally:
                for p, value in zip(self.parameters, own):
                    p.data = value
            return
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.parameters]
            for p, shadow in zip(self.parameters, self.values):
                p.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.parameters, saved):
                    p.copy_(value)


def fast_ema_decay(step: int, max_decay: float, rate: float, delay: int = 0) -> float:
    """The "old policy" EMA's ramped decay: min(max_decay, rate * max(0, step - delay)); it lags the policy by about one
    step early on. DGPO: min(0.3, 0.001 step); DiffusionNFT: min(0.5, 0.001 step), or its OCR recipe's
    min(0.999, 0.0075 (step - 75)) after 75 steps of decay 0 (``return_decay`` of train_nft_sd3.py)."""
    return min(max_decay, rate * max(0, step - delay))


def slow_ema_decay(step: int, max_decay: float) -> float:
    """Flow-GRPO/DGPO's evaluation EMA with warm-up: min((1 + step) / (10 + step), max_decay)."""
    return min((1 + step) / (10 + step), max_decay)
