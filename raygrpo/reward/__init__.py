"""Rewards: the built-in pixel rewards, neural reward models, HTTP reward servers and the VLM judge.

``make_reward(kind, params)`` turns a config entry into a :class:`Reward`; ``score_group`` applies
one to a sampled group and packs the result as the :class:`~raygrpo.contracts.Scores` message;
``check_reward_service`` checks, before a run, the server a reward depends on.

Layout: :mod:`~raygrpo.reward.base` (the Reward base, ScoreOutcome, batch checks), one module per
family of rewards, :mod:`~raygrpo.reward.transport` (HTTP retries shared by the server-backed ones)
and :mod:`~raygrpo.reward.registry`, which imports them all.
"""

from raygrpo.reward.base import (
    NON_FINITE_ERROR,
    VIDEO_HINT,
    Reward,
    RewardParams,
    RewardServiceError,
    ScoreOutcome,
    score_group,
)
from raygrpo.reward.builtin import COLORS, Brightness, Color, JpegCompressibility, JpegIncompressibility, find_color_name
from raygrpo.reward.registry import BUILTIN_REWARDS, accepts_video, check_reward_service, make_reward

__all__ = [
    "BUILTIN_REWARDS",
    "COLORS",
    "NON_FINITE_ERROR",
    "VIDEO_HINT",
    "Brightness",
    "Color",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "RewardParams",
    "RewardServiceError",
    "ScoreOutcome",
    "accepts_video",
    "check_reward_service",
    "find_color_name",
    "make_reward",
    "score_group",
]
