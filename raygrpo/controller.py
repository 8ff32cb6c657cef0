"""The controller: the single control loop of a run (the driver process of ``python -m raygrpo.run``).

One training step ``t``::

    submit   : the prompt groups of steps t .. t + max_staleness that are not yet submitted, stamped
               with the current policy version, round robin over the rollout workers; each group's
               scoring by every reward pool is submitted at once (a Ray dependency on its media),
               so scoring starts the moment that group is generated, while others still generate
    wait     : step t's groups (a dead rollout or reward actor is restarted by Ray; the controller
               re-sends the current weights and reissues exactly the work that was lost)
    advantage: per reward, group-normalised and clipped; ``scoring.on_failure`` for missing scores
    update   : the learner fetches the Rollout refs itself and runs the algorithm's update
    sync     : the new version reaches every rollout worker, versioned and checksummed, through the
               object store or a collective broadcast (raygrpo/weight_sync.py); every worker reports
               (version, checksum), which must agree with the learner's

With ``train.max_staleness = 0`` this is the papers' strictly on-policy loop (nothing is generated
before the previous update is synced). With ``k >= 1`` the groups of the next ``k`` steps are
generated while this one trains, so their samples are up to ``k`` versions old when trained;
every sample carries the version that made it and the step logs staleness and each role's idle share.

The controller holds ObjectRefs and small metadata only; latents, trajectories, images and weights
move actor to actor through the object store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from raygrpo.algorithms.advantages import advantage_statistics, best_of_n_members, global_std, group_advantages
from raygrpo.checkpoint import (
    ABORTED, FINAL, RUN_STAMP, CheckpointError, ControllerState, ResumePoint,
    load_controller_state, save_checkpoint, save_weights, write_run_state,
)  # fmt: skip
from raygrpo.config import Config
from raygrpo.contracts import GroupMedia, PromptGroup, RolloutInfo, Scores, TrainGroup, merge_scores
from raygrpo.data.prompts import PromptOrder, load_prompt_images
from raygrpo.learner.group import LearnerGroup
from raygrpo.metrics import MetricsLog, keep_steps_up_to
from raygrpo.placement import ActorPool, resource_plan
from raygrpo.ray_metrics import RunTelemetry
from raygrpo.export import ExportError, export_pipeline
from raygrpo.gallery import GalleryEntry, is_gallery_step, read_group_media, read_step_gallery, write_step_gallery
from raygrpo.report import GridRow, plot_reward_curve, sample_grid
from raygrpo.reward.worker import RewardWorker
from raygrpo.rollout.worker import RolloutWorker
from raygrpo.weight_sync import SyncResult, WeightSync

logger = logging.getLogger(__name__)

RESTART_TIMEOUT_S = 600.0  # how long to wait for Ray to bring a dead actor back (model loading included)
# Tests only: after writing this step's metrics the driver waits to be killed, so a test kills it at an exact point.
HOLD_AFTER_STEP_ENV = "RAYGRPO_TEST_HOLD_AFTER_STEP"


@dataclass
class Generated:
    """Refs for one group in flight, or for one part of it when ``rollout.spread_groups`` splits it over
    workers (then ``group`` holds that part's members). Reissuing lost work replaces the refs, never the group id.

    Once every part is back, :meth:`Controller._merge_parts` makes one Generated per whole group whose
    ``rollout`` and ``media`` are lists of the parts' refs, in member order.
    """

    group: PromptGroup
    step: int  # the training step this group is trained in
    worker: int  # index of the rollout worker generating it
    rollout: ray.ObjectRef
    media: ray.ObjectRef
    info: ray.ObjectRef
    scores: dict[str, ray.ObjectRef] = field(default_factory=dict)  # reward name -> (Scores, seconds)
    replicas: dict[str, int] = field(default_factory=dict)  # reward name -> replica index scoring it


@dataclass
class RunSummary:
    run_dir: str
    steps: int
    first_reward: float  # mean total reward of the first step
    last_reward: float  # mean total reward of the last step
    metrics_file: str
    checkpoint: str


_DEAD = object()


def _fetch_media(refs: list) -> list[GroupMedia]:
    """GroupMedia per entry; an entry that is a list of parts' refs comes back as one group, parts joined in order."""
    flat = [r for ref in refs for r in (ref if isinstance(ref, list) else [ref])]
    fetched = iter(ray.get(flat))
    medias = []
    for ref in refs:
        parts = [next(fetched) for _ in (ref if isinstance(ref, list) else [ref])]
        images = np.concatenate([p.images for p in parts]) if len(parts) > 1 else parts[0].images
        medias.append(GroupMedia(group=parts[0].group, images=images))
    return medias


def _call_when_alive(call):
    """``ray.get(call())``, retried while the actor is restarting; ``_DEAD`` if it is gone for good
    (out of restarts) or not back within ``RESTART_TIMEOUT_S``."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return ray.get(call(), timeout=max(deadline - time.monotonic(), 0.1))
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.5)  # restarting: its calls fail fast until it is back
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return _DEAD
    return _DEAD


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (a DCP or Ray error carries pages of traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _hold_if_asked(step: int) -> None:
    if os.environ.get(HOLD_AFTER_STEP_ENV) == str(step):
        logger.warning("%s=%d: holding here until killed", HOLD_AFTER_STEP_ENV, step)
        while True:
            time.sleep(60)


class RunAborted(RuntimeError):
    """The run stopped on purpose (scoring.on_failure=abort, or no live actor of a role left); a
    checkpoint of the work so far was saved."""


class Controller:
    def __init__(self, config: Config, run_dir: Path, prompts: list[str], resume: ResumePoint | None = None):
        self.config = config
        self.resume = resume
        self.run_dir = run_dir
        self.prompts = prompts
        self.order = PromptOrder(len(prompts), seed=config.run.seed)
        self.images = load_prompt_images(config.data)  # image-to-video: one conditioning image per prompt, else None
        self.weights = np.array([r.weight for r in config.rewards], np.float32)  # [K]
        self.rng = np.random.default_rng(config.run.seed + 2)
        self.policy_version = 0
        self.next_group_id = 0
        self.next_worker = 0
        self.next_replica = {r.name: 0 for r in config.rewards}
        self.queue: dict[int, list[Generated]] = {}  # step -> its groups, submitted and not yet trained
        self.data_position: dict[int, dict] = {}  # step -> data/group-id/worker cursors before its groups were drawn
        self.trained_group_ids: list[int] = []
        self.reissued = 0  # groups generated again because their rollout worker died (whole run)
        self.rescored = 0  # scorings sent again because their reward replica died (whole run)
        self.metrics: MetricsLog | None = None  # opened by run(): a resume writes nothing before its checkpoint has loaded
        self.telemetry = RunTelemetry(run_dir.name)
        self.gallery: dict[int, list[tuple[PromptGroup, ray.ObjectRef, np.ndarray]]] = {}

    # ----- lifecycle -----

    def run(self) -> RunSummary:
        self._start_pools()
        last = self.config.train.steps
        try:
            done = self._restore() if self.resume is not None else 0
            if self.metrics is None:
                self.metrics = MetricsLog.for_run(self.run_dir, self.config)
            write_run_state(self.run_dir, "running", step=done)
            for step in tqdm(range(done + 1, last + 1), desc="training", unit="step", initial=done, total=last):
                try:
                    self.metrics.write(self.step(step))
                except RunAborted as exc:
                    self._abort(exc, step)
                _hold_if_asked(step)
                every = self.config.train.checkpoint_every
                if every and step % every == 0 and step < last:
                    self._save_checkpoint(step)
            # A resumed run that redid its last steps replaces the checkpoint-final an earlier attempt left.
            checkpoint = save_weights(self.run_dir, FINAL, lambda folder: self.learner.save(str(folder)), replace=True)
            self._write_report()
            self._export(checkpoint)
        finally:
            self._stop_pools()
            if self.metrics is not None:
                self.metrics.close()
            self.telemetry.close()
        # Last of all: until this is on disk the run is unfinished, and the same command resumes it.
        write_run_state(self.run_dir, "finished", step=last, checkpoint=FINAL)
        totals = [r["reward/total/mean"] for r in self.metrics.records]
        return RunSummary(str(self.run_dir), len(totals), totals[0], totals[-1], str(self.metrics.path), str(checkpoint))

    def _abort(self, exc: RunAborted, step: int) -> None:
        """Keep what was learned so far, in a folder no later abort overwrites; the metrics of finished steps are on disk."""
        saved = save_weights(self.run_dir, ABORTED, lambda folder: self.learner.save(str(folder)), replace=False)
        write_run_state(self.run_dir, "aborted", step=step - 1, checkpoint=saved.name, reason=str(exc))
        raise RunAborted(f"{exc}; steps 1..{step - 1} are in {self.metrics.path}, weights in {saved}") from None

    def _start_pools(self) -> None:
        roles = {r.role: r for r in resource_plan(self.config)}
        self.rollout_pool = ActorPool(roles["rollout"], RolloutWorker, self.config, max_restarts=self.config.rollout.max_restarts)
        self.reward_pools = {
            r.name: ActorPool(roles[f"reward:{r.name}"], RewardWorker, r, max_restarts=r.max_restarts, out_of_order=True)
            for r in self.config.rewards
        }
        # The learner group is fail-stop: a run whose learner dies resumes from its latest checkpoint.
        self.learner = LearnerGroup(self.config, roles["learner"])
        pools = [self.rollout_pool, *self.reward_pools.values()]
        ray.get([ref for pool in pools for ref in pool.ready()] + self.learner.ready())
        self.worker_incarnations = [incarnation for _, incarnation in ray.get([w.status.remote() for w in self.rollout_pool.actors])]
        self.weight_sync = WeightSync(self.config, self.learner, self.rollout_pool)
        roles_up = [f"{p.resources.role} x{p.resources.count}" for p in pools] + [f"learner x{self.learner.world_size}"]
        logger.info("actors ready: %s", ", ".join(roles_up))

    def _stop_pools(self) -> None:
        for pool in [getattr(self, "rollout_pool", None), getattr(self, "learner", None), *getattr(self, "reward_pools", {}).values()]:
            if pool is not None:
                pool.shutdown()

    # ----- one training step -----

    def step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        self._fill_queue(step)
        queue_depth = sum(len(groups) for groups in self.queue.values())
        parts = self.queue.pop(step)
        reissued, rescored = self.reissued, self.rescored
        infos = [self._wait_generated(p) for p in parts]
        t_generated = time.perf_counter()
        in_flight, scores = self._merge_parts(parts, [self._wait_scored(p) for p in parts])
        t_scored = time.perf_counter()
        kept, stats = self._collect_rewards(in_flight, scores)
        batch = self._advantages(kept)
        stats.update(self._advantage_statistics(batch))
        rewards = np.concatenate([r.T for _, r in kept]) if kept else np.zeros((0, len(self.config.rewards)))  # [N, K]
        stats["groups/trained"] = float(len(batch))
        stats["groups/zero_std"] = float(sum(int(np.all(r.std(axis=1) == 0)) for _, r in kept))
        stats["groups/reissued"] = float(self.reissued - reissued)
        stats["groups/rescored"] = float(self.rescored - rescored)
        versions: dict[int, int] = {}
        for info in infos:  # a group's oldest part decides its staleness
            versions[info.group_id] = min(info.policy_version, versions.get(info.group_id, info.policy_version))
        staleness = np.array([self.policy_version - versions[g.group_id] for g in batch], np.float64)
        learner_metrics = self.learner.update(batch) if batch else None
        self.trained_group_ids += [g.group_id for g in batch]
        t_learned = time.perf_counter()
        sync = self._sync_weights() if learner_metrics is not None else None
        t_synced = time.perf_counter()
        self._keep_for_gallery(step, in_flight, scores)
        if is_gallery_step(step, self.config.logging.sample_every, self.config.train.steps):
            self._write_gallery(step, in_flight, scores)
        record: dict[str, float] = {"step": step, "policy_version": self.policy_version, **stats}
        reward_seconds = {r.name: [s[r.name][1] for s in scores.values()] for r in self.config.rewards}
        for k, reward in enumerate(self.config.rewards):
            record[f"reward/{reward.name}/mean"] = float(np.mean(rewards[:, k])) if len(rewards) else float("nan")
            record[f"reward/{reward.name}/std"] = float(np.std(rewards[:, k])) if len(rewards) else float("nan")
            record[f"time/reward/{reward.name}"] = float(sum(reward_seconds[reward.name]))
        record["reward/total/mean"] = float(np.mean(rewards @ self.weights)) if len(rewards) else float("nan")
        if learner_metrics is not None:
            fields = asdict(learner_metrics)
            extras = fields.pop("extras")
            record.update({f"learner/{k}": float(v) for k, v in {**fields, **extras}.items()})
        record["samples/generated"] = float(len(in_flight) * self.config.algorithm.group_size)
        record["rollout/bytes_per_sample"] = float(sum(i.rollout_bytes for i in infos)) / (
            len(in_flight) * self.config.algorithm.group_size
        )
        record["staleness/mean"] = float(staleness.mean()) if len(staleness) else float("nan")
        record["staleness/max"] = float(staleness.max()) if len(staleness) else float("nan")
        record["queue/groups_in_flight"] = float(queue_depth)
        record["time/rollout_worker_sum"] = float(sum(i.seconds for i in infos))
        record["time/generate"] = t_generated - start
        record["time/score_wait"] = t_scored - t_generated
        record["time/learner"] = t_learned - t_scored
        # The sync's own work (export + the slowest worker's load); its wall time also counts waiting for
        # workers to finish the groups queued before it (max_staleness >= 1), which is generation, not sync.
        record["time/sync"] = sync.seconds if sync is not None else 0.0
        record["time/sync_wall"] = t_synced - t_learned
        record["time/step"] = time.perf_counter() - start
        record.update(self._idle_fractions(record, reward_seconds, learner_metrics))
        self.telemetry.record_step(record, queue_depth, reward_seconds)
        return record

    def _idle_fractions(self, record: dict[str, float], reward_seconds: dict[str, list[float]], learner_metrics) -> dict[str, float]:
        """Per role, 1 - (busy seconds of the work trained this step) / (actors x the step's wall time).

        With max_staleness >= 1 part of that work ran during the previous step's window, so single
        steps can be off; averaged over steps it is the share of time a role's actors had nothing to do.
        """
        wall = max(record["time/step"], 1e-9)

        def idle(busy: float, actors: int) -> float:
            return float(np.clip(1.0 - busy / (actors * wall), 0.0, 1.0))

        fractions = {"idle/rollout": idle(record["time/rollout_worker_sum"], len(self.rollout_pool.actors))}
        for name, seconds in reward_seconds.items():
            fractions[f"idle/reward/{name}"] = idle(sum(seconds), len(self.reward_pools[name].actors))
        fractions["idle/learner"] = idle(learner_metrics.seconds if learner_metrics is not None else 0.0, 1)
        return fractions

    def _fill_queue(self, step: int) -> None:
        """Submit the groups of steps ``step .. step + max_staleness`` that are not submitted yet."""
        last = min(step + self.config.train.max_staleness, self.config.train.steps)
        for s in range(step, last + 1):
            if s not in self.queue:
                self.data_position[s] = {
                    "prompt_order": self.order.state_dict(), "next_group_id": self.next_group_id,
                    "next_worker": self.next_worker, "next_replica": dict(self.next_replica),
                }  # fmt: skip
                self.queue[s] = [self._submit(part, s) for group in self._next_groups(s) for part in self._split(group)]

    def _next_groups(self, step: int) -> list[PromptGroup]:
        algo = self.config.algorithm
        groups = []
        for k, prompt_id in enumerate(self.order.take(algo.groups_per_step)):
            seed = int(np.random.SeedSequence([self.config.run.seed, step, k]).generate_state(1)[0])
            image = self.images[prompt_id] if self.images is not None else None
            groups.append(
                PromptGroup(self.next_group_id, prompt_id, self.prompts[prompt_id], algo.group_size, seed, self.policy_version, image)
            )
            self.next_group_id += 1
        return groups

    def _split(self, group: PromptGroup) -> list[PromptGroup]:
        """The group itself, or (``rollout.spread_groups``) one part per rollout worker, as even as can be."""
        workers = len(self.rollout_pool.actors)
        if not self.config.rollout.spread_groups or workers == 1:
            return [group]
        bounds = np.linspace(0, group.group_size, min(workers, group.group_size) + 1).round().astype(int)
        return [dataclasses.replace(group, group_size=int(b - a), member_offset=int(a)) for a, b in zip(bounds[:-1], bounds[1:])]

    def _merge_parts(self, parts: list[Generated], part_scores: list[dict[str, tuple[Scores, float]]]):
        """Whole groups from their parts: one Generated per group (refs listed in member order) and its Scores."""
        by_group: dict[int, list[tuple[Generated, dict]]] = {}
        for part, scored in zip(parts, part_scores):
            by_group.setdefault(part.group.group_id, []).append((part, scored))
        merged, scores = [], {}
        for group_id, items in by_group.items():
            items.sort(key=lambda item: item[0].group.member_offset)
            if len(items) == 1:
                merged.append(items[0][0])
                scores[group_id] = items[0][1]
                continue
            first = items[0][0]
            whole = dataclasses.replace(first.group, group_size=sum(p.group.group_size for p, _ in items), member_offset=0)
            merged.append(
                Generated(
                    whole, first.step, first.worker, [p.rollout for p, _ in items], [p.media for p, _ in items], [p.info for p, _ in items]
                )
            )
            scores[group_id] = {
                name: (merge_scores([s[name][0] for _, s in items]), sum(s[name][1] for _, s in items)) for name in self.reward_pools
            }
        return merged, scores

    def _submit(self, group: PromptGroup, step: int, worker: int | None = None) -> Generated:
        """Dispatch one group to a rollout worker (round robin unless given) and its scoring to every reward pool."""
        if worker is None:
            worker, self.next_worker = self.next_worker % len(self.rollout_pool.actors), self.next_worker + 1
        rollout, media, info = self.rollout_pool.actors[worker].generate.options(num_returns=3).remote(group)
        generated = Generated(group, step, worker, rollout, media, info)
        for name in self.reward_pools:
            self._submit_scoring(generated, name)
        return generated

    def _submit_scoring(self, generated: Generated, name: str, replica: int | None = None) -> None:
        pool = self.reward_pools[name]
        if replica is None:
            replica, self.next_replica[name] = self.next_replica[name] % len(pool.actors), self.next_replica[name] + 1
        # Passing the media ref makes Ray start scoring the moment this group's generation ends.
        generated.scores[name] = pool.actors[replica].score.remote(generated.media)
        generated.replicas[name] = replica

    # ----- waiting, with lost work reissued -----

    def _wait_generated(self, generated: Generated) -> RolloutInfo:
        """The group's RolloutInfo; if its rollout worker died, generate it again (same id, same seed)."""
        while True:
            try:
                return ray.get(generated.info)
            except ray.exceptions.RayActorError as exc:
                logger.warning(
                    "group %d was lost with rollout worker %d (%s); generating it again",
                    generated.group.group_id,
                    generated.worker,
                    type(exc).__name__,
                )
                worker = self._live_rollout_worker(generated.worker)
                # Stamped with the current version: the (restarted) worker holds the current weights now.
                group = dataclasses.replace(generated.group, policy_version=self.policy_version)
                fresh = self._submit(group, generated.step, worker)
                for f in dataclasses.fields(Generated):
                    setattr(generated, f.name, getattr(fresh, f.name))
                self.reissued += 1

    def _wait_scored(self, generated: Generated) -> dict[str, tuple[Scores, float]]:
        """Every reward's (Scores, seconds) for a generated group; a scoring lost with its replica is sent again."""
        scores = {}
        for name in self.reward_pools:
            while name not in scores:
                try:
                    scores[name] = ray.get(generated.scores[name])
                except ray.exceptions.RayActorError:
                    replica = self._live_replica(name, generated.replicas[name])
                    logger.warning(
                        "scoring of group %d by %s was lost; scoring it again on replica %d", generated.group.group_id, name, replica
                    )
                    self._submit_scoring(generated, name, replica)
                    self.rescored += 1
        return scores

    def _live_rollout_worker(self, preferred: int) -> int:
        """A rollout worker that is alive and holds the current weights: ``preferred`` once Ray has
        restarted it, else another one. A restarted worker starts at version 0, so it is sent the
        latest weights (and verified) before any work."""
        actors = self.rollout_pool.actors
        for i in [preferred, *(j for j in range(len(actors)) if j != preferred)]:
            status = _call_when_alive(lambda i=i: actors[i].status.remote())
            if status is _DEAD:
                continue  # out of restarts, or not back in time: try the next worker
            version, incarnation = status
            if incarnation != self.worker_incarnations[i]:
                self.worker_incarnations[i] = incarnation
                self.telemetry.restarted("rollout")
            if version != self.policy_version:
                logger.warning("rollout worker %d came back at version %d; sending version %d", i, version, self.policy_version)
                self.weight_sync.push([i], self.policy_version)
            return i
        raise RunAborted(f"every rollout worker is dead (rollout.max_restarts={self.config.rollout.max_restarts} used up)")

    def _live_replica(self, name: str, preferred: int) -> int:
        actors = self.reward_pools[name].actors
        for i in [preferred, *(j for j in range(len(actors)) if j != preferred)]:
            if _call_when_alive(lambda i=i: actors[i].__ray_ready__.remote()) is _DEAD:
                continue
            if i == preferred:
                self.telemetry.restarted(f"reward:{name}")
            return i
        raise RunAborted(f"every replica of reward {name!r} is dead (max_restarts used up)")

    # ----- weights -----

    def _sync_weights(self) -> SyncResult:
        """Bring every rollout worker to the new version and verify it (raygrpo/weight_sync.py); every later
        group is stamped with it. A worker that died meanwhile gets it once Ray has restarted it."""
        self.policy_version += 1
        result = self.weight_sync.sync(self.policy_version)
        for i in result.lost:
            self._live_rollout_worker(i)
        return result

    def _collect_rewards(self, in_flight: list[Generated], scores: dict[int, dict[str, tuple[Scores, float]]]):
        """Rewards ``[K, G]`` of every group that is trained, after ``scoring.on_failure``; and the counts."""
        policy = self.config.scoring.on_failure
        stats = {f"rewards/{r.name}/missing": 0.0 for r in self.config.rewards} | {"groups/dropped": 0.0}
        kept = []
        for generated in in_flight:
            group = generated.group
            per_reward = [scores[group.group_id][r.name][0] for r in self.config.rewards]
            for s in per_reward:
                stats[f"rewards/{s.reward_name}/missing"] += float((~s.valid).sum())
            if not all(s.valid.all() for s in per_reward):
                errors = {s.reward_name: sorted({e for e in s.errors if e}) for s in per_reward if not s.valid.all()}
                if policy == "abort":
                    raise RunAborted(
                        f"group {group.group_id} ({group.prompt!r}) has samples without a score: {errors} (scoring.on_failure=abort)"
                    )
                if policy == "drop_group":
                    logger.warning("dropping group %d (%r): samples without a score %s", group.group_id, group.prompt, errors)
                    stats["groups/dropped"] += 1
                    continue
                logger.warning("group %d (%r): scoring missing samples 0: %s", group.group_id, group.prompt, errors)
            kept.append((generated, np.stack([np.where(s.valid, s.values, 0.0) for s in per_reward]).astype(np.float32)))
        return kept, stats

    def _advantages(self, kept: list[tuple[Generated, np.ndarray]]) -> list[TrainGroup]:
        """Group advantages in the configured combination; best-of-N picks the members to train."""
        algo = self.config.algorithm
        if self.config.scoring.combine == "weighted_sum":
            # Flow-GRPO: one reward, the weighted sum of the raw ones, normalised once.
            kept = [(generated, (self.weights @ rewards)[None]) for generated, rewards in kept]  # [1, G]
            weights = np.ones(1, np.float32)
        else:
            weights = self.weights  # DanceGRPO: per-reward advantages, weighted in the loss
        std = global_std([r for _, r in kept], algo.advantage_ddof) if algo.global_std and kept else None
        batch = []
        for generated, rewards in kept:
            advantages = group_advantages(rewards, algo.adv_clip_max, algo.advantage_eps, algo.advantage_ddof, std)  # [K, G]
            members = (
                best_of_n_members(advantages, weights, algo.best_of_n, self.rng)
                if algo.best_of_n
                else np.arange(algo.group_size, dtype=np.int64)
            )
            batch.append(TrainGroup(generated.rollout, generated.group.group_id, advantages, weights, members))
        return batch

    def _advantage_statistics(self, batch: list[TrainGroup]) -> dict[str, float]:
        """``advantage/<reward>/{mean,std,min,max}`` over the trained members (``weighted_sum``: one row, ``total``)."""
        names = ["total"] if self.config.scoring.combine == "weighted_sum" else [r.name for r in self.config.rewards]
        return advantage_statistics([g.advantages for g in batch], [g.members for g in batch], names)

    # ----- checkpoints -----

    def _save_checkpoint(self, step: int) -> None:
        """Everything needed to continue after ``step`` exactly (raygrpo/checkpoint.py). Groups already
        drawn for later steps (max_staleness >= 1) are not saved: the data position is the one before
        they were drawn, so a resumed run draws them again."""
        position = self.data_position.get(step + 1) or {
            "prompt_order": self.order.state_dict(), "next_group_id": self.next_group_id,
            "next_worker": self.next_worker, "next_replica": dict(self.next_replica),
        }  # fmt: skip
        state = ControllerState(
            step=step,
            policy_version=self.policy_version,
            rng=self.rng.bit_generator.state,
            trained_group_ids=list(self.trained_group_ids),
            reissued=self.reissued,
            rescored=self.rescored,
            **position,
        )
        save_checkpoint(
            self.run_dir, state, self.config, lambda folder: self.learner.save_state(str(folder)), self.config.train.keep_checkpoints
        )
        self.data_position = {s: p for s, p in self.data_position.items() if s > step}

    def _restore(self) -> int:
        """Load the resume checkpoint into the learner group and this controller, send its weights to every
        rollout worker, then cut the metrics back to the steps it covers. Returns the step it was made after.

        Nothing in the run folder changes before the learner state has loaded: a checkpoint that cannot be
        loaded raises CheckpointError and leaves the folder as it was, to be resumed with the right settings.
        """
        folder = self.resume.checkpoint
        how = (
            f"compare this run's configuration with the checkpoint's ({folder / 'config.yaml'}), or delete {folder} to resume "
            "from the checkpoint before it, or start afresh with run.resume=never (or another run.name)"
        )
        try:
            state = load_controller_state(folder)
            version = self.learner.load_state(str(folder / "learner"))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise CheckpointError(f"cannot load the learner state of checkpoint {folder}: {_one_line(cause)}; {how}") from None
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"cannot read {folder / 'controller.json'}: {_one_line(exc)}; {how}") from None
        if version != state.policy_version:
            raise CheckpointError(
                f"checkpoint {folder}: the learner restored policy version {version}, the controller saved {state.policy_version}; {how}"
            )
        self.policy_version = state.policy_version
        self.next_group_id, self.next_worker, self.next_replica = state.next_group_id, state.next_worker, dict(state.next_replica)
        self.order.load_state_dict(state.prompt_order)
        self.rng.bit_generator.state = state.rng
        self.reissued, self.rescored = state.reissued, state.rescored
        self.trained_group_ids = list(state.trained_group_ids)
        if self.policy_version > 0:
            self.weight_sync.push(range(len(self.rollout_pool.actors)), self.policy_version)
        (self.run_dir / f"config-resumed-{time.strftime(RUN_STAMP)}.yaml").write_text(self.config.to_yaml())
        # Lines of steps after the checkpoint move to metrics.discarded.jsonl: this run computes those steps again.
        records = keep_steps_up_to(self.run_dir / "metrics.jsonl", state.step)
        # TensorBoard drops its events from the first recomputed step on.
        self.metrics = MetricsLog.for_run(self.run_dir, self.config, purge_step=state.step + 1)
        self.metrics.records = records
        logger.info("resumed from %s: step %d, policy version %d", folder, state.step, self.policy_version)
        return state.step

    # ----- outputs -----

    def _keep_for_gallery(self, step: int, in_flight: list[Generated], scores: dict[int, dict[str, tuple[Scores, float]]]) -> None:
        if step not in (1, self.config.train.steps):
            return
        entries = []
        for generated in in_flight[: self.config.train.sample_grid_groups]:
            per_reward = scores[generated.group.group_id]
            totals = sum(w * per_reward[r.name][0].values for w, r in zip(self.weights, self.config.rewards))  # [G]
            entries.append((generated.group, generated.media, totals))
        self.gallery[step] = entries

    def _write_gallery(self, step: int, in_flight: list[Generated], scores: dict[int, dict[str, tuple[Scores, float]]]) -> None:
        """Every sample of the first ``logging.sample_groups`` groups with its scores (raygrpo/gallery.py; the dashboard shows them)."""
        chosen = in_flight[: self.config.logging.sample_groups]
        entries = []
        for generated, media in zip(chosen, _fetch_media([g.media for g in chosen])):
            per_reward = scores[generated.group.group_id]
            values = {
                r.name: np.where(per_reward[r.name][0].valid, per_reward[r.name][0].values, np.nan).astype(np.float32)
                for r in self.config.rewards
            }
            total = sum(w * values[r.name] for w, r in zip(self.weights, self.config.rewards))
            group = generated.group
            entries.append(GalleryEntry(group.group_id, group.prompt, group.policy_version, media.images, values, total))
        write_step_gallery(self.run_dir, step, entries)

    def _export(self, checkpoint: Path) -> None:
        """``<run>/export``: the trained model as a diffusers pipeline folder (or a LoRA file), when the base
        pipeline is on this machine; otherwise the log says the command that makes it."""
        pretrained = self.config.model.pretrained
        command = f"python -m raygrpo.export {checkpoint} {self.run_dir / 'export'} --pretrained {pretrained}"
        if pretrained != "tiny-random" and not Path(pretrained).is_dir():
            logger.info("to get a diffusers pipeline folder of the trained model run: %s", command)
            return
        try:
            export_pipeline(pretrained, checkpoint, self.run_dir / "export", family=self.config.model.family)
        except ExportError as exc:
            logger.warning("could not export a diffusers pipeline (%s); the trained weights are in %s (%s)", exc, checkpoint, command)

    def _write_report(self) -> None:
        plot_reward_curve(self.metrics.path, self.run_dir / "reward_curve.png")
        rows = []
        for step in sorted({1, self.config.train.steps}):
            if step not in self.gallery:
                rows += self._grid_rows_from_gallery(step)  # a resumed run did not see that step
                continue
            entries = self.gallery[step]
            medias = _fetch_media([media for _, media, _ in entries])
            for (group, _, totals), media in zip(entries, medias):
                captions = [f"{t:.3f}" for t in totals]
                rows.append(GridRow(f"step {step}: {group.prompt}", media.images, captions))
        sample_grid(rows, self.run_dir / "samples.png")

    def _grid_rows_from_gallery(self, step: int) -> list[GridRow]:
        """The step's rows from its gallery on disk (``logging.sample_groups`` groups of it), or none when it has no gallery."""
        gallery = read_step_gallery(self.run_dir, step)
        if gallery is None:
            return []
        rows = []
        for group in gallery.groups[: self.config.train.sample_grid_groups]:
            captions = ["–" if s.total is None else f"{s.total:.3f}" for s in group.samples]
            rows.append(GridRow(f"step {step}: {group.prompt}", read_group_media(gallery, group), captions))
        return rows
