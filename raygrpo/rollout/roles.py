"""Which rollout actor a run starts: the one place that chooses among the rollout worker classes."""

from __future__ import annotations

from raygrpo.config import Config
from raygrpo.rollout.continuous import ContinuousRolloutWorker
from raygrpo.rollout.preference import OFFLINE_ALGORITHMS, PreferenceRolloutWorker
from raygrpo.rollout.worker import RolloutWorker


def rollout_worker_class(config: Config) -> type[RolloutWorker]:
    """The rollout actor class ``config`` asks for: offline preference algorithms get the worker that also encodes
    their pairs (``preference.py``), ``rollout.continuous_batching`` the batching one (``continuous.py``), else the plain one."""
    if config.algorithm.name in OFFLINE_ALGORITHMS:
        return PreferenceRolloutWorker
    return ContinuousRolloutWorker if config.rollout.continuous_batching else RolloutWorker


__all__ = ["rollout_worker_class"]
