"""What an algorithm's update needs to know about the learner ranks: its part of the step's batch.

The learner group gives each of its M ranks whole groups, ``ceil(n / M)`` slots per rank, filled in
order (rank 0 takes the first groups). When ``n`` is not a multiple of M (scoring dropped a group),
the last ranks' trailing slots are *padding*: copies of a real group that run every forward and
backward (FSDP's collectives need the same calls on every rank) with loss weight 0.

Loss normalisation (why ``loss_scale`` is M). The algorithms normalise by counts of the step's
samples, ``L = sum_terms l / N``. FSDP averages gradients over the ranks (``reduce_scatter`` with
``avg``), so rank r contributing ``M * sum_{terms on r} l / N`` makes the average
``sum_r sum_{terms on r} l / N``: the same gradient as one rank holding every term. The counts
``N`` are global (:meth:`Shard.global_sum`).

Accumulation windows (DanceGRPO's ``grad_accum_samples`` = A). Each rank's window is its next A / M
samples, so the M ranks' windows together hold A samples per optimizer step, as one rank's do. With
one window per step (the tests' setting) M ranks make exactly the one-rank update. With several, the
samples are grouped into windows differently (rank r's window k is not one rank's samples
[kA, (k+1)A)): each optimizer step sees A samples of the same step, the same in expectation, as the
reference's per-rank accumulation, but not bit-for-bit the one-rank sequence of steps.

Random draws (DanceGRPO's timesteps, DGPO's noise) are made for every real group (sample) of the
step in order on every rank, and each rank keeps its own slice (:meth:`Shard.pick`), so M ranks draw
exactly what one rank draws for the same groups and every rank's generator stays in the same state.
Padding sits at the global end of the slots, so the real slots' global indices are those of one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Shard:
    """This rank's slots of one update: the default (``Shard()``) is one rank holding the whole batch."""

    rank: int = 0
    world_size: int = 1
    group_offset: int = 0  # global slot index of this rank's first group
    total_groups: int | None = None  # real groups over every rank; None: this rank's alone
    sample_offset: int = 0  # global slot index of this rank's first sample
    total_samples: int | None = None  # real samples over every rank; None: this rank's alone
    padding: int = 0  # this rank's trailing slots that are padding (loss weight 0)
    network: torch.nn.Module | None = None  # the FSDP-sharded network (None: no gradient collectives)
    reduce_every_backward: bool = False  # learner.reduce_every_backward: no unsharded gradients between backwards

    def is_real(self, local_group: int, local_groups: int) -> bool:
        """Whether local slot ``local_group`` (of ``local_groups``) holds a real group, not padding."""
        return local_group < local_groups - self.padding

    @staticmethod
    def pick(draws: list, offset: int, count: int) -> list:
        """This rank's ``count`` draws from the step's global ``draws``, from ``offset``; padding slots reuse the last."""
        return [draws[min(offset + i, len(draws) - 1)] for i in range(count)]

    def loss_scale(self, real: bool) -> float:
        """The factor on a term's loss: M for real terms (undoes FSDP's gradient average), 0 for padding."""
        return float(self.world_size) if real else 0.0

    def global_sum(self, value: float) -> float:
        """``value`` summed over the ranks (an all-reduce; every rank must call it at the same point)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            total = total.cuda()
        torch.distributed.all_reduce(total)
        return float(total.item())

    def gradient_sync(self, enabled: bool) -> None:
        """Reduce-scatter the gradients on this backward (the last of an accumulation window) or not.

        FSDP2's ``set_requires_gradient_sync(False)`` keeps unsharded gradients local on the
        micro-steps before the last, so a window of K backwards costs one reduce-scatter, not K.
        With ``reduce_every_backward`` every backward reduces (memory over communication).
        """
        if self.network is not None:
            self.network.set_requires_gradient_sync(enabled or self.reduce_every_backward)


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm; returns the pre-clip norm over every rank's shard.

    With sharded (DTensor) parameters ``clip_grad_norm_`` returns a replicated DTensor: its value
    is the full norm, read with ``full_tensor``.
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def split_batch(batch: list, world_size: int) -> list[tuple[list, Shard]]:
    """Whole groups to ranks: ``ceil(n / M)`` slots each, in order; short ranks are padded (see the module docstring).

    ``batch`` holds :class:`~raygrpo.contracts.TrainGroup` (anything with ``members``). Returns one
    ``(groups, Shard)`` per rank; ``Shard.network`` is left for the rank to fill in.
    """
    if not batch:
        raise ValueError("split_batch needs at least one group")
    sizes = {len(group.members) for group in batch}
    if len(sizes) > 1:
        # Padding copies a group, so every slot must run the same forwards and backwards.
        raise ValueError(f"every group of one update must train the same number of members, got {sorted(sizes)}")
    size, per_rank = sizes.pop(), -(-len(batch) // world_size)
    out = []
    for rank in range(world_size):
        real = batch[rank * per_rank : (rank + 1) * per_rank]
        filler = real[-1] if real else batch[-1]
        shard = Shard(
            rank=rank,
            world_size=world_size,
            group_offset=rank * per_rank,
            total_groups=len(batch),
            sample_offset=rank * per_rank * size,
            total_samples=len(batch) * size,
            padding=per_rank - len(real),
        )
        out.append((real + [filler] * (per_rank - len(real)), shard))
    return out
