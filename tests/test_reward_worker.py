"""The reward worker turns every failure into per-item invalid scores, and the controller drops such groups."""

import numpy as np

from raygrpo.config import RewardConfig
from raygrpo.contracts import GroupMedia, PromptGroup
from raygrpo.reward.worker import RewardWorker


def media(images, prompt="a red apple"):
    return GroupMedia(PromptGroup(7, 0, prompt, len(images), 0, 0), images)


def test_scores_are_filed_under_the_configured_name():
    worker = RewardWorker(RewardConfig(name="redness", kind="color", params={"target": "red"}))
    red = np.zeros((2, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    scores, seconds = worker.score(media(red))
    assert scores.reward_name == "redness" and scores.group_id == 7
    assert scores.valid.all() and np.allclose(scores.values, 1.0) and seconds >= 0


def test_a_reward_failing_for_the_whole_batch_gives_invalid_items_with_the_error():
    worker = RewardWorker(RewardConfig(name="jpeg", kind="jpeg_compressibility"))
    scores, _ = worker.score(media(np.zeros((3, 8, 8), np.uint8)))  # not [N, H, W, 3]
    assert not scores.valid.any() and np.isnan(scores.values).all()
    assert all(e and "ValueError" in e for e in scores.errors)


def test_per_item_failures_are_reported_per_item():
    worker = RewardWorker(RewardConfig(name="c", kind="color", params={"from_prompt": True}))
    scores, _ = worker.score(media(np.zeros((2, 8, 8, 3), np.uint8), prompt="a photo of nothing"))
    assert not scores.valid.any() and "names no colour" in scores.errors[0]


def test_a_threshold_turns_any_reward_binary():
    worker = RewardWorker(RewardConfig(name="bright", kind="brightness", threshold=0.5))
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 100, 200, 255)])
    scores, _ = worker.score(media(images))
    assert scores.values.tolist() == [0.0, 0.0, 1.0, 1.0] and scores.valid.all()
