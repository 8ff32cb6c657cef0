"""Reward functions: the built-in pixel rewards and the registry that builds them from a config.

``make_reward(kind, params)`` turns a config entry into a :class:`Reward`; ``score_group`` applies
one to a sampled group and packs the result as the :class:`~raygrpo.contracts.Scores` message.
"""

from raygrpo.reward.builtin import (
    BUILTIN_REWARDS,
    COLORS,
    NON_FINITE_ERROR,
    Brightness,
    Color,
    JpegCompressibility,
    JpegIncompressibility,
    Reward,
    RewardParams,
    find_color_name,
    make_reward,
    score_group,
)

__all__ = [
    "BUILTIN_REWARDS",
    "COLORS",
    "NON_FINITE_ERROR",
    "Brightness",
    "Color",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Reward",
    "RewardParams",
    "find_color_name",
    "make_reward",
    "score_group",
]
