"""What the forward-process algorithms share (DGPO, DiffusionNFT): they train on final clean latents x0 only,
noised again as ``x_t = (1 - sigma) x0 + sigma eps``, and compare the policy's velocity there with shadows'.

* :func:`group_tensors`: one window group's x0, combined advantages ``sum_k w_k A_k`` and conditioning on the
  learner's device;
* :func:`micro_batches` and :func:`velocities`: member micro-batches, and the velocities of every group under
  weights swapped in once (a shadow swap rebinds or, under FSDP, copies every trainable parameter: see
  raygrpo/learner/ema.py; what it yields is latent-sized);
* :func:`frozen_snapshot` / :func:`base_weights`: the frozen base as a reference, i.e. the network with its
  LoRA adapter switched off (no second copy), or for full fine-tuning a frozen snapshot of the start.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from raygrpo.algorithms.base import WindowGroup
from raygrpo.contracts import ConditioningBatch, as_tensor
from raygrpo.learner.ema import ParameterShadow


@dataclass
class GroupTensors:
    """One group's trained rows for an update, on the learner's device."""

    x0: torch.Tensor  # [n, ...] final latents of the window's members of the group
    advantages: torch.Tensor  # [n] sum_k w_k A_k
    cond: ConditioningBatch  # expanded to n


def group_tensors(wg: WindowGroup, device: torch.device | str) -> GroupTensors:
    """The window's rows of one group: their final latents, combined advantages and conditioning."""
    members = wg.train.members[wg.rows]
    x0 = as_tensor(wg.rollout.final_latents[members], device)  # [n, ...]
    weighted = (wg.train.reward_weights[:, None] * wg.train.advantages[:, members]).sum(axis=0)  # [n]
    cond = ConditioningBatch.of(wg.rollout.conditioning, len(members), device)
    return GroupTensors(x0, torch.as_tensor(weighted, dtype=torch.float32, device=device), cond)


def micro_batches(size: int, micro_batch_size: int | None) -> list[slice]:
    """The member slices of a group of ``size``: one slice for None (the whole group)."""
    step = micro_batch_size or size
    return [slice(i, min(i + step, size)) for i in range(0, size, step)]


def velocity(model, group: GroupTensors, x_t: torch.Tensor, sigmas: torch.Tensor, rows: slice) -> torch.Tensor:
    """The live weights' velocity on rows ``rows`` of a group: ``x_t [n, ...]``, ``sigmas [n]`` -> ``[b, ...]``.
    Gradients flow when the caller enables them."""
    if rows.start == 0 and rows.stop >= len(x_t):  # the whole group (no micro-batches): no views to make
        return model.velocity(x_t, sigmas, group.cond)
    return model.velocity(x_t[rows], sigmas[rows], group.cond.rows(rows))


def velocities(
    model,
    weights: AbstractContextManager,
    groups: list[GroupTensors],
    x_t: list[torch.Tensor],
    sigmas: list[torch.Tensor],
    micro_batch_size: int | None,
) -> list[torch.Tensor]:
    """Per group ``v [n, ...]`` under ``weights`` (swapped in once for every group), without gradients, one
    micro-batch per forward. ``x_t`` and ``sigmas`` are per group ``[n, ...]`` and ``[n]``."""
    with torch.no_grad(), weights:
        parts = [[velocity(model, g, x, s, rows) for rows in micro_batches(len(g.x0), micro_batch_size)] for g, x, s in zip(groups, x_t, sigmas)]
    return [v[0] if len(v) == 1 else torch.cat(v) for v in parts]  # a whole group's one forward needs no concatenated copy


def frozen_snapshot(parameters: list[torch.nn.Parameter], lora: bool) -> ParameterShadow | None:
    """The frozen base's storage: None with LoRA (the base is the network with its adapter off), else a copy of
    the starting trainable parameters."""
    return None if lora else ParameterShadow(parameters)


def base_weights(model, frozen: ParameterShadow | None) -> AbstractContextManager:
    """The frozen base swapped in: the snapshot of :func:`frozen_snapshot`, or the LoRA adapter switched off."""
    return frozen.swapped() if frozen is not None else adapters_disabled(model.transformer)


class adapters_disabled(AbstractContextManager):
    """Evaluate a diffusers model with its (peft) LoRA adapters switched off."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __enter__(self):
        self.transformer.disable_adapters()

    def __exit__(self, *exc):
        self.transformer.enable_adapters()
        return False
