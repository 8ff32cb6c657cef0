"""The rollout scheduler: which prompt groups are generated, where and with which weights, and what is sent
again when an actor dies.

For step ``t`` the controller calls::

    scheduler.submit_through(t, version)   # draw + submit the groups of steps t .. t + max_staleness not yet submitted
    parts = scheduler.wait_generated(t, version)   # step t's groups (parts), generated
    groups = scheduler.wait_scored(parts, version) # ... and scored by every reward: whole groups with their Scores

Each group goes to a rollout worker (round robin), and its scoring to every reward pool at once: the
media ref is the scoring call's argument, so a reward starts the moment its group is generated while
others still generate. With ``rollout.spread_groups`` a group is split into parts over the workers
(Flow-GRPO) and put back together, in member order, when scored.

Faults: a dead rollout worker or reward replica is restarted by Ray (``max_restarts``). Work it held is
sent again exactly once: a group to a live worker (the same group id and seed, stamped with the current
version, after that worker was brought to the current weights), a scoring to a live replica. Nothing is
lost and nothing is trained twice; ``reissued`` / ``rescored`` count it.

A whole node that dies takes its workers and the objects they made there: a group generated on it and
not trained yet is generated again too. Ray moves the workers' bundles to nodes with room; a worker no
node has room for leaves the pool (it shrinks, :meth:`RolloutScheduler.refresh_pool`) and rejoins it,
with the current weights, once a node with room joins the cluster and Ray has restarted it there.

Elastic pools (``rollout.autoscale``): :meth:`RolloutScheduler.resize` sets the pool size to aim for, and
:meth:`RolloutScheduler.refresh_pool` (before every step's submissions and every weight sync) moves the pool
towards it. A worker added is *pending* (its bundle may wait for a node) and gets no work until it has
started; then it is sent the current weights, and only then work. A worker removed first stops getting work
(*draining*); once none of its groups is left in the queue (each was generated and trained, or lost and
generated again elsewhere) it is stopped and its placement group removed. Pending workers go first, then
workers out of the pool, then the highest-numbered ones. Which worker generates a group never changes the
group (its id, seed and member noise are fixed when it is drawn, and a spread group is split into
``rollout.num_workers`` parts whatever the pool), so a run's results do not depend on when workers came and went.

The data position (prompt order, group ids, round-robin cursors) is remembered as it was before each
step's groups were drawn, so a checkpoint after step t resumes by drawing step t+1's groups again.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raygrpo.actor_group import ActorGroup, LocalGroup, get, lost_actor
from raygrpo.config import Config
from raygrpo.contracts import PromptGroup, RolloutInfo, ScoredGroup, Scores, merge_scores
from raygrpo.data.prompts import PromptImages, PromptOrder
from raygrpo.errors import RunAborted
from raygrpo.rollout.worker import StaleWorkerError

logger = logging.getLogger(__name__)

Group = ActorGroup | LocalGroup


@dataclass
class InFlight:
    """Refs of one group, or of one part of it (``spread_groups``), submitted and not yet trained.
    Reissuing lost work replaces the refs, never the group id."""

    group: PromptGroup
    step: int  # the training step this group is trained in
    worker: int  # index of the rollout worker generating it
    rollout: Any  # ref to its Rollout (for the learner)
    media: Any  # ref to its GroupMedia (for the rewards)
    info: Any  # ref to its RolloutInfo (for the controller)
    scores: dict[str, Any] = field(default_factory=dict)  # reward name -> ref to (Scores, seconds)
    replicas: dict[str, int] = field(default_factory=dict)  # reward name -> replica scoring it
    generated: RolloutInfo | None = None  # the fetched ``info``, once generation is done
    node: str | None = None  # the node its worker was on when it was sent: its objects live there


@dataclass
class DataPosition:
    """Where the data and the round-robin cursors stood: what a checkpoint stores to draw the same groups again."""

    prompt_order: dict[str, Any]
    next_group_id: int
    next_worker: int
    next_replica: dict[str, int]


class RolloutScheduler:
    def __init__(
        self,
        config: Config,
        prompts: list[str],
        images: PromptImages | None,
        rollout: Group,
        rewards: dict[str, Group],
        weight_sync: Any,
        telemetry: Any,
    ):
        self.config, self.prompts, self.images = config, prompts, images
        self.rollout, self.rewards = rollout, rewards
        self.weight_sync, self.telemetry = weight_sync, telemetry
        self.order = PromptOrder(len(prompts), config.run.seed)
        self.next_group_id, self.next_worker = 0, 0
        self.next_replica = {name: 0 for name in rewards}
        self.queue: dict[int, list[InFlight]] = {}  # step -> its groups (parts), submitted and not yet collected
        self.positions: dict[int, DataPosition] = {}  # step -> the data position before its groups were drawn
        self.reissued = 0  # groups generated again because their rollout worker died (whole run)
        self.rescored = 0  # scorings sent again because their reward replica died (whole run)
        self.incarnations = [incarnation for _, incarnation in rollout.foreach("status")]
        self.nodes = rollout.bundle_nodes()  # the node of every worker, as last looked up
        self.pool_nodes = list(self.nodes)  # ... as refresh_pool last saw them
        self.down: set[int] = set()  # workers out of the pool: no node for them, or not answering
        # Elastic pools: the size to aim for, and workers on their way in or out (never taking work).
        self.target = len(rollout)
        self.pending: set[int] = set()  # added, still starting (their bundle may wait for a node)
        self.draining: set[int] = set()  # leaving: no new work, stopped once none of their groups is queued
        self.retired: set[int] = set()  # stopped, their slot empty
        self.joined = self.left = 0  # workers that joined / left the pool by a resize (whole run)

    @property
    def queue_depth(self) -> int:
        """Groups (parts) submitted and not yet collected."""
        return sum(len(parts) for parts in self.queue.values())

    # ----- submitting -----

    def submit_through(self, step: int, version: int) -> None:
        """Submit the groups of steps ``step .. step + max_staleness`` not submitted yet, stamped with ``version``."""
        last = min(step + self.config.train.max_staleness, self.config.train.steps)
        self.refresh_pool(version)
        for s in range(step, last + 1):
            if s not in self.queue:
                self.positions[s] = self.position()
                self.queue[s] = [self._submit(part, s) for group in self._next_groups(s, version) for part in self._split(group)]

    def _next_groups(self, step: int, version: int) -> list[PromptGroup]:
        algo = self.config.algorithm
        groups = []
        for k, prompt_id in enumerate(self.order.take(algo.groups_per_step)):
            seed = int(np.random.SeedSequence([self.config.run.seed, step, k]).generate_state(1)[0])
            image = self.images[prompt_id] if self.images is not None else None
            groups.append(PromptGroup(self.next_group_id, prompt_id, self.prompts[prompt_id], algo.group_size, seed, version, image))
            self.next_group_id += 1
        return groups

    def _split(self, group: PromptGroup) -> list[PromptGroup]:
        """The group itself, or (``rollout.spread_groups``) one part per configured rollout worker, as even as can
        be. ``num_workers``, not the pool's size now: a part's SDE noise follows its offset, so the split must not
        follow the pool (the round robin spreads the parts over whichever workers there are)."""
        workers = self.config.rollout.num_workers
        if not self.config.rollout.spread_groups or workers == 1:
            return [group]
        bounds = np.linspace(0, group.group_size, min(workers, group.group_size) + 1).round().astype(int)
        return [dataclasses.replace(group, group_size=int(b - a), member_offset=int(a)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _submit(self, group: PromptGroup, step: int, worker: int | None = None) -> InFlight:
        """Send one group to a rollout worker (round robin unless given) and its scoring to every reward pool."""
        if worker is None:
            worker = self._next_in_pool()
        rollout, media, info = self.rollout.call(worker, "generate", group, num_returns=3)
        work = InFlight(group, step, worker, rollout, media, info, node=self.nodes[worker])
        for name in self.rewards:
            self._submit_scoring(work, name)
        return work

    def _next_in_pool(self) -> int:
        """The next worker of the round robin that is in the pool."""
        out = self.out_of_pool
        for _ in range(len(self.rollout)):
            worker, self.next_worker = self.next_worker % len(self.rollout), self.next_worker + 1
            if worker not in out:
                return worker
        raise self._no_worker_left()

    @property
    def out_of_pool(self) -> set[int]:
        """Workers that take no work (and get no weights): down, starting, leaving or gone."""
        return self.down | self.pending | self.draining | self.retired

    def _no_worker_left(self) -> RunAborted:
        return RunAborted(
            f"no rollout worker is left: all {len(self.rollout)} are dead (rollout.max_restarts={self.config.rollout.max_restarts} "
            "used up) or lost their nodes with no node left with room for them; add nodes (or lower rollout.num_workers), "
            "then the same command resumes the run"
        )

    def refresh_pool(self, version: int) -> set[int]:
        """Look the workers' nodes up again: a worker whose node died leaves the pool, the pool shrinks (also while
        Ray restarts it on a node with room: it comes back without weights and outside the broadcast group). One
        out of the pool that answers again gets ``version`` and rejoins it. An elastic pool also moves towards its
        target (module docstring). Returns the workers out of the pool (the weight sync skips them)."""
        self._resize_towards_target(version)
        self.nodes = self.rollout.bundle_nodes()
        self.pool_nodes += self.nodes[len(self.pool_nodes) :]
        for i, (before, node) in enumerate(zip(self.pool_nodes, self.nodes)):
            if i in self.pending | self.retired:
                continue
            if node is None:
                self._leave_pool(i, "lost its node and no node has room for it")
                continue
            if node != before:
                self._leave_pool(i, f"lost its node; Ray restarts it on node {node[:12]}")
            if i in self.down and self.rollout.wait_alive(i, timeout_s=1.0):
                self.down.discard(i)
                self.live_worker(i, version)  # it answers: this brings it to ``version``
                logger.warning("rollout worker %d is back (node %s): %d of %d workers take work now", i, node[:12], self.pool_size, len(self.rollout))
        self.pool_nodes = list(self.nodes)
        return self.out_of_pool

    # ----- resizing (elastic pools) -----

    def resize(self, workers: int) -> None:
        """Aim the pool at ``workers`` workers; the next :meth:`refresh_pool` starts or drains workers to get there."""
        if workers != self.target:
            logger.info("rollout pool: target %d -> %d workers (%d take work now)", self.target, workers, self.pool_size)
        self.target = workers

    def _members(self) -> list[int]:
        """Workers that count towards the target: in the pool, down (they come back) or starting."""
        return [i for i in range(len(self.rollout)) if i not in self.draining | self.retired]

    def _resize_towards_target(self, version: int) -> None:
        members = self._members()
        if len(members) < self.target:
            added = self.rollout.add_workers([(self.config,)] * (self.target - len(members)))
            self.incarnations += [None] * len(added)
            self.pending.update(added)
            logger.info("rollout pool: starting worker(s) %s (pending until they are up)", added)
        # Who leaves first: starting workers (nothing to finish), then ones out of the pool, then the newest.
        order = sorted(reversed(members), key=lambda i: 0 if i in self.pending else 1 if i in self.down else 2)
        for i in order[: max(len(members) - self.target, 0)]:
            if i in self.pending | self.down:
                self._retire(i)  # no work to finish: a pending worker has none, a down one's is generated again
            else:
                self.draining.add(i)
                logger.info("rollout pool: worker %d drains (no new work; stopped once its queued groups are done)", i)
        queued = {work.worker for parts in self.queue.values() for work in parts}
        for i in sorted(self.draining - queued):
            self._retire(i)
        for i in sorted(self.pending):
            self._join_if_started(i, version)

    def _join_if_started(self, worker: int, version: int) -> None:
        try:
            if not self.rollout.started(worker):
                return
        except Exception as exc:  # noqa: BLE001 - its model failed to load, its node vanished...: it never joins
            logger.warning("rollout worker %d failed to start (%s); the pool tries another at the next step", worker, exc)
            self._retire(worker)
            return
        self.pending.discard(worker)
        self.weight_sync.push([worker], version)  # the current weights before its first group
        self.incarnations[worker] = get(self.rollout.call(worker, "status"))[1]
        self.joined += 1
        logger.info("rollout worker %d joined at version %d: %d workers take work", worker, version, self.pool_size)

    def _retire(self, worker: int) -> None:
        self.rollout.remove_worker(worker)
        self.left += worker not in self.pending
        self.pending.discard(worker)
        self.down.discard(worker)
        self.draining.discard(worker)
        self.retired.add(worker)
        logger.info("rollout worker %d left the pool: %d workers take work", worker, self.pool_size)

    def _leave_pool(self, worker: int, why: str) -> None:
        if worker not in self.down:
            self.down.add(worker)
            logger.warning("rollout worker %d %s: %d of %d workers take work now", worker, why, self.pool_size, len(self.rollout))

    @property
    def pool_size(self) -> int:
        """Rollout workers that take work."""
        return len(self.rollout) - len(self.out_of_pool)

    def _submit_scoring(self, work: InFlight, name: str, replica: int | None = None) -> None:
        pool = self.rewards[name]
        if replica is None:
            replica, self.next_replica[name] = self.next_replica[name] % len(pool), self.next_replica[name] + 1
        work.scores[name] = pool.call(replica, "score", work.media)
        work.replicas[name] = replica

    # ----- waiting, with lost work sent again -----

    def wait_generated(self, step: int, version: int) -> list[InFlight]:
        """Step ``step``'s groups (parts), each generated; a group lost with its worker is generated again."""
        parts = self.queue.pop(step)
        for work in parts:
            self._wait_generated(work, version)
        return parts

    def _wait_generated(self, work: InFlight, version: int) -> None:
        while True:
            if work.worker in self.down | self.retired:
                # Its worker left the pool since (its node died): what it made went with it, and asking takes seconds.
                logger.warning("group %d was lost with rollout worker %d (out of the pool); generating it again", work.group.group_id, work.worker)
                self._reissue(work, version)
                continue
            try:
                work.generated = get(work.info)
                return
            except Exception as exc:
                # A restarted worker that got the group before its weights says so: it is sent both, as a lost one.
                if not (lost_actor(exc) or isinstance(exc, StaleWorkerError)):
                    raise
                logger.warning("group %d was lost with rollout worker %d (%s); generating it again", work.group.group_id, work.worker, type(exc).__name__)
                self._reissue(work, version)

    def _reissue(self, work: InFlight, version: int) -> None:
        """Send a lost group again, in place (same group id and seed), to a live worker holding ``version``."""
        worker = self.live_worker(work.worker, version)
        self.nodes = self.rollout.bundle_nodes()  # it may be back on another node: the new work is recorded there
        # Stamped with the current version: the (restarted) worker holds the current weights now.
        fresh = self._submit(dataclasses.replace(work.group, policy_version=version), work.step, worker)
        for f in dataclasses.fields(InFlight):
            setattr(work, f.name, getattr(fresh, f.name))
        self.reissued += 1

    def _regenerate_if_node_lost(self, work: InFlight, version: int) -> bool:
        """Generate ``work`` again if the node it was generated on is gone (its worker's node, as last looked up,
        is another): its rollout and media died with it, whatever the controller already fetched. Returns whether it did."""
        if self.nodes[work.worker] == work.node:
            return False
        logger.warning("group %d was generated on a node that is gone (rollout worker %d); generating it again", work.group.group_id, work.worker)
        self._reissue(work, version)
        self._wait_generated(work, version)
        return True

    def wait_scored(self, parts: list[InFlight], version: int) -> list[ScoredGroup]:
        """Whole groups with every reward's Scores; a scoring lost with its replica is sent again, a group
        whose node died since it was generated is generated (with ``version``) and scored again."""
        self.nodes = self.rollout.bundle_nodes()
        for work in parts:
            self._regenerate_if_node_lost(work, version)
        scored = []
        for work in parts:
            scores = self._wait_scores(work, version)  # first: it may generate the group again (a new ``generated``)
            scored.append((work, work.generated, scores))
        by_group: dict[int, list] = {}
        for item in scored:
            by_group.setdefault(item[0].group.group_id, []).append(item)
        groups = []
        for items in by_group.values():
            items.sort(key=lambda item: item[0].group.member_offset)
            works = [work for work, _, _ in items]
            first = works[0].group
            whole = dataclasses.replace(first, group_size=sum(w.group.group_size for w in works), member_offset=0)
            single = len(works) == 1
            groups.append(
                ScoredGroup(
                    group=whole,
                    rollout=works[0].rollout if single else [w.rollout for w in works],
                    media=works[0].media if single else [w.media for w in works],
                    infos=[info for _, info, _ in items],
                    scores={name: merge_scores([s[name][0] for _, _, s in items]) for name in self.rewards},
                    seconds={name: float(sum(s[name][1] for _, _, s in items)) for name in self.rewards},
                )
            )
        return groups

    def _wait_scores(self, work: InFlight, version: int) -> dict[str, tuple[Scores, float]]:
        scores: dict[str, tuple[Scores, float]] = {}
        while len(scores) < len(self.rewards):
            name = next(n for n in self.rewards if n not in scores)
            try:
                scores[name] = get(work.scores[name])
            except Exception as exc:
                if not lost_actor(exc):
                    raise
                self.nodes = self.rollout.bundle_nodes()
                if self._regenerate_if_node_lost(work, version):
                    scores.clear()  # the media it was scored on died with the node: new media, new scores
                else:
                    replica = self._live_replica(name, work.replicas[name])
                    logger.warning("scoring of group %d by %s was lost; scoring it again on replica %d", work.group.group_id, name, replica)
                    self._submit_scoring(work, name, replica)
                    self.rescored += 1
        return scores

    def live_worker(self, preferred: int, version: int) -> int:
        """A rollout worker that is alive and holds ``version``: ``preferred`` once Ray has restarted it, else
        another one in the pool. A restarted worker starts at version 0, so it gets the latest weights (verified) first."""
        out, leaving = self.out_of_pool, self.pending | self.draining | self.retired
        candidates = [preferred] if preferred not in leaving else []
        for i in candidates + [j for j in range(len(self.rollout)) if j != preferred and j not in out]:
            if not self.rollout.wait_alive(i):
                self._leave_pool(i, "is dead, without a node, or not back in time")  # until it answers again
                continue
            self.down.discard(i)
            worker_version, incarnation = get(self.rollout.call(i, "status"))
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.telemetry.restarted("rollout")
            if worker_version != version:
                logger.warning("rollout worker %d came back at version %d; sending version %d", i, worker_version, version)
                self.weight_sync.push([i], version)
            return i
        raise self._no_worker_left()

    def _live_replica(self, name: str, preferred: int) -> int:
        pool = self.rewards[name]
        for i in [preferred, *(j for j in range(len(pool)) if j != preferred)]:
            if not pool.wait_alive(i):
                continue
            if i == preferred:
                self.telemetry.restarted(f"reward:{name}")
            return i
        raise RunAborted(f"every replica of reward {name!r} is dead (max_restarts used up) or lost its node with no node left with room for it")

    # ----- the data position, for checkpoints -----

    def position(self) -> DataPosition:
        """Where the data and cursors stand now."""
        return DataPosition(self.order.state_dict(), self.next_group_id, self.next_worker, dict(self.next_replica))

    def position_after(self, step: int) -> DataPosition:
        """The position to resume from after ``step``: before step+1's groups were drawn (they are drawn again),
        or the current one if they were not drawn yet. Positions up to ``step`` are forgotten."""
        position = self.positions.get(step + 1) or self.position()
        self.positions = {s: p for s, p in self.positions.items() if s > step}
        return position

    def restore(self, position: DataPosition) -> None:
        self.order.load_state_dict(position.prompt_order)
        self.next_group_id, self.next_worker, self.next_replica = position.next_group_id, position.next_worker, dict(position.next_replica)
