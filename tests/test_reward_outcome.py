"""How a scoring call went reaches the controller: ScoreOutcome -> Scores (retries, failures, fatal)."""

from __future__ import annotations

import numpy as np
import pytest

from raygrpo.config import RewardConfig
from raygrpo.contracts import GroupMedia, PromptGroup, Scores, merge_scores
from raygrpo.reward import Reward, RewardServiceError, ScoreOutcome, score_group
from raygrpo.reward.models.video import FrameAverage
from raygrpo.reward.worker import RewardWorker


class Remote(Reward):
    """Stands for a server-backed reward: item 1 failed, the call was retried and the token refused."""

    name = "remote"

    def score(self, images, prompts):
        raise AssertionError("only score_outcome is used here")

    def score_outcome(self, images, prompts, *, policy_version=0):
        n = len(images)
        values = np.arange(n, dtype=np.float32)
        valid = np.arange(n) != 1
        errors = [None if ok else "HTTP 403" for ok in valid]
        return ScoreOutcome(np.where(valid, values, np.nan), valid, errors, retries=2, failures=1, fatal="POST http://x/v1/score: HTTP 403")

    def check_service(self, timeout_s=5.0, *, start_server=True):
        raise RewardServiceError(f"http://x: down (timeout_s={timeout_s:g}, start_server={start_server})")


def media(n: int, frames: int | None = None) -> GroupMedia:
    shape = (n, 8, 8, 3) if frames is None else (n, frames, 8, 8, 3)
    return GroupMedia(PromptGroup(5, 0, "a red cube", n, 0, policy_version=3), np.zeros(shape, np.uint8))


def test_outcome_checks_lengths_and_all_invalid_counts_one_failure():
    with pytest.raises(ValueError, match="one value, flag and error per item, got 2, 1 and 2"):
        ScoreOutcome(np.zeros(2, np.float32), np.ones(1, bool), [None, None])
    outcome = ScoreOutcome.all_invalid(3, "down", retries=2)
    assert np.isnan(outcome.values).all() and not outcome.valid.any() and outcome.errors == ["down"] * 3
    assert (outcome.retries, outcome.failures, outcome.fatal) == (2, 1, None)


def test_score_group_carries_counts_and_names_the_fatal_error():
    scores = score_group(Remote(), media(3), reward_name="judge")
    assert scores.valid.tolist() == [True, False, True] and scores.errors[1] == "HTTP 403"
    assert (scores.retries, scores.failures) == (2, 1)
    assert scores.fatal == "reward 'judge': POST http://x/v1/score: HTTP 403"


def test_merge_scores_adds_counts_and_keeps_the_first_fatal():
    def part(retries, failures, fatal):
        return Scores(5, "r", np.zeros(2, np.float32), np.ones(2, bool), retries=retries, failures=failures, fatal=fatal)

    merged = merge_scores([part(1, 0, None), part(2, 1, "first"), part(0, 1, "second")])
    assert (merged.retries, merged.failures, merged.fatal) == (3, 2, "first") and len(merged.values) == 6


def test_frame_average_passes_on_the_inner_rewards_counts_and_checks():
    # Built with a factory of our own: frame_average builds its inner reward through whatever it is handed.
    reward = FrameAverage(make_reward=lambda kind, params: Remote(), reward={"kind": "remote"}, max_frames=2)
    outcome = reward.score_outcome(media(2, frames=3).images, ["a", "b"])
    # Frames 0 and 2 of each video: flat item 1 (video 0, frame 2) failed, so video 0 is invalid.
    assert outcome.valid.tolist() == [False, True] and outcome.errors[0] == "frame 2: HTTP 403"
    assert (outcome.retries, outcome.failures, outcome.fatal) == (2, 1, "POST http://x/v1/score: HTTP 403")
    with pytest.raises(RewardServiceError, match="timeout_s=1, start_server=False"):
        reward.check_service(1.0, start_server=False)


def test_reward_worker_counts_a_raising_reward_as_one_failure():
    worker = RewardWorker(RewardConfig(name="jpeg", kind="jpeg_compressibility"))
    scores, _ = worker.score(GroupMedia(PromptGroup(7, 0, "p", 2, 0, 0), np.zeros((2, 8, 8), np.uint8)))  # not [N, H, W, 3]
    assert not scores.valid.any() and (scores.retries, scores.failures, scores.fatal) == (0, 1, None)


def test_reward_worker_check_service_names_the_reward():
    RewardWorker(RewardConfig(name="bright", kind="brightness")).check_service()  # a local reward: nothing to check
    worker = RewardWorker(RewardConfig(name="remote", kind="http", params={"url": "http://127.0.0.1:9"}))
    worker.reward = Remote()
    with pytest.raises(RewardServiceError, match=r"^reward 'remote': http://x: down \(timeout_s=2, start_server=True\)$"):
        worker.check_service(2.0)
