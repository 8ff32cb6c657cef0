"""Resizing the rollout pool after each step: a command (raygrpo/rollout/control.py) or the autoscaling
policy (raygrpo/rollout/autoscale.py) sets the scheduler's target, and the step's record gets the pool's
metrics. The scheduler does the moving (raygrpo/rollout/scheduler.py, "Elastic pools").

Metrics per step: ``rollout/pool_size`` (workers that took work in the step), ``rollout/pool_target`` (the
size aimed at from now on), ``rollout/pool_pending`` / ``rollout/pool_draining`` (workers starting / leaving
now), ``rollout/joined`` / ``rollout/left`` (workers that joined / left during the step) and
``rollout/resized`` (1 when the target changed after the step). ``<run_dir>/pool-status.json`` says the same
and what became of the last command; every change of target is logged with its reason.

A command outside ``rollout.autoscale`` min..max is clamped to it (and says so); on a run without
``rollout.autoscale`` (a fixed pool in one placement group) it is refused with what to do. A command wins
over the policy: the policy starts judging again from the steps after it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from raygrpo.config import Config
from raygrpo.rollout.autoscale import AutoscalePolicy, PoolSample, worker_slots
from raygrpo.rollout.control import STATUS_FILE, CommandReader, PoolCommand, token_from_env, write_atomic
from raygrpo.rollout.scheduler import RolloutScheduler

logger = logging.getLogger(__name__)


class PoolResizer:
    def __init__(self, config: Config, run_dir: Path, scheduler: RolloutScheduler):
        self.scale, self.scheduler = config.rollout.autoscale, scheduler
        self.run_dir = Path(run_dir)
        self.commands = CommandReader(self.run_dir, token_from_env(self.scale.token_env) if self.scale else None)
        self.policy = AutoscalePolicy(self.scale, worker_slots(config)) if self.scale is not None and self.scale.auto else None
        self.history: list[PoolSample] = []
        self.joined, self.left = scheduler.joined, scheduler.left

    def after_step(self, record: dict[str, float], pool_size: int) -> dict[str, float]:
        """Apply a new command, else the policy, to the scheduler's target; the pool's metrics of the step."""
        s, before = self.scheduler, self.scheduler.target
        self.history.append(PoolSample.of(record, pool_size))
        command = self.commands.poll()
        if command is not None:
            self._apply(command)
            self.history.clear()  # the policy judges the pool the command made, from the steps after it
        elif self.policy is not None:
            decision = self.policy.decide(self.history, s.target)
            if decision.target != s.target:
                logger.warning("rollout pool autoscale: %d -> %d workers: %s", s.target, decision.target, decision.reason)
                s.resize(decision.target)
                self.history.clear()
        metrics = {
            "rollout/pool_size": float(pool_size), "rollout/pool_target": float(s.target), "rollout/pool_pending": float(len(s.pending)),
            "rollout/pool_draining": float(len(s.draining)), "rollout/joined": float(s.joined - self.joined),
            "rollout/left": float(s.left - self.left), "rollout/resized": float(s.target != before),
        }  # fmt: skip
        self.joined, self.left = s.joined, s.left
        self._write_status(int(record["step"]))
        return metrics

    def _apply(self, command: PoolCommand) -> None:
        if self.scale is None:
            outcome = (
                "refused: this run's rollout pool is fixed (one placement group); start it with rollout.autoscale: "
                "{min: M, max: N} to resize it while it runs (a checkpoint resumes with any rollout.num_workers)"
            )
            logger.warning("pool command (%d workers) %s", command.workers, outcome)
            self.commands.applied(command, outcome)
            return
        workers = min(max(command.workers, self.scale.min), self.scale.max)
        clamped = f" (clamped to autoscale min..max = {self.scale.min}..{self.scale.max})" if workers != command.workers else ""
        logger.warning("pool command: %d -> %d rollout workers%s", self.scheduler.target, workers, clamped)
        self.scheduler.resize(workers)
        self.commands.applied(command, f"applied: target {workers}{clamped}")

    def _write_status(self, step: int) -> None:
        s = self.scheduler
        status = {
            "step": step, "time": time.time(), "elastic": self.scale is not None, "auto": self.policy is not None,
            "pool_size": s.pool_size, "target": s.target, "pending": sorted(s.pending), "draining": sorted(s.draining),
            "down": sorted(s.down), "joined": s.joined, "left": s.left, "last_command": self.commands.outcome,
            "min": self.scale.min if self.scale else s.target, "max": self.scale.max if self.scale else s.target,
        }  # fmt: skip
        write_atomic(self.run_dir / STATUS_FILE, status)
