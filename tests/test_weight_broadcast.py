"""Collective weight sync (gloo on CPU): learner rank 0 broadcasts, rollout processes receive in place."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from raygrpo.weight_broadcast import WeightBroadcastGroup, free_port


def _network(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).to(dtype)


def _member(rank: int, world: int, port: int, dtype: torch.dtype, verify: str, results) -> None:
    group = WeightBroadcastGroup("127.0.0.1", port, rank, world, torch.device("cpu"), timeout_s=60)
    if rank == 0:
        results[rank] = group.send(_network(0, dtype).state_dict(), verify, seed=7)
        return
    receiver = _network(rank, dtype)  # different weights until the broadcast lands
    crc = group.receive_into(receiver, list(receiver.state_dict()), verify, seed=7)
    same = all(torch.equal(a, b) for a, b in zip(receiver.state_dict().values(), _network(0, dtype).state_dict().values()))
    results[rank] = crc if same else -1


@pytest.mark.parametrize(("dtype", "verify"), [(torch.float32, "sample"), (torch.bfloat16, "full")])
def test_every_rollout_process_receives_exactly_the_learners_weights(dtype, verify):
    world, port = 3, free_port("127.0.0.1")
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        members = [context.Process(target=_member, args=(r, world, port, dtype, verify, results)) for r in range(world)]
        for p in members:
            p.start()
        for p in members:
            p.join(120)
        assert all(p.exitcode == 0 for p in members), [p.exitcode for p in members]
        sent = results[0]
        assert [results[r] for r in range(1, world)] == [sent] * (world - 1), "a receiver holds other weights than were sent"

