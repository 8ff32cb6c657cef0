"""Algorithms: each file holds one algorithm's rollout spec and learner update, its math in the docstring."""

from __future__ import annotations

from raygrpo.algorithms import dancegrpo, dgpo
from raygrpo.algorithms.dancegrpo import DanceGRPO, RolloutSpec
from raygrpo.algorithms.dgpo import DGPO
from raygrpo.config import Config

_ALGORITHMS = {"dancegrpo": (DanceGRPO, dancegrpo.rollout_spec), "dgpo": (DGPO, dgpo.rollout_spec)}


def make_algorithm(config: Config) -> DanceGRPO | DGPO:
    """The learner half of ``config.algorithm.name``."""
    return _ALGORITHMS[config.algorithm.name][0](config)


def rollout_spec(config: Config) -> RolloutSpec:
    """What rollout must record for ``config.algorithm.name``."""
    return _ALGORITHMS[config.algorithm.name][1](config)


__all__ = ["DGPO", "DanceGRPO", "RolloutSpec", "make_algorithm", "rollout_spec"]
