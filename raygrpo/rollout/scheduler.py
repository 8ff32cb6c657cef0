"""The rollout scheduler: which prompt groups are generated, where and with which weights, and what is sent
again when an actor dies.

For step ``t`` the controller calls::

    scheduler.submit_through(t, version)   # draw + submit the groups of steps t .. t + max_staleness not yet submitted
    parts = scheduler.wait_generated(t, version)   # step t's groups (parts), generated
    groups = scheduler.wait_scored(parts)          # ... and scored by every reward: whole groups with their Scores

Each group goes to a rollout worker (round robin), and its scoring to every reward pool at once: the
media ref is the scoring call's argument, so a reward starts the moment its group is generated while
others still generate. With ``rollout.spread_groups`` a group is split into parts over the workers
(Flow-GRPO) and put back together, in member order, when scored.

Faults: a dead rollout worker or reward replica is restarted by Ray (``max_restarts``). Work it held is
sent again exactly once: a group to a live worker (the same group id and seed, stamped with the current
version, after that worker was brought to the current weights), a scoring to a live replica. Nothing is
lost and nothing is trained twice; ``reissued`` / ``rescored`` count it.

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

    @property
    def queue_depth(self) -> int:
        """Groups (parts) submitted and not yet collected."""
        return sum(len(parts) for parts in self.queue.values())

    # ----- submitting -----

    def submit_through(self, step: int, version: int) -> None:
        """Submit the groups of steps ``step .. step + max_staleness`` not submitted yet, stamped with ``version``."""
        last = min(step + self.config.train.max_staleness, self.config.train.steps)
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
        """The group itself, or (``rollout.spread_groups``) one part per rollout worker, as even as can be."""
        workers = len(self.rollout)
        if not self.config.rollout.spread_groups or workers == 1:
            return [group]
        bounds = np.linspace(0, group.group_size, min(workers, group.group_size) + 1).round().astype(int)
        return [dataclasses.replace(group, group_size=int(b - a), member_offset=int(a)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _submit(self, group: PromptGroup, step: int, worker: int | None = None) -> InFlight:
        """Send one group to a rollout worker (round robin unless given) and its scoring to every reward pool."""
        if worker is None:
            worker, self.next_worker = self.next_worker % len(self.rollout), self.next_worker + 1
        rollout, media, info = self.rollout.call(worker, "generate", group, num_returns=3)
        work = InFlight(group, step, worker, rollout, media, info)
        for name in self.rewards:
            self._submit_scoring(work, name)
        return work

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
            try:
                work.generated = get(work.info)
                return
            except Exception as exc:
                if not lost_actor(exc):
                    raise
                logger.warning("group %d was lost with rollout worker %d (%s); generating it again", work.group.group_id, work.worker, type(exc).__name__)
                worker = self.live_worker(work.worker, version)
                # Stamped with the current version: the (restarted) worker holds the current weights now.
                fresh = self._submit(dataclasses.replace(work.group, policy_version=version), work.step, worker)
                for f in dataclasses.fields(InFlight):
                    setattr(work, f.name, getattr(fresh, f.name))
                self.reissued += 1

    def wait_scored(self, parts: list[InFlight]) -> list[ScoredGroup]:
        """Whole groups with every reward's Scores; a scoring lost with its replica is sent again."""
        scored = [(work, work.generated, self._wait_scores(work)) for work in parts]
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

    def _wait_scores(self, work: InFlight) -> dict[str, tuple[Scores, float]]:
        scores = {}
        for name in self.rewards:
            while name not in scores:
                try:
                    scores[name] = get(work.scores[name])
                except Exception as exc:
                    if not lost_actor(exc):
                        raise
                    replica = self._live_replica(name, work.replicas[name])
                    logger.warning("scoring of group %d by %s was lost; scoring it again on replica %d", work.group.group_id, name, replica)
                    self._submit_scoring(work, name, replica)
                    self.rescored += 1
        return scores

    def live_worker(self, preferred: int, version: int) -> int:
        """A rollout worker that is alive and holds ``version``: ``preferred`` once Ray has restarted it, else
        another one. A restarted worker starts at version 0, so it gets the latest weights (verified) first."""
        for i in [preferred, *(j for j in range(len(self.rollout)) if j != preferred)]:
            if not self.rollout.wait_alive(i):
                continue  # out of restarts, or not back in time: try the next worker
            worker_version, incarnation = get(self.rollout.call(i, "status"))
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.telemetry.restarted("rollout")
            if worker_version != version:
                logger.warning("rollout worker %d came back at version %d; sending version %d", i, worker_version, version)
                self.weight_sync.push([i], version)
            return i
        raise RunAborted(f"every rollout worker is dead (rollout.max_restarts={self.config.rollout.max_restarts} used up)")

    def _live_replica(self, name: str, preferred: int) -> int:
        pool = self.rewards[name]
        for i in [preferred, *(j for j in range(len(pool)) if j != preferred)]:
            if not pool.wait_alive(i):
                continue
            if i == preferred:
                self.telemetry.restarted(f"reward:{name}")
            return i
        raise RunAborted(f"every replica of reward {name!r} is dead (max_restarts used up)")

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
