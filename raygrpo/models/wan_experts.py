"""Wan 2.2's two experts: which one trains, which one owns a noise level, and how a forward picks it.

Wan2.2-T2V-A14B and -I2V-A14B are two ``WanTransformer3DModel`` of one architecture (14B each): ``transformer``,
the high-noise expert, and ``transformer_2``, the low-noise one. diffusers' ``WanPipeline`` and
``WanImageToVideoPipeline`` (``pipeline_wan.py``, ``pipeline_wan_i2v.py``) switch at the scheduler timestep
``boundary_ratio * num_train_timesteps``::

    t >= boundary_ratio * 1000  ->  transformer     (high noise; Wan 2.1 and TI2V-5B: the only transformer)
    t <  boundary_ratio * 1000  ->  transformer_2   (low noise)

(``boundary_ratio`` 0.875 for T2V-A14B, 0.9 for I2V-A14B: ``boundary`` in the Wan2.2 repository's
``wan/configs/wan_t2v_A14B.py`` / ``wan_i2v_A14B.py``). Here ``t`` is the timestep the network is fed,
``quantize_timestep(sigma) * 1000``, so rollout (sampling) and learner (recomputing a step) always pick the same
expert for a step: a trajectory step uses the expert that owns its sigma on both sides, and the first
importance ratio stays exactly 1.

Decisions (``model.train_expert``):

- ``high`` (the default) or ``low`` trains that expert; it is the adapter's ``transformer`` (what the learner
  trains, checkpoints, exports and syncs), saved under its own pipeline folder (``network_component``:
  ``transformer`` or ``transformer_2``). The other expert is frozen: rollout loads it (``frozen_expert``) and
  samples its steps with it; it never travels (weight sync sends the trained expert alone, unchanged:
  raygrpo/weights.py) and the learner never loads it (``load_text_encoders=False`` is the learner's view), so the
  learner holds one 14B network, as for Wan 2.1.
- The learner trains only the noise levels its expert owns (:meth:`ExpertSwitch.trainable`, offered to the
  algorithms as the adapter's ``trainable_levels``): DanceGRPO draws its trained steps among them, DGPO its
  training sigmas; a step of the other expert carries no gradient to the trained one anyway. The other
  algorithms take no such draw; a learner asked for the frozen expert's noise level fails naming it.
- ``both`` is refused (config validation): the learner trains one network (one FSDP tree, one optimizer, one
  weight message); train the experts in two runs instead (``high``, then ``low`` on the first run's export).

Why ``high`` by default: the high-noise expert lays out composition and motion, where preference and
text-alignment rewards act (DanceGRPO and MixGRPO train the early, noisy steps), and on the A14B T2V grid
(rollout.shift 12, 40 steps) it owns 26 of the 40 steps (I2V-A14B at shift 5: 15 of 40).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import is_fake

from raygrpo.models.base import quantize_timestep
from raygrpo.models.hub import ModelNotFoundError

TrainExpert = Literal["high", "low", "both"]
NUM_TRAIN_TIMESTEPS = 1000  # the pipelines' scheduler.config.num_train_timesteps


@dataclass(frozen=True)
class WanLayout:
    """What a Wan pipeline folder's ``model_index.json`` says about its transformers."""

    boundary_ratio: float | None  # two experts switched at this fraction of the timesteps; None: one transformer
    expand_timesteps: bool  # TI2V-5B: a timestep per latent token (the pipeline's ``expand_timesteps``)

    @classmethod
    def of(cls, index: dict[str, Any]) -> WanLayout:
        ratio = index.get("boundary_ratio")
        second = (index.get("transformer_2") or [None])[0] is not None
        if (ratio is None) != (not second):
            raise ModelNotFoundError(
                f"model_index.json has boundary_ratio={ratio} and {'a' if second else 'no'} transformer_2: a two-expert Wan 2.2 "
                "pipeline has both, a one-transformer one neither"
            )
        return cls(None if ratio is None else float(ratio), bool(index.get("expand_timesteps")))


