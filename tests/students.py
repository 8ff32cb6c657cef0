"""What the RG-LCD and Diff-Instruct* tests share (and DGPO's 2-rank resume): an exact-resume check of a learner, on one
rank or on every rank of a process group, and its job for the 2-rank session of tests/two_ranks.py (spawned children
import this module: it imports only torch at the top, the learner inside the functions).

Exact resume: A updates on b1 then b2 without stopping; B updates on b1 and saves its training state; C is built from
the config alone, loads that state and updates on b2. A and C must then hold identical parameters, AdamW state,
shadows, counters, algorithm state (the LRM and its optimizer, the fake score's moments) and log identical metrics.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from raygrpo.algorithms.base import StatefulAlgorithm
from raygrpo.learner.ema import ParameterShadow


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A rank's own shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def algorithm_tensors(learner) -> dict[str, torch.Tensor]:
    """Everything of the learner's algorithm a resume restores, as named tensors: shadows, the LRM's weights and AdamW
    state (replicated), the fake score's AdamW state (sharded)."""
    algorithm = learner.algorithm
    out = {f"shadow.{name}.{i}": v for name, s in vars(algorithm).items() if isinstance(s, ParameterShadow) for i, v in enumerate(s.values)}
    if isinstance(algorithm, StatefulAlgorithm):  # the optional hooks (DGPO keeps only shadows and counters)
        state = algorithm.state_dict()
        out |= {f"sharded.{name}": t for name, t in _flat(state.sharded)}
        out |= {f"replicated.{name}": t for name, t in _flat(state.replicated) if isinstance(t, torch.Tensor)}
    return out


def _flat(tree, prefix: str = ""):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is None:
        yield prefix, tree
        return
    for key, value in items:
        yield from _flat(value, f"{prefix}{key}.")


def comparable(metrics) -> dict:
    """LearnerMetrics without the wall clock, NaN (no ratios here) as None so that equal metrics compare equal."""
    def plain(value):
        return {k: plain(v) for k, v in value.items()} if isinstance(value, dict) else None if value != value else value

    return plain({k: v for k, v in dataclasses.asdict(metrics).items() if k != "seconds"})


def straight_and_resumed(config, b1: list, b2: list, folder: Path, rank: int = 0, world: int = 1):
    """``(A, C, A's metrics on b2, C's metrics on b2)`` of the module docstring; each rank passes its own part."""
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import RankBatch, split_batch

    def part(batch: list) -> RankBatch:
        return split_batch(batch, world)[rank] if world > 1 else RankBatch.whole(batch)

    a = Learner(config, rank, world)
    a.update(part(b1))
    metrics_a = a.update(part(b2))
    b = Learner(config, rank, world)
    b.update(part(b1))
    b.save_state(str(folder))
    del b
    c = Learner(config, rank, world)
    assert c.load_state(str(folder)) == 1
    metrics_c = c.update(part(b2))
    return a, c, metrics_a, metrics_c


def differences(a, c) -> list[str]:
    """Names of what differs between two learners' training states (empty: bit-identical on this rank)."""
    names = []
    names += [f"parameter {i}" for i, (x, y) in enumerate(zip(a.parameters, c.parameters)) if not torch.equal(local(x), local(y))]
    for i, (pa, pc) in enumerate(zip(a.parameters, c.parameters)):
        names += [f"adamw {i}.{k}" for k in a.optimizer.state[pa] if not torch.equal(local(a.optimizer.state[pa][k]), local(c.optimizer.state[pc][k]))]
    mine, theirs = algorithm_tensors(a), algorithm_tensors(c)
    names += [k for k in mine.keys() | theirs.keys() if k not in mine or k not in theirs or not torch.equal(local(mine[k]), local(theirs[k]))]
    if a.algorithm.optimizer_steps != c.algorithm.optimizer_steps:
        names.append("optimizer_steps")
    if a.rng.bit_generator.state != c.rng.bit_generator.state:
        names.append("rng")
    return names


def resume_on_ranks(rank: int, world: int, folder: Path, config, b1: list, b2: list) -> dict | None:
    """A job of the 2-rank session (tests/two_ranks.py): the exact resume of ``config`` on ``world`` ranks, each rank
    on its own part of ``b1`` and ``b2``. Rank 0 returns A's gathered parameters, A's and C's metrics on b2, the names
    of the algorithm tensors compared, and per rank ``(differences(A, C), its replicated algorithm tensors)`` and A's
    optimizer steps."""
    from raygrpo.learner.fsdp import full_state_dict

    a, c, metrics_a, metrics_c = straight_and_resumed(config, b1, b2, folder / "state", rank, world)
    assert a.sharded and all(hasattr(p, "to_local") for p in a.parameters)
    tensors = algorithm_tensors(a)
    replicated = {k: v for k, v in tensors.items() if k.startswith("replicated.")}
    found, steps = [None] * world, [None] * world
    torch.distributed.all_gather_object(found, (differences(a, c), replicated))
    torch.distributed.all_gather_object(steps, a.algorithm.optimizer_steps)
    params = full_state_dict(a.model.transformer, None, None)
    if rank != 0:
        return None
    return {"params": params, "metrics": (metrics_a, metrics_c), "ranks": found, "optimizer_steps": steps, "compared": sorted(tensors)}


def check_two_updates_on_two_ranks(config, b1: list, b2: list, two: dict, tolerance: float):
    """What :func:`resume_on_ranks` returned against one rank's two updates on the same batches: every rank resumed
    bit-exactly, and the two ranks made one rank's updates (parameters within ``tolerance``, the same loss). The
    second update is where a stale shard shows (FSDP2 once kept the root's gathered parameters across a shadow
    swap, raygrpo/learner/fsdp.py): the first starts from equal policy and shadows. Returns A's metrics on b2."""
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import RankBatch

    assert [found for found, _ in two["ranks"]] == [[], []]
    straight, resumed = two["metrics"]
    one = Learner(config)
    one.update(RankBatch.whole(b1))
    metrics = one.update(RankBatch.whole(b2))
    assert comparable(straight) == comparable(resumed) and straight.samples == metrics.samples
    state = one.model.transformer.state_dict()
    assert set(state) == set(two["params"])
    difference = max(float((state[k] - two["params"][k]).abs().max()) for k in state)
    assert difference < tolerance, f"2 ranks' parameters differ from one rank's by {difference:.3g}"
    assert straight.loss == pytest.approx(metrics.loss, rel=1e-4, abs=1e-6)
    return one, straight
