"""Jobs of the 2-rank session (tests/two_ranks.py) that need only torch and one function, in a module that imports
only what they run.

A spawned child imports the module its job lives in; a test module's imports (diffusers, transformers, the
learner) cost a child seconds to tens of seconds on a busy 2-core machine, this module's a fraction of that.
"""

from __future__ import annotations

import torch

from raygrpo.algorithms.dgpo import group_gate_logit


def split_group_gate(rank: int, world: int, folder, values: torch.Tensor) -> list[float] | None:
    """A job of the session's 2-rank processes (tests/two_ranks.py): one gloo rank holding members ``rank::world`` of
    a group (rows of ``values``: A, l, l_ref) computes its gate logit S_g over the whole group through the process
    group; rank 0 returns every rank's."""
    mine = values[:, rank::world]  # this rank's members of the group
    s = group_gate_logit(mine[0], mine[1], mine[2], beta=3.0, group_size=values.shape[1], process_group=torch.distributed.group.WORLD)
    found = [None] * world
    torch.distributed.all_gather_object(found, float(s))
    return found if rank == 0 else None
