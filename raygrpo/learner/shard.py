"""How one step's batch is laid out over the M learner ranks, and the few collectives the layout needs.

The learner group gives each of its M ranks whole groups, ``ceil(n / M)`` slots per rank, filled in
order (rank 0 takes the first groups). When ``n`` is not a multiple of M (scoring dropped a group),
the last ranks' trailing slots are *padding*: copies of a real group that run every forward and
backward (FSDP's collectives need the same calls on every rank) with loss weight 0.

Loss normalisation (why a real term's scale is M). The learner normalises each optimizer step's
window by its real sample count over every rank, ``L = sum_terms l / N``. FSDP averages gradients
over the ranks (``reduce_scatter`` with ``avg``), so rank r contributing ``M * sum_{terms on r} l / N``
makes the average ``sum_r sum_{terms on r} l / N``: the same gradient as one rank holding every term.

Accumulation windows (DanceGRPO's ``grad_accum_samples`` = A). Each rank's window is its next A / M
samples, so the M ranks' windows together hold A samples per optimizer step, as one rank's do. With
one window per step (the tests' setting) M ranks make exactly the one-rank update. With several, the
samples are grouped into windows differently (rank r's window k is not one rank's samples
[kA, (k+1)A)): each optimizer step sees A samples of the same step, the same in expectation, as the
reference's per-rank accumulation, but not bit-for-bit the one-rank sequence of steps.

Random draws (DanceGRPO's timesteps, DGPO's noise) are made for every real group of the step in order
on every rank (:meth:`Algorithm.draw`), and each rank keeps its own slots' (:func:`pick`), so M ranks
draw exactly what one rank draws and every rank's generator stays in the same state. Padding sits at
the global end of the slots, so the real slots' global indices are those of one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raygrpo.contracts import TrainGroup


@dataclass
class Shard:
    """Where one rank's groups sit in the step: the default (``Shard()``) is one rank holding the whole batch."""

    rank: int = 0
    world_size: int = 1
    group_offset: int = 0  # global slot index of this rank's first group
    total_groups: int | None = None  # real groups over every rank; None: this rank's alone
    padding: int = 0  # this rank's trailing slots that are padding (loss weight 0)


@dataclass
class RankBatch:
    """One rank's part of an update: its group slots (the last ``shard.padding`` of them padding) and where they sit."""

    groups: list[TrainGroup]
    shard: Shard

    @classmethod
    def whole(cls, groups: list[TrainGroup]) -> RankBatch:
        """Every group on one rank (an in-process learner, tests)."""
        return cls(list(groups), Shard(total_groups=len(groups)))

    def is_real(self, slot: int) -> bool:
        return slot < len(self.groups) - self.shard.padding


def pick(draws: list, offset: int, count: int) -> list:
    """This rank's ``count`` entries of the step's global ``draws``, from ``offset``; padding slots reuse the last."""
    return [draws[min(offset + i, len(draws) - 1)] for i in range(count)]


def global_sums(values: list[float], world_size: int) -> list[float]:
    """``values`` each summed over the ranks, in one all-reduce (every rank must call it at the same point)."""
    if world_size == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total)
    return total.tolist()


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns the pre-clip norm over every rank's shard, a 0-dim tensor where
    the gradients are (read it when the update is done: reading it here would wait for the device).

    With sharded (DTensor) parameters ``clip_grad_norm_`` returns a replicated DTensor: its value
    is the full norm, read with ``full_tensor``.
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def split_batch(batch: list[TrainGroup], world_size: int) -> list[RankBatch]:
    """Whole groups to ranks: ``ceil(n / M)`` slots each, in order; short ranks are padded (see the module docstring)."""
    if not batch:
        raise ValueError("split_batch needs at least one group")
    sizes = {len(group.members) for group in batch}
    if len(sizes) > 1:
        # Padding copies a group, so every slot must run the same forwards and backwards.
        raise ValueError(f"every group of one update must train the same number of members, got {sorted(sizes)}")
    per_rank = -(-len(batch) // world_size)
    out = []
    for rank in range(world_size):
        real = batch[rank * per_rank : (rank + 1) * per_rank]
        filler = real[-1] if real else batch[-1]
        shard = Shard(rank=rank, world_size=world_size, group_offset=rank * per_rank, total_groups=len(batch), padding=per_rank - len(real))
        out.append(RankBatch(real + [filler] * (per_rank - len(real)), shard))
    return out
