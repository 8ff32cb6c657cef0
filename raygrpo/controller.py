"""The controller: the single control loop of a run (the driver process of ``python -m raygrpo.run``).

One training step, strictly on-policy (the papers' loop)::

    groups   = next prompt groups, stamped with the current policy version
    generate : rollout workers sample each group   -> Rollout ref (for the learner), GroupMedia ref, info
    score    : every reward pool scores each group as soon as that group is generated (Ray dependencies)
    advantage: per reward, group-normalised and clipped; groups with a failed score are dropped
    update   : the learner fetches the Rollout refs itself and runs the algorithm's update
    sync     : the learner exports versioned weights once; every rollout worker loads the same object

The controller holds ObjectRefs and small metadata only; latents, trajectories, images and weights
move actor to actor through the object store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from raygrpo.algorithms.advantages import best_of_n_members, global_std, group_advantages
from raygrpo.config import Config
from raygrpo.contracts import GroupMedia, PromptGroup, Scores, TrainGroup
from raygrpo.data.prompts import PromptOrder
from raygrpo.learner.learner import Learner
from raygrpo.metrics import MetricsLog
from raygrpo.placement import ActorPool, resource_plan
from raygrpo.report import GridRow, plot_reward_curve, sample_grid
from raygrpo.reward.worker import RewardWorker
from raygrpo.rollout.worker import RolloutWorker

logger = logging.getLogger(__name__)


@dataclass
class Generated:
    """Refs for one group in flight."""

    group: PromptGroup
    rollout: ray.ObjectRef
    media: ray.ObjectRef
    info: ray.ObjectRef
    scores: dict[str, ray.ObjectRef] = field(default_factory=dict)  # reward name -> (Scores, seconds)


@dataclass
class RunSummary:
    run_dir: str
    steps: int
    first_reward: float  # mean total reward of the first step
    last_reward: float  # mean total reward of the last step
    metrics_file: str
    checkpoint: str


class RunAborted(RuntimeError):
    """The run stopped on purpose (scoring.on_failure=abort); a checkpoint of the work so far was saved."""


class Controller:
    def __init__(self, config: Config, run_dir: Path, prompts: list[str]):
        self.config = config
        self.run_dir = run_dir
        self.prompts = prompts
        self.order = PromptOrder(len(prompts), seed=config.run.seed)
        self.weights = np.array([r.weight for r in config.rewards], np.float32)  # [K]
        self.rng = np.random.default_rng(config.run.seed + 2)
        self.policy_version = 0
        self.next_group_id = 0
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.gallery: dict[int, list[tuple[PromptGroup, ray.ObjectRef, np.ndarray]]] = {}

    # ----- lifecycle -----

    def run(self) -> RunSummary:
        self._start_pools()
        try:
            for step in tqdm(range(1, self.config.train.steps + 1), desc="training", unit="step"):
                try:
                    self.metrics.write(self.step(step))
                except RunAborted as exc:
                    # Keep what was learned so far; the metrics of finished steps are already on disk.
                    saved = ray.get(self.learner.save.remote(str(self.run_dir / "checkpoint-aborted")))
                    raise RunAborted(f"{exc}; steps 1..{step - 1} are in {self.metrics.path}, weights in {saved}") from None
            checkpoint = ray.get(self.learner.save.remote(str(self.run_dir / "checkpoint-final")))
            self._write_report()
        finally:
            self._stop_pools()
        totals = [r["reward/total/mean"] for r in self.metrics.records]
        return RunSummary(str(self.run_dir), len(totals), totals[0], totals[-1], str(self.metrics.path), checkpoint)

    def _start_pools(self) -> None:
        roles = {r.role: r for r in resource_plan(self.config)}
        self.rollout_pool = ActorPool(roles["rollout"], RolloutWorker, self.config)
        self.reward_pools = {r.name: ActorPool(roles[f"reward:{r.name}"], RewardWorker, r) for r in self.config.rewards}
        self.learner_pool = ActorPool(roles["learner"], Learner, self.config)
        self.learner = self.learner_pool.actors[0]
        pools = [self.rollout_pool, self.learner_pool, *self.reward_pools.values()]
        ray.get([ref for pool in pools for ref in pool.ready()])
        logger.info("actors ready: %s", ", ".join(f"{p.resources.role} x{p.resources.count}" for p in pools))

    def _stop_pools(self) -> None:
        for pool in [getattr(self, "rollout_pool", None), getattr(self, "learner_pool", None), *getattr(self, "reward_pools", {}).values()]:
            if pool is not None:
                pool.shutdown()

    # ----- one training step -----

    def step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        in_flight = [self._generate(group, i) for i, group in enumerate(self._next_groups(step))]
        infos = ray.get([g.info for g in in_flight])
        t_generated = time.perf_counter()
        scores = {g.group.group_id: {name: ray.get(ref) for name, ref in g.scores.items()} for g in in_flight}
        t_scored = time.perf_counter()
        kept, stats = self._collect_rewards(in_flight, scores)
        batch = self._advantages(kept)
        rewards = np.concatenate([r.T for _, r in kept]) if kept else np.zeros((0, len(self.config.rewards)))  # [N, K]
        stats["groups/trained"] = float(len(batch))
        stats["groups/zero_std"] = float(sum(int(np.all(r.std(axis=1) == 0)) for _, r in kept))
        learner_metrics = ray.get(self.learner.update.remote(batch)) if batch else None
        t_learned = time.perf_counter()
        if learner_metrics is not None:
            self._sync_weights()
        self._keep_for_gallery(step, in_flight, scores)
        record: dict[str, float] = {"step": step, "policy_version": self.policy_version, **stats}
        for k, reward in enumerate(self.config.rewards):
            record[f"reward/{reward.name}/mean"] = float(np.mean(rewards[:, k])) if len(rewards) else float("nan")
            record[f"reward/{reward.name}/std"] = float(np.std(rewards[:, k])) if len(rewards) else float("nan")
            record[f"time/reward/{reward.name}"] = float(sum(seconds for s in scores.values() for name, (_, seconds) in s.items() if name == reward.name))
        record["reward/total/mean"] = float(np.mean(rewards @ self.weights)) if len(rewards) else float("nan")
        if learner_metrics is not None:
            fields = asdict(learner_metrics)
            extras = fields.pop("extras")
            record.update({f"learner/{k}": float(v) for k, v in {**fields, **extras}.items()})
        record["samples/generated"] = float(len(in_flight) * self.config.algorithm.group_size)
        record["rollout/bytes_per_sample"] = float(np.mean([i.rollout_bytes for i in infos])) / self.config.algorithm.group_size
        record["time/rollout_worker_sum"] = float(sum(i.seconds for i in infos))
        record["time/generate"] = t_generated - start
        record["time/score_wait"] = t_scored - t_generated
        record["time/learner"] = t_learned - t_scored
        record["time/sync"] = time.perf_counter() - t_learned
        record["time/step"] = time.perf_counter() - start
        return record

    def _next_groups(self, step: int) -> list[PromptGroup]:
        algo = self.config.algorithm
        groups = []
        for k, prompt_id in enumerate(self.order.take(algo.groups_per_step)):
            seed = int(np.random.SeedSequence([self.config.run.seed, step, k]).generate_state(1)[0])
            groups.append(PromptGroup(self.next_group_id, prompt_id, self.prompts[prompt_id], algo.group_size, seed, self.policy_version))
            self.next_group_id += 1
        return groups

    def _generate(self, group: PromptGroup, index: int) -> Generated:
        """Dispatch one group to a rollout worker (round robin) and its scoring to every reward pool."""
        worker = self.rollout_pool.actors[index % len(self.rollout_pool.actors)]
        rollout, media, info = worker.generate.options(num_returns=3).remote(group)
        generated = Generated(group, rollout, media, info)
        for name, pool in self.reward_pools.items():
            # Passing the media ref makes Ray start scoring the moment this group's generation ends.
            generated.scores[name] = pool.actors[index % len(pool.actors)].score.remote(media)
        return generated

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
                    raise RunAborted(f"group {group.group_id} ({group.prompt!r}) has samples without a score: {errors} (scoring.on_failure=abort)")
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

    def _sync_weights(self) -> None:
        """Export once, load everywhere; every later group is stamped with the new version."""
        message = self.learner.export_weights.remote()
        versions = ray.get([worker.set_weights.remote(message) for worker in self.rollout_pool.actors])
        expected = self.policy_version + 1
        if set(versions) != {expected}:
            raise RuntimeError(f"weight sync produced versions {versions}, expected {expected} on every rollout worker")
        self.policy_version = expected

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

    def _write_report(self) -> None:
        plot_reward_curve(self.metrics.path, self.run_dir / "reward_curve.png")
        rows = []
        for step, entries in sorted(self.gallery.items()):
            medias: list[GroupMedia] = ray.get([media for _, media, _ in entries])
            for (group, _, totals), media in zip(entries, medias):
                captions = [f"{t:.3f}" for t in totals]
                rows.append(GridRow(f"step {step}: {group.prompt}", media.images, captions))
        sample_grid(rows, self.run_dir / "samples.png")
