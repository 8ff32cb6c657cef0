"""Collective weight sync (gloo on CPU): learner rank 0 broadcasts, rollout processes receive in place."""

from __future__ import annotations

import multiprocessing as mp

import torch

from raygrpo.net import free_port
from raygrpo.weight_broadcast import WeightBroadcastGroup


def _network(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)).to(dtype)


# Each (dtype, verify) is one broadcast over the same group: a float32 network with the sampled check, a bfloat16 one
# with the full check. One group for both (as one run sends version after version) starts 3 processes, not 6.
CASES = [(torch.float32, "sample"), (torch.bfloat16, "full")]


def _member(rank: int, world: int, port: int, results) -> None:
    group = WeightBroadcastGroup("127.0.0.1", port, rank, world, torch.device("cpu"), timeout_s=60)
    for case, (dtype, verify) in enumerate(CASES):
        if rank == 0:
            results[rank, case] = group.send(_network(0, dtype).state_dict(), verify, seed=7 + case)
            continue
        receiver = _network(rank, dtype)  # different weights until the broadcast lands
        crc = group.receive_into(receiver, list(receiver.state_dict()), verify, seed=7 + case)
        same = all(torch.equal(a, b) for a, b in zip(receiver.state_dict().values(), _network(0, dtype).state_dict().values()))
        results[rank, case] = crc if same else -1


def test_every_rollout_process_receives_exactly_the_learners_weights():
    """Two receivers end with the learner's exact weights, and the digest each computes of them is the one sent: float32
    with the sampled check, then bfloat16 with the full one."""
    world, port = 3, free_port("127.0.0.1")
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        members = [context.Process(target=_member, args=(r, world, port, results)) for r in range(world)]
        for p in members:
            p.start()
        for p in members:
            p.join(120)
        assert all(p.exitcode == 0 for p in members), [p.exitcode for p in members]
        for case, (dtype, verify) in enumerate(CASES):
            sent = results[0, case]
            received = [results[r, case] for r in range(1, world)]
            assert received == [sent] * (world - 1), f"a receiver holds other weights than were sent ({dtype}, verify={verify})"
