"""A reward worker: one replica of one reward model, scoring whole groups as they finish generating."""

from __future__ import annotations

import time

import numpy as np

from raygrpo.config import RewardConfig
from raygrpo.contracts import GroupMedia, Scores
from raygrpo.reward.builtin import make_reward, score_group
from raygrpo.runtime import set_torch_threads


class RewardWorker:
    def __init__(self, reward: RewardConfig):
        set_torch_threads(reward.num_cpus)
        self.name = reward.name
        self.threshold = reward.threshold
        self.reward = make_reward(reward.kind, reward.params)

    def score(self, media: GroupMedia) -> tuple[Scores, float]:
        """Scores of one group and the seconds it took.

        A reward that raises for the whole batch marks every item invalid with the error, so the
        controller decides what a missing score means; the worker itself never dies of bad media.
        """
        start = time.perf_counter()
        try:
            scores = score_group(self.reward, media, self.name)
        except Exception as exc:  # noqa: BLE001 - any reward failure must reach the controller as data
            n = len(media.images)
            scores = Scores(media.group.group_id, self.name, np.full(n, np.nan, np.float32), np.zeros(n, bool), [f"{type(exc).__name__}: {exc}"] * n)
        if self.threshold is not None:
            # Binary feedback: only whether the sample clears the bar reaches the learner.
            scores.values = np.where(scores.valid, (scores.values >= self.threshold).astype(np.float32), np.nan).astype(np.float32)
        return scores, time.perf_counter() - start
