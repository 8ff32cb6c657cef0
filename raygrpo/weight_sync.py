"""Weight sync, learner -> rollout workers: one new policy version per update, versioned and checksummed.

The controller calls :meth:`WeightSync.sync` once per update, and :meth:`WeightSync.push` to bring a
restarted rollout worker (which comes back at version 0) up to the current version. Two transports
(``rollout.weight_sync``):

* ``object_store``: learner rank 0 puts one :class:`~raygrpo.contracts.WeightsMessage` (numpy views,
  no snapshot copy, raygrpo/weights.py) into the object store; every worker copies the same object into
  its parameters in place, checks it against the learner's digest and reports what it now holds.
* ``collective``: learner rank 0 broadcasts raw tensors, one at a time as the ranks gather them, in a
  process group of its own straight into the workers' parameters (raygrpo/weight_broadcast.py); sender
  and receivers compare the same digests. ``auto`` picks it when learner ranks and rollout workers have
  whole GPUs. A broadcast that fails (a member died, or ``rollout.weight_sync_timeout_s`` passed) sends
  that version through the object store, and the group is rebuilt at the next sync.

The broadcast group is the rollout workers in the pool: one that is out of it (its node is gone, it is
still starting or it is leaving an elastic pool, raygrpo/rollout/scheduler.py) is left out, and the group is
rebuilt at the next sync whenever the pool's members changed. A worker that joins (or comes back) gets the
current version through the object store before its first group, and joins the broadcast group at the
next sync.

Every worker's report (version, digest) must match the learner's, or :class:`WeightsMismatchError`
stops the run: a worker never silently samples with other weights, nor with a stale version. What a
digest proves (``rollout.weight_verify``: ``sample`` by default, ``full`` for every byte) is in the
docstring of raygrpo/weights.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from raygrpo.actor_group import ActorGroup, LocalGroup, get, lost_actor
from raygrpo.config import Config
from raygrpo.learner.group import LearnerGroup
from raygrpo.weights import WeightsMismatchError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    seconds: float  # learner export + the slowest worker's load (object store), or the broadcast's wall time
    lost: list[int] = field(default_factory=list)  # rollout workers that died during it: the caller waits for their restart


def get_all(refs: list, timeout_s: float) -> list:
    """``ray.get(refs)``, but the first failure raises at once instead of after every other ref resolved
    (a broadcast's sender waits for receivers that may be dead); GetTimeoutError after ``timeout_s``."""
    import ray

    deadline, pending = time.monotonic() + timeout_s, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} of {len(refs)} calls not done after {timeout_s:g} s")
        ray.get(ready)  # raises the call's error now
    return ray.get(refs)


class WeightSync:
    def __init__(self, config: Config, learner: LearnerGroup, rollout: ActorGroup | LocalGroup):
        self.learner, self.rollout = learner, rollout
        self.timeout_s = config.rollout.weight_sync_timeout_s
        mode = config.rollout.weight_sync
        # auto: NCCL wants a whole device per member; shared (fractional) GPUs go through the object store.
        # In process there is nothing to broadcast to: the workers are objects beside the learner.
        whole_gpus = config.learner.num_gpus >= 1 and config.rollout.num_gpus >= 1
        self.collective = not config.run.in_process and (mode == "collective" or (mode == "auto" and whole_gpus))
        self.group_stale = True  # the broadcast group is built at the first collective sync
        self.members: list[int] = []  # the rollout workers of the broadcast group, rank 1 + position
        self.names: list[str] = []  # what every broadcast sends, in its order
        self._message = None  # the latest exported WeightsMessage (restarted workers get it too)
        self._message_version = -1

    def sync(self, version: int, down: Collection[int] = ()) -> SyncResult:
        """Bring every rollout worker in the pool to ``version`` (the learner's, just updated) and verify it.
        Workers ``down`` (out of the pool: their node is gone, or they are starting or leaving) are skipped; the
        broadcast group is rebuilt when the pool's members changed."""
        members = [i for i in range(len(self.rollout)) if i not in down]
        if self.collective and members:
            try:
                return SyncResult(self._broadcast(version, members))
            except Exception as exc:  # noqa: BLE001 - a dead member, a failed call or a timeout: the object store still works
                logger.warning("weight broadcast of version %d failed (%s); sending it through the object store", version, exc)
                self.group_stale = True
        return self.push(members, version)

    def push(self, workers, version: int) -> SyncResult:
        """Send ``version`` through the object store to ``workers``; every live one must report it and the
        same digest (each worker also checks its digest against the learner's)."""
        export = 0.0
        if self._message is None or self._message_version != version:
            # The old version goes first: the object store then never holds two whole copies of the network.
            self._message = None
            start = time.perf_counter()
            # Returns once the message is in the object store (LearnerGroup.export_weights waits for the put).
            self._message, self._message_version = self.learner.export_weights(), version
            export = time.perf_counter() - start
        workers = list(workers)
        if self.collective:
            self.group_stale = True  # a restarted member left the broadcast group
        refs = [self.rollout.call(i, "set_weights", self._message) for i in workers]
        reports, lost = {}, []
        for i, ref in zip(workers, refs):
            try:
                reports[i] = get(ref)
            except Exception as exc:
                if not lost_actor(exc):
                    raise
                lost.append(i)
        held = {i: (r.policy_version, r.checksum) for i, r in reports.items()}
        if any(v != version for v, _ in held.values()) or len({crc for _, crc in held.values()}) > 1:
            raise WeightsMismatchError(
                f"weight sync to version {version}: workers report (version, digest) {held}; a version other than "
                f"{version} is a stale or future message (the learner exported another version than the controller expects)"
            )
        return SyncResult(export + max((r.seconds for r in reports.values()), default=0.0), lost)

    def _open_group(self, members: list[int]) -> None:
        """Build the learner-to-rollout broadcast group of ``members`` (again, after a member was restarted or the pool changed)."""
        nodes = set(get([self.rollout.call(i, "node_ip") for i in members])) | {self.learner.node_ip()}
        host, port = get(self.learner.weight_group_address(len(nodes) == 1))
        world = 1 + len(members)
        joins = [self.learner.join_weight_group(host, port, world, self.timeout_s)]
        joins += [self.rollout.call(i, "join_weight_group", host, port, 1 + rank, world, self.timeout_s) for rank, i in enumerate(members)]
        get_all(joins, self.timeout_s)
        self.names = self.learner.weight_names()
        self.members, self.group_stale = list(members), False

    def _broadcast(self, version: int, members: list[int]) -> float:
        if self.group_stale or members != self.members:
            self._open_group(members)
        start = time.perf_counter()
        sent = self.learner.send_weights()
        received = [self.rollout.call(i, "receive_weights", version, self.names) for i in members]
        # Together: a receiver that fails must not leave the controller waiting on the sender's broadcast.
        (sent_version, sent_digest), *reports = get_all([sent, *received], self.timeout_s)
        if sent_version != version or any((r.policy_version, r.checksum) != (version, sent_digest) for r in reports):
            raise WeightsMismatchError(
                f"weight broadcast of version {version}: the learner sent (version, digest) {(sent_version, sent_digest)}, "
                f"the workers hold {[(r.policy_version, r.checksum) for r in reports]}"
            )
        return time.perf_counter() - start
