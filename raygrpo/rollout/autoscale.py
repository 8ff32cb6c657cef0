"""The rollout pool's autoscaling policy (``rollout.autoscale``): a pure function of what the last steps measured.

After every step the controller hands the policy one :class:`PoolSample` (from the step's metrics record) and
gets the pool size to aim for. The rule, with ``W = window``, at most one worker per decision:

* **grow** (``target + 1``, up to ``max``) when in each of the last W steps groups waited for a worker
  (``queue/groups_in_flight > pool size x slots``: more groups in flight than the workers run at once) and the
  driver waited for generation at least ``grow_wait`` of the step (``time/generate / time/step``: the run is
  generation-bound, so a worker more shortens the step);
* **shrink** (``target - 1``, down to ``min``) when in each of the last W steps no group waited and the
  workers idled at least ``shrink_idle`` of the step (``idle/rollout``, raygrpo/metrics.py);
* otherwise keep the target.

``slots`` (:func:`worker_slots`) is how many groups one worker runs at once: 1 for the plain worker (one call at a
time); with continuous batching (raygrpo/rollout/continuous.py) as many whole groups (or parts, ``spread_groups``)
as one forward holds, ``micro_batch_size // members``, so groups sharing a worker's forwards do not read as waiting.
``idle/rollout`` counts the workers' busy seconds (``RolloutInfo.busy_seconds``), not the groups' latencies, which
overlap on a continuous-batching worker and would never let its pool look idle.

Only steps run at the current target with every worker up count (``pool size == target``): a resize is
judged by the steps after it has taken effect, and no decision is taken while workers are still starting
(a bundle waiting for a node the cluster autoscaler adds) or leaving. That is the cool-down, and the
hysteresis is the gap between the two rules.

Why these signals: a strictly on-policy run (``train.max_staleness=0``) leaves its workers idle while the
learner trains, so a high idle share alone does not mean a worker is spare; it is the driver waiting for
generation with groups queued behind busy workers that a bigger pool fixes. With ``max_staleness >= 1``
generation overlaps training, the driver waits less, and the pool grows only while generation is still the
bottleneck. The rule is ours (neither paper scales rollout); Ray's own autoscaler works one level below, adding
the nodes the pending workers' placement groups ask for and removing idle ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from raygrpo.config import AutoscaleConfig, Config


@dataclass(frozen=True)
class PoolSample:
    """What one step measured of the rollout pool (from its metrics record)."""

    pool_size: int  # workers that took work in the step
    queue_depth: int  # groups (parts) in flight when the step began waiting for them
    idle: float  # idle/rollout: share of the step the pool's workers had nothing to do
    wait: float  # time/generate / time/step: share of the step the driver waited for generation

    @classmethod
    def of(cls, record: dict[str, float], pool_size: int) -> PoolSample:
        wait = record["time/generate"] / max(record["time/step"], 1e-9)
        return cls(pool_size, int(record["queue/groups_in_flight"]), float(record["idle/rollout"]), float(wait))


@dataclass(frozen=True)
class Decision:
    target: int
    reason: str  # empty when the target stays


def worker_slots(config: Config) -> int:
    """Groups (parts) one rollout worker runs at once: 1 without continuous batching; with it, the whole groups one
    forward of ``rollout.micro_batch_size`` rows holds (at least 1: a larger group runs in lanes, alone)."""
    rollout = config.rollout
    if not rollout.continuous_batching:
        return 1
    members = config.algorithm.group_size
    if rollout.spread_groups:
        members = math.ceil(members / rollout.num_workers)  # a part: about G / num_workers members (scheduler._split)
    return max(1, rollout.micro_batch_size // members)


class AutoscalePolicy:
    """``config``: the rule's settings; ``slots``: groups one worker runs at once (:func:`worker_slots`)."""

    def __init__(self, config: AutoscaleConfig, slots: int = 1):
        if slots < 1:
            raise ValueError(f"slots (groups a worker runs at once) must be >= 1, got {slots}")
        self.config, self.slots = config, slots

    def decide(self, history: Sequence[PoolSample], target: int) -> Decision:
        """The pool size to aim for after ``history`` (oldest first), the current target being ``target``."""
        c = self.config
        bounded = min(max(target, c.min), c.max)
        if bounded != target:
            return Decision(bounded, f"target {target} outside autoscale min..max = {c.min}..{c.max}")
        recent = list(history[-c.window :])
        if len(recent) < c.window or any(s.pool_size != target for s in recent):
            return Decision(target, "")  # not enough steps at this size yet, or workers still joining/leaving
        if target < c.max and all(s.queue_depth > s.pool_size * self.slots and s.wait >= c.grow_wait for s in recent):
            held = min(s.wait for s in recent)
            return Decision(target + 1, f"groups waited for a worker and generation held {held:.0%}+ of the step for {c.window} step(s)")
        if target > c.min and all(s.queue_depth <= s.pool_size * self.slots and s.idle >= c.shrink_idle for s in recent):
            idle = min(s.idle for s in recent)
            return Decision(target - 1, f"workers idled {idle:.0%}+ of the step with no group waiting for {c.window} step(s)")
        return Decision(target, "")
