"""A reward worker: one replica of one reward model, scoring whole groups as they finish generating."""

from __future__ import annotations

import time

import numpy as np

from raygrpo.config import RewardConfig
from raygrpo.contracts import GroupMedia, Scores
from raygrpo.reward.base import RewardServiceError, score_group
from raygrpo.reward.registry import make_reward
from raygrpo.runtime import set_torch_threads


class RewardWorker:
    def __init__(self, reward: RewardConfig):
        set_torch_threads(reward.num_cpus)
        self.name = reward.name
        self.threshold = reward.threshold
        self.reward = make_reward(reward.kind, reward.params)

    def check_service(self, timeout_s: float = 5.0) -> None:
        """Check the service this replica's reward depends on, starting it if the reward launches its own.

        Raises :class:`RewardServiceError` ``"reward '<name>': <URL>: <cause>"``; returns quietly for
        local rewards.
        """
        try:
            self.reward.check_service(timeout_s)
        except RewardServiceError as exc:
            raise RewardServiceError(f"reward {self.name!r}: {exc}") from None

    def score(self, media: GroupMedia) -> tuple[Scores, float]:
        """Scores of one group and the seconds it took; never raises.

        A reward that raises for the whole batch marks every item invalid with the error (and counts
        one failure), so the controller decides what a missing score means; the worker itself never
        dies of bad media.
        """
        start = time.perf_counter()
        try:
            scores = score_group(self.reward, media, self.name)
        except Exception as exc:  # noqa: BLE001 - any reward failure must reach the controller as data
            n = len(media.images)
            error = f"{type(exc).__name__}: {exc}"
            scores = Scores(media.group.group_id, self.name, np.full(n, np.nan, np.float32), np.zeros(n, bool), [error] * n, failures=1)
        if self.threshold is not None:
            # Binary feedback: only whether the sample clears the bar reaches the learner.
            scores.values = np.where(scores.valid, (scores.values >= self.threshold).astype(np.float32), np.nan).astype(np.float32)
        return scores, time.perf_counter() - start
