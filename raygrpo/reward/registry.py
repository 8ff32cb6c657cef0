"""The reward registry: every reward kind a config can name, and building one from ``(kind, params)``.

This module imports every reward module; no reward module imports it. A reward that wraps others
(``frame_average``) is handed :func:`make_reward` when it is built (:meth:`Reward.from_config`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raygrpo.reward.base import VIDEO_HINT, Reward, RewardServiceError
from raygrpo.reward.builtin import PIXEL_REWARDS
from raygrpo.reward.http import HttpReward
from raygrpo.reward.models import NEURAL_REWARDS
from raygrpo.reward.vlm_judge import VlmJudgeReward

__all__ = ["BUILTIN_REWARDS", "VIDEO_HINT", "accepts_video", "check_reward_service", "make_reward", "wants_references"]

BUILTIN_REWARDS: dict[str, type[Reward]] = {
    **PIXEL_REWARDS,
    HttpReward.name: HttpReward,
    **NEURAL_REWARDS,  # clip_score, pickscore, aesthetic, hps_v2.1, imagereward, frame_average
    VlmJudgeReward.name: VlmJudgeReward,
}


def make_reward(kind: str, params: Mapping[str, Any] | None = None) -> Reward:
    """Build the reward registered as ``kind`` from its parameters; ValueError naming what is wrong."""
    if kind not in BUILTIN_REWARDS:
        raise ValueError(f"unknown reward kind {kind!r}; known kinds: {', '.join(sorted(BUILTIN_REWARDS))}")
    return BUILTIN_REWARDS[kind].from_config(dict(params or {}), make_reward)


def accepts_video(kind: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether reward ``kind`` scores videos ``[N, F, H, W, 3]`` (the media of the video model families).

    Image rewards do not: wrap them in ``frame_average``; remote video rewards take ``http`` with MP4.
    ``edit_fidelity`` compares a video's first frame with the image-to-video conditioning image.
    """
    if kind in ("frame_average", "edit_fidelity"):
        return True
    return kind == "http" and (params or {}).get("media_type") == "video/mp4"


def wants_references(kind: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether reward ``kind`` compares outputs with their conditioning image (:attr:`Reward.wants_references`),
    which only image editing and image-to-video runs have; False for params that do not build (reported elsewhere)."""
    try:
        return make_reward(kind, params).wants_references
    except (ValueError, TypeError):
        return False


def check_reward_service(name: str, kind: str, params: Mapping[str, Any] | None, timeout_s: float = 5.0) -> None:
    """Build reward ``kind`` and check the service it depends on; for the driver's preflight.

    Raises :class:`RewardServiceError` ``"reward '<name>': <URL>: <cause>"`` when the server is
    unreachable, rejects the token or does not speak its protocol, and ValueError for bad params.
    Rewards that launch their own server (``vlm_judge`` with ``serve``) are not started here: check
    those on their reward actor with ``check_service()``. A dead server fails within about
    ``2 * timeout_s`` (refused connections in well under a second).
    """
    reward = make_reward(kind, params)
    try:
        reward.check_service(timeout_s, start_server=False)
    except RewardServiceError as exc:
        raise RewardServiceError(f"reward {name!r}: {exc}") from None
