"""Targets of processes the tests spawn, in a module that imports only what they run.

A spawned child imports the module its target lives in; a test module's imports (diffusers, transformers, the
learner) cost a child seconds to tens of seconds on a busy 2-core machine, this module's a fraction of that.
"""

from __future__ import annotations

import torch

from raygrpo.algorithms.dgpo import group_gate_logit


def split_group_gate(rank: int, world: int, port: int, values: torch.Tensor, out) -> None:
    """One gloo rank holding members ``rank::world`` of a group (rows of ``values``: A, l, l_ref): its gate logit S_g
    computed over the whole group through the process group, into ``out[rank]``."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = values[:, rank::world]  # this rank's members of the group
        s = group_gate_logit(mine[0], mine[1], mine[2], beta=3.0, group_size=values.shape[1], process_group=torch.distributed.group.WORLD)
        out[rank] = float(s)
    finally:
        torch.distributed.destroy_process_group()
