"""The controller: the single control loop of a run (the driver process of ``python -m raygrpo.run``).

It orchestrates and holds refs and small metadata only; latents, trajectories, images and weights move
between the roles through the object store (or stay in this process with ``run.in_process``). One
training step, top to bottom in :meth:`Controller.step`::

    generate : the rollout scheduler submits the prompt groups of steps t .. t + max_staleness not yet
               submitted (raygrpo/rollout/scheduler.py), each scored by every reward as soon as it is
               generated, and waits for step t's (a dead actor's work is sent again, exactly once)
    score    : ... and for their scores (raygrpo/rollout/worker.py, raygrpo/reward/worker.py)
    batch    : missing scores, advantages, best-of-N: one pure function (raygrpo/algorithms/advantages.py)
    update   : the learner group trains on the groups (raygrpo/learner/learner.py + the algorithm's file)
    sync     : the new version reaches every rollout worker, versioned and checksummed (raygrpo/weight_sync.py)
    record   : galleries (raygrpo/outputs.py) and one metrics record (raygrpo/metrics.py)

With ``train.max_staleness = 0`` this is the papers' strictly on-policy loop; with ``k >= 1`` the
groups of the next ``k`` steps are generated while this one trains, and every sample carries the
version that made it.

A run never ends as "finished" without having trained: a fatal reward answer (a server rejecting the
token), ``scoring.max_empty_steps`` steps in a row without a trained group, or no trained group at
all abort it (exit 3) with the reason. Ctrl-C and SIGTERM stop it with a resumable checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raygrpo.actor_group import get, make_group
from raygrpo.algorithms.advantages import StepBatch, build_batch
from raygrpo.checkpoint import (
    ABORTED, FINAL, RUN_STAMP, CheckpointError, ControllerState, ResumePoint,
    complete_checkpoints, load_controller_state, save_checkpoint, save_weights, step_folder, write_run_state,
)  # fmt: skip
from raygrpo.config import Config
from raygrpo.data.prompts import load_prompt_images
from raygrpo.errors import PreflightError, RunAborted, RunStopped
from raygrpo.guard.guard import Guard
from raygrpo.guard.rules import Verdict
from raygrpo.learner.group import LearnerGroup
from raygrpo.metrics import MetricsLog, PhaseTimer, StepOutcome, keep_steps_up_to, read_metrics, step_record
from raygrpo.outputs import RunOutputs
from raygrpo.placement import PlanError, resource_plan
from raygrpo.ray_metrics import NullTelemetry, RunTelemetry
from raygrpo.reward.worker import RewardWorker
from raygrpo.rollout.resize import PoolResizer
from raygrpo.rollout.scheduler import DataPosition, RolloutScheduler
from raygrpo.rollout.continuous import actor_concurrency
from raygrpo.rollout.roles import rollout_worker_class
from raygrpo.weight_sync import WeightSync

logger = logging.getLogger(__name__)

# Tests only: after writing this step's metrics the driver waits to be killed, so a test kills it at an exact point.
HOLD_AFTER_STEP_ENV = "RAYGRPO_TEST_HOLD_AFTER_STEP"


@dataclass
class RunSummary:
    run_dir: str
    steps: int
    first_reward: float  # mean total reward of the first step
    last_reward: float  # mean total reward of the last step
    metrics_file: str
    checkpoint: str


class Controller:
    def __init__(self, config: Config, run_dir: Path, prompts: list[str], resume: ResumePoint | None = None, check_rewards: bool = True):
        """``check_rewards``: ask every reward actor's service once it is up (the vLLM judge it launches); the
        driver's preflight has already asked the HTTP-backed ones (``--skip-reward-check`` turns both off)."""
        self.config, self.run_dir, self.prompts, self.resume = config, run_dir, prompts, resume
        self.check_rewards = check_rewards
        self.rng = np.random.default_rng(config.run.seed + 2)  # best-of-N picks
        self.trained_group_ids: list[int] = []
        self.finished_step = 0  # the last step whose metrics are written
        self.consistent = True  # False while the learner may hold a step that is not recorded (update .. record)
        self.empty_steps = 0  # consecutive steps that trained no group
        self.empty_errors: dict[str, dict[str, int]] = {}  # reward -> error -> items, over those steps
        self.warned_retries = False
        self.learned = False  # some trained group had unequal rewards: a non-zero advantage, a gradient
        self.flat_streak = 0  # consecutive steps whose trained groups all had equal rewards
        self.metrics: MetricsLog | None = None  # opened by run(): a resume writes nothing before its checkpoint has loaded
        self.telemetry = NullTelemetry() if config.run.in_process else RunTelemetry(run_dir.name)
        self.outputs = RunOutputs(config, run_dir)
        self.stop = _StopSignal()
        self.guard: Guard | None = None  # the reward-hacking guard (config.guard), built in _start

    # ----- lifecycle -----

    def run(self) -> RunSummary:
        last = self.config.train.steps
        with self.stop.installed():
            try:
                checkpoint = self._run_all(last)
            except KeyboardInterrupt:  # RunStopped, or what Ray makes of it when a signal cuts one of its waits short
                self._stopped(self.stop.requested or RunStopped("SIGINT", signal.SIGINT))
            finally:
                self._shutdown()
            # Last of all: until this is on disk the run is unfinished, and the same command resumes it.
            write_run_state(self.run_dir, "finished", step=last, checkpoint=FINAL)
        totals = [r["reward/total/mean"] for r in self.metrics.records]
        return RunSummary(str(self.run_dir), len(totals), totals[0], totals[-1], str(self.metrics.path), str(checkpoint))

    def _run_all(self, last: int) -> Path:
        """Start, resume, train every step, then save, report and export; returns the final checkpoint."""
        with self.stop.interruptible():
            self._start()
        done = self._restore() if self.resume is not None else 0
        self.finished_step = done
        if self.metrics is None:
            self.metrics = MetricsLog.for_run(self.run_dir, self.config)
        write_run_state(self.run_dir, "running", step=done)
        for step in tqdm(range(done + 1, last + 1), desc="training", unit="step", initial=done, total=last):
            self._run_step(step)
        if self.stop.requested:  # asked before the last step was recorded: stop there, resumable, like any step
            raise self.stop.requested
        self.stop.finishing = True
        if not self.trained_group_ids:
            self._abort(RunAborted(f"no group was trained in {last - done} step(s): {self._reward_failures()}"))
        if not self.learned:
            self._abort(RunAborted(
                f"nothing was learned in {last} step(s): in every trained group all samples got equal rewards, so every "
                "advantage was 0 and no gradient moved the weights; check that the rewards can tell the samples apart "
                "(e.g. a threshold no sample reaches)"
            ))  # fmt: skip
        # A resumed run that redid its last steps replaces the checkpoint-final an earlier attempt left.
        checkpoint = save_weights(self.run_dir, FINAL, lambda folder: self.learner.save(str(folder)), replace=True)
        # From here a killed run is finished by the same command without training again (only report and export).
        write_run_state(self.run_dir, "finishing", step=last, checkpoint=FINAL)
        self.outputs.finish(checkpoint)
        return checkpoint

    def _run_step(self, step: int) -> None:
        """One step and what follows it: its record, the run state, a checkpoint when due, the abort and stop checks."""
        try:
            record = self.step(step)
            verdict, guard_metrics = self._guard_round(step)
            self.metrics.write(record | guard_metrics)
            self.finished_step, self.consistent = step, True
            write_run_state(self.run_dir, "running", step=step)
            self._hold_if_asked(step)
            self._check_progress()
            if verdict is not None:
                self._guard_act(verdict)
            every = self.config.train.checkpoint_every
            if every and step % every == 0 and step < self.config.train.steps:
                self._save_checkpoint(step)
        except RunAborted as exc:
            self._abort(exc)
        except Exception as exc:
            self._stop_if_learner_lost(exc)
            raise
        if self.stop.requested:
            raise self.stop.requested

    def _start(self) -> None:
        """Every role's workers (Ray actors in placement groups, or objects here), ready, with their services checked."""
        config, in_process = self.config, self.config.run.in_process
        roles = {r.role: r for r in resource_plan(config)}
        n = config.rollout.num_workers
        try:
            # The learner group is fail-stop: a run whose learner dies resumes from its latest checkpoint. Placed
            # first: its ranks meet in collectives every step, so they get whole nodes before the fractional
            # reward bundles split them (Ray places one group at a time; flux.yaml on 4 x 8 GPUs had 7 + 1 ranks).
            self.learner = LearnerGroup(config, roles["learner"])
            elastic = config.rollout.autoscale is not None  # a placement group per worker: the pool can resize
            self.rollout = make_group(
                in_process, rollout_worker_class(config), roles["rollout"], [(config,)] * n,
                max_restarts=config.rollout.max_restarts, elastic=elastic, max_concurrency=actor_concurrency(config),
            )  # fmt: skip
            self.rewards = {
                r.name: make_group(in_process, RewardWorker, roles[f"reward:{r.name}"], [(r,)] * r.replicas, max_restarts=r.max_restarts, out_of_order=True)
                for r in config.rewards
            }
            groups = [self.rollout, *self.rewards.values()]
            get([ref for group in groups for ref in group.ready()] + self.learner.ready())
        except PlanError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model that does not load, a bad LoRA target...: one line, exit 2
            cause = getattr(exc, "cause", None) or exc  # Ray wraps the worker's own error
            raise PreflightError(f"the workers could not start: {_one_line(cause)}") from None
        if self.check_rewards:
            for group in self.rewards.values():
                try:
                    group.foreach("check_service")  # a vLLM judge the reward launched itself is up only now
                except Exception as exc:  # noqa: BLE001 - Ray wraps the actor's RewardServiceError
                    cause = getattr(exc, "cause", None) or exc
                    raise PreflightError(f"{cause} (checked once its reward actor was up; --skip-reward-check skips it)") from None
        self.weight_sync = WeightSync(config, self.learner, self.rollout)
        images = load_prompt_images(config.data)  # image-to-video: one conditioning image per prompt, else None
        self.scheduler = RolloutScheduler(config, self.prompts, images, self.rollout, self.rewards, self.weight_sync, self.telemetry)
        self.pool = PoolResizer(config, self.run_dir, self.scheduler)  # resize commands and rollout.autoscale
        self.guard = Guard(config, self.run_dir) if config.guard is not None else None
        where = "in this process" if in_process else "as Ray actors"
        logger.info("workers ready %s: rollout x%d, %s, learner x%d", where, n, ", ".join(f"{k} x{len(g)}" for k, g in self.rewards.items()), self.learner.world_size)

    def _shutdown(self) -> None:
        for group in [getattr(self, "rollout", None), getattr(self, "learner", None), *getattr(self, "rewards", {}).values()]:
            if group is not None:
                group.shutdown()
        if self.metrics is not None:
            self.metrics.close()
        self.telemetry.close()

    def _hold_if_asked(self, step: int) -> None:
        """Tests only: wait here after the step's record until killed, or stopped by a signal."""
        if os.environ.get(HOLD_AFTER_STEP_ENV) == str(step):
            logger.warning("%s=%d: holding here until killed or stopped", HOLD_AFTER_STEP_ENV, step)
            while not self.stop.requested:
                time.sleep(0.1)

    # ----- one training step -----

    def step(self, step: int) -> dict[str, float]:
        timer, version = PhaseTimer(), self.learner.policy_version
        reissued, rescored = self.scheduler.reissued, self.scheduler.rescored
        with timer("generate"), self.stop.interruptible():
            self.scheduler.submit_through(step, version)
            queue_depth, pool_size = self.scheduler.queue_depth, self.scheduler.pool_size
            parts = self.scheduler.wait_generated(step, version)
        with timer("score_wait"), self.stop.interruptible():
            groups = self.scheduler.wait_scored(parts, version)
        batch = build_batch(groups, self.config, self.rng)
        self._note_rewards(batch)
        trained = {g.group_id for g in batch.groups}
        staleness = np.array([version - g.policy_version for g in groups if g.group.group_id in trained], np.float64)
        learned, sync_seconds = None, 0.0
        if batch.groups:
            self.consistent = False  # the learner moves on from here; the step is whole once it is recorded
            with timer("learner"):
                learned = self.learner.update(batch.groups)
            self.trained_group_ids += [g.group_id for g in batch.groups]
            with timer("sync"):
                sync_seconds = self._sync_weights()
        self.outputs.after_step(step, groups)
        actors = {"rollout": pool_size} | {f"reward/{name}": len(g) for name, g in self.rewards.items()}
        outcome = StepOutcome(
            step, self.learner.policy_version, groups, batch, staleness, learned, sync_seconds, queue_depth,
            self.scheduler.reissued - reissued, self.scheduler.rescored - rescored, timer, actors,
        )  # fmt: skip
        record = step_record(outcome, self.config)
        record |= self.pool.after_step(record, pool_size)  # a resize command or the autoscale policy; the pool's metrics
        self.telemetry.record_step(record, queue_depth, {name: [g.seconds[name] for g in groups] for name in self.rewards})
        return record

    # ----- the reward-hacking guard (raygrpo/guard/) -----

    def _guard_round(self, step: int) -> tuple[Verdict | None, dict[str, float]]:
        """A guard round when one is due after ``step`` (held-out samples of the policy just synced): its verdict and metrics."""
        if self.guard is None or not self.guard.due(step):
            return None, {}
        workers = [i for i in range(len(self.rollout)) if i not in self.scheduler.out_of_pool]  # elastic pools: starting/leaving too
        return self.guard.run_round(step, self.rollout, workers, lambda folder: self.learner.save_state(str(folder), rollback=True))

    def _guard_act(self, verdict: Verdict) -> None:
        """warn: already logged; stop: abort (exit 3) with a resumable checkpoint; rollback: restore the learner's
        rollback state of the target round (raygrpo/learner/state.py) and bring every rollout worker to it, then go on."""
        if verdict.action == "stop":
            raise RunAborted(f"reward-hacking guard: {verdict.message()}")
        if verdict.action != "rollback":
            return
        folder = self.run_dir / verdict.rollback_to.checkpoint
        version = self.learner.load_state(str(folder))
        self.weight_sync.push([i for i in range(len(self.rollout)) if i not in self.scheduler.out_of_pool], version)
        self.guard.rolled_back()
        step = verdict.rollback_to.step
        logger.warning("guard: rolled back to the round of step %d: learner and rollout at its policy version %d", step, version)

    def _sync_weights(self) -> float:
        """Bring every rollout worker to the learner's new version and verify it; later groups are stamped with it.
        A worker that died meanwhile gets it once Ray has restarted it. Returns the sync's own seconds."""
        version = self.learner.policy_version
        result = self.weight_sync.sync(version, self.scheduler.refresh_pool(version))  # workers out of the pool wait
        for i in result.lost:
            self.scheduler.live_worker(i, version)
        return result.seconds

    def _note_rewards(self, batch: StepBatch) -> None:
        """Count steps that trained nothing (and why); say once, loudly, that a reward needed retries."""
        retries = {k.split("/")[1]: v for k, v in batch.stats.items() if k.endswith("/retries") and v > 0}
        if retries and not self.warned_retries:
            self.warned_retries = True
            logger.warning(
                "reward requests are being retried (%s this step); the per-step counts are rewards/<name>/retries and /errors",
                ", ".join(f"{name}: {int(n)}" for name, n in retries.items()),
            )
        if batch.groups:
            self.empty_steps, self.empty_errors = 0, {}
            flat = batch.stats["groups/zero_std"] >= batch.stats["groups/trained"]
            self.learned |= not flat
            self.flat_streak = self.flat_streak + 1 if flat else 0
            if self.flat_streak == 1:
                logger.warning("every trained group got equal rewards for all its samples: zero advantages, nothing to learn this step")
            return
        self.empty_steps += 1
        for name, errors in batch.errors.items():
            for error, count in errors.items():
                self.empty_errors.setdefault(name, {})[error] = self.empty_errors.get(name, {}).get(error, 0) + count

    def _check_progress(self) -> None:
        limit = self.config.scoring.max_empty_steps
        if self.empty_steps >= limit:
            raise RunAborted(f"{self.empty_steps} steps in a row trained no group (scoring.max_empty_steps={limit}): {self._reward_failures()}")

    def _reward_failures(self) -> str:
        """Which rewards failed over the empty steps, how often, and the commonest reasons."""
        if not self.empty_errors:
            return "every group was dropped, but no reward reported an error"
        parts = []
        for name, errors in self.empty_errors.items():
            common = sorted(errors.items(), key=lambda item: -item[1])[:2]
            reasons = "; ".join(f"{count}x {error[:300]}" for error, count in common)
            parts.append(f"reward {name!r} gave no score for {sum(errors.values())} samples ({reasons})")
        return "; ".join(parts)

    # ----- ends: abort, stop -----

    def _abort(self, exc: RunAborted) -> None:
        """Keep what was learned so far: the weights in a folder no later abort overwrites, and a checkpoint of the
        last finished step that the same command resumes from once the cause is fixed."""
        last = self.finished_step
        try:
            resume = self._resumable_checkpoint()
            saved = save_weights(self.run_dir, ABORTED, lambda folder: self.learner.save(str(folder)), replace=False)
        except Exception as error:
            self._stop_if_learner_lost(error, also=f"{exc}; ")  # the node that took the cause away took the learner too
            raise
        more = {"resume_from": str(resume.relative_to(self.run_dir))} if resume else {}
        write_run_state(self.run_dir, "aborted", step=last, checkpoint=saved.name, reason=str(exc), **more)
        done = f"steps 1..{last} are in {self.metrics.path}" if last else "no step finished"
        then = f"; once the cause is fixed the same command resumes from {resume}" if resume else ""
        raise RunAborted(f"{exc}; {done}; weights in {saved}{then}") from None

    def _stop_if_learner_lost(self, exc: Exception, also: str = "") -> None:
        """The learner group is fail-stop: when ``exc`` came with a dead rank (its process or its whole node died),
        end the run aborted (exit 3) with the newest complete checkpoint to resume from; nothing can be saved
        now, the ranks' shards died with them. Any other error stays the caller's to raise. ``also``: a reason
        to abort found before (it goes first in the message)."""
        dead = self.learner.dead_ranks()
        if not dead:
            return
        existing = complete_checkpoints(self.run_dir)
        resume = existing[-1] if existing else None
        cause = getattr(exc, "cause", None) or exc
        reason = f"{also}learner rank(s) {dead} of {self.learner.world_size} died ({_one_line(cause)}); the learner group is fail-stop"
        more = {"resume_from": str(resume.relative_to(self.run_dir))} if resume else {}
        write_run_state(self.run_dir, "aborted", step=self.finished_step, reason=reason, **more)
        ranks = self.config.learner.num_ranks
        then = (
            f"once the cluster has room for learner.num_ranks={ranks} again, the same command resumes from {resume}"
            if resume else "no checkpoint was saved yet (train.checkpoint_every): the same command starts the run again"
        )  # fmt: skip
        done = f"steps 1..{self.finished_step} are in {self.metrics.path}" if self.finished_step else "no step finished"
        raise RunAborted(f"{reason}; {done}; {then}") from None

    def _stopped(self, exc: RunStopped) -> None:
        """A stop asked for by a signal: a resumable checkpoint of the last finished step, and the run marked aborted."""
        self.stop.saving = True  # a further signal must not cut the checkpoint short (SIGKILL still does)
        saved = self._resumable_checkpoint()
        detail = {"checkpoint": str(saved.relative_to(self.run_dir))} if saved else {}
        write_run_state(self.run_dir, "aborted", step=self.finished_step, reason=str(exc), **detail)
        resume = f"the same command resumes from {saved}" if saved else "the same command starts it again"
        raise RunStopped(exc.signal_name, exc.signal_number, f"after step {self.finished_step}; {resume}") from None

    def _resumable_checkpoint(self) -> Path | None:
        """The checkpoint of the last finished step, written now if it is not there yet, when the learner holds
        exactly that step (always, unless a second signal cut an update short); else the newest checkpoint, or None."""
        last = self.finished_step
        if last and self.consistent and getattr(self, "scheduler", None) is not None:
            if not step_folder(self.run_dir, last).exists():
                self._save_checkpoint(last)
            return step_folder(self.run_dir, last)
        existing = complete_checkpoints(self.run_dir)
        return existing[-1] if existing else None

    # ----- checkpoints -----

    def _save_checkpoint(self, step: int) -> None:
        """Everything needed to continue after ``step`` exactly (raygrpo/checkpoint.py). Groups already
        drawn for later steps (max_staleness >= 1) are not saved: the data position is the one before
        they were drawn, so a resumed run draws them again."""
        position = self.scheduler.position_after(step)
        state = ControllerState(
            step=step,
            policy_version=self.learner.policy_version,  # a copy, checked against the learner's own on resume
            rng=self.rng.bit_generator.state,
            trained_group_ids=list(self.trained_group_ids),
            reissued=self.scheduler.reissued,
            rescored=self.scheduler.rescored,
            learned=self.learned,
            extra={"guard": self.guard.state_dict()} if self.guard is not None else {},
            **asdict(position),
        )
        save_checkpoint(self.run_dir, state, self.config, lambda folder: self.learner.save_state(str(folder)), self.config.train.keep_checkpoints)

    def _restore(self) -> int:
        """Load the resume checkpoint into the learner group and the scheduler, send its weights to every rollout
        worker, then cut the metrics back to the steps it covers. Returns the step it was made after.

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
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"cannot read {folder / 'controller.json'}: {_one_line(exc)}; {how}") from None
        except Exception as exc:  # noqa: BLE001 - a learner rank's error (DCP, shapes) arrives wrapped by Ray
            cause = getattr(exc, "cause", None) or exc
            raise CheckpointError(f"cannot load the learner state of checkpoint {folder}: {_one_line(cause)}; {how}") from None
        if version != state.policy_version:
            raise CheckpointError(f"checkpoint {folder}: the learner restored policy version {version}, the controller saved {state.policy_version}; {how}")
        self.scheduler.restore(DataPosition(state.prompt_order, state.next_group_id, state.next_worker, dict(state.next_replica)))
        self.rng.bit_generator.state = state.rng
        self.scheduler.reissued, self.scheduler.rescored = state.reissued, state.rescored
        self.trained_group_ids = list(state.trained_group_ids)
        self.learned = state.learned
        if self.guard is not None:
            self.guard.load_state_dict(state.extra.get("guard"))
        if version > 0:
            self.weight_sync.push(range(len(self.rollout)), version)
        (self.run_dir / f"config-resumed-{time.strftime(RUN_STAMP)}.yaml").write_text(self.config.to_yaml())
        # Lines of steps after the checkpoint move to metrics.discarded.jsonl: this run computes those steps again.
        records = keep_steps_up_to(self.run_dir / "metrics.jsonl", state.step)
        # TensorBoard drops its events from the first recomputed step on.
        self.metrics = MetricsLog.for_run(self.run_dir, self.config, purge_step=state.step + 1)
        self.metrics.records = records
        logger.info("resumed from %s: step %d, policy version %d", folder, state.step, version)
        return state.step


def finish_trained(config: Config, run_dir: Path) -> RunSummary:
    """Finish a run stopped after every step was trained and ``checkpoint-final`` saved: the report and the
    export again, then ``finished``. No worker is needed (and none starts)."""
    checkpoint = run_dir / FINAL
    logger.info("%s was trained to the end; writing its report and export again", run_dir)
    RunOutputs(config, run_dir).finish(checkpoint)
    write_run_state(run_dir, "finished", step=config.train.steps, checkpoint=FINAL)
    totals = [r["reward/total/mean"] for r in read_metrics(run_dir / "metrics.jsonl")]
    return RunSummary(str(run_dir), len(totals), totals[0], totals[-1], str(run_dir / "metrics.jsonl"), str(checkpoint))


class _StopSignal:
    """Ctrl-C / SIGTERM (``ray job stop``) while a run goes on.

    While the driver only waits for generation or scores, a signal stops the run at once: those waits can
    be abandoned, the learner still holds the last finished step. Elsewhere (an update, a sync, a checkpoint)
    the step finishes first and the run stops after it; a second signal stops it at once all the same. Once
    every step is trained, or while the stop's own checkpoint is written, signals only say so (SIGKILL
    still stops the process).
    """

    def __init__(self) -> None:
        self.requested: RunStopped | None = None
        self.saving = False  # the stop's checkpoint is being written: further signals wait for it
        self.finishing = False  # every step is trained: final weights, report and export go first
        self._interruptible = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers belong to the main thread (a controller driven from a thread keeps the defaults)
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        self._interruptible = True
        try:
            if self.requested:
                raise self.requested
            yield
        finally:
            self._interruptible = False

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.saving:
            logger.warning("%s: already stopping; saving the checkpoint to resume from first (SIGKILL stops without it)", name)
            return
        if self.finishing:
            logger.warning("%s: every step is trained; finishing the run first (final weights, report, export)", name)
            return
        again = self.requested is not None
        self.requested = RunStopped(name, signum)
        if self._interruptible or again:
            raise self.requested
        logger.warning("%s: the run stops once this step is recorded (send it again to stop at once)", name)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (a DCP or Ray error carries pages of traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}"