@dataclass
class ExpertSwitch:
    """The trained expert, the frozen one (rollout only) and the boundary between them.

    ``boundary_ratio`` None: one transformer, every noise level is the trained network's.
    """

    train_expert: Literal["high", "low"]
    boundary_ratio: float | None
    frozen: torch.nn.Module | None  # the other expert; None in the learner (and for one-transformer models)

    @property
    def trained_folder(self) -> str:
        """The pipeline folder of the trained network (``network_component``)."""
        return "transformer_2" if self.train_expert == "low" else "transformer"

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the high-noise expert owns each timestep (the pipeline's ``t >= boundary_timestep``)."""
        if self.boundary_ratio is None:
            return torch.ones_like(timestep, dtype=torch.bool)
        return timestep >= self.boundary_ratio * NUM_TRAIN_TIMESTEPS

    def trainable(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the trained network predicts at each noise level (always, with one transformer)."""
        high = self.high_noise(quantize_timestep(torch.as_tensor(sigmas)) * 1000)
        return high if self.boundary_ratio is None or self.train_expert == "high" else ~high

    def module(self, trained: torch.nn.Module, high: bool, sigma: float) -> torch.nn.Module:
        """The expert that owns a noise level: ``trained`` or the frozen one (an error where it is not loaded)."""
        if self.boundary_ratio is None or high == (self.train_expert == "high"):
            return trained
        if self.frozen is None:
            other = "low" if self.train_expert == "high" else "high"
            raise RuntimeError(
                f"noise level {sigma:.4f} belongs to the {other}-noise expert (boundary_ratio {self.boundary_ratio}), which this "
                f"model did not load: the learner holds only the trained {self.train_expert}-noise expert (model.train_expert). "
                "Only dancegrpo and dgpo restrict training to the trained expert's noise levels (trainable_levels)"
            )
        return self.frozen


def load_experts(
    load, source: str, transformer_cls: type, layout: WanLayout, train_expert: TrainExpert, load_frozen: bool, dtype: torch.dtype
) -> tuple[torch.nn.Module, ExpertSwitch]:
    """The trained transformer and the :class:`ExpertSwitch` (with the frozen expert when ``load_frozen``).

    ``load(cls, subfolder, **kwargs)``: the adapter's component loader (``hub.load_component`` from its source to its device)."""
    if train_expert == "both":
        raise ValueError("model.train_expert=both is not supported: the learner trains one expert per run (raygrpo/models/wan_experts.py)")
    if layout.boundary_ratio is None and train_expert != "high":
        raise ValueError(
            f"model.train_expert={train_expert!r}, but {source} has one transformer (no transformer_2, no boundary_ratio): "
            "the experts are Wan 2.2 A14B's; leave train_expert at high"
        )
    switch = ExpertSwitch(train_expert, layout.boundary_ratio, None)  # type: ignore[arg-type]
    trained = load(transformer_cls, switch.trained_folder, torch_dtype=dtype)
    if load_frozen and layout.boundary_ratio is not None:
        other = "transformer" if switch.trained_folder == "transformer_2" else "transformer_2"
        switch.frozen = load(transformer_cls, other, torch_dtype=dtype)
    return trained, switch


def route(
    switch: ExpertSwitch, trained: torch.nn.Module, timestep: torch.Tensor, sigmas: torch.Tensor, forward
) -> torch.Tensor:
    """``forward(module, rows)`` for each expert's rows (``rows`` None: the whole batch), reassembled in order.

    A batch within one expert (every rollout forward and every learner term: their samples share a noise level)
    is one forward of the whole batch, so its numerics are those of the rollout's forward; a mixed batch is split.
    """
    if switch.boundary_ratio is None or is_fake(timestep):
        # One transformer; or the resource planner's weightless forward (raygrpo/plan/), whose values cannot be read:
        # both experts have one architecture, so the trained one stands for either.
        return forward(trained, None)
    high = switch.high_noise(timestep)  # [B]
    if bool(high.all()) or not bool(high.any()):
        return forward(switch.module(trained, bool(high[0]), float(sigmas[0])), None)
    out = None
    for part in (high, ~high):
        rows = part.nonzero().flatten()
        prediction = forward(switch.module(trained, bool(high[rows[0]]), float(sigmas[rows[0]])), rows)
        if out is None:
            out = prediction.new_empty((len(high), *prediction.shape[1:]))
        out[rows] = prediction
    return out


__all__ = ["NUM_TRAIN_TIMESTEPS", "ExpertSwitch", "TrainExpert", "WanLayout", "load_experts", "route"]
