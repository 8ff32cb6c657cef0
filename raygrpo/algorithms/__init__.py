"""Algorithms: each file holds one algorithm's rollout spec and loss, its math in the docstring (``base.py``: the protocol)."""

from __future__ import annotations

import importlib

from raygrpo.algorithms.base import Algorithm, LossTerm, RolloutSpec, StepDraws, WindowGroup
from raygrpo.algorithms.dancegrpo import DanceGRPO
from raygrpo.algorithms.dgpo import DGPO
from raygrpo.config import Config

# name -> (its learner class, its rollout-spec function), as "module:attribute" in this package. Imported on first use:
# a rollout actor needs its one algorithm's rollout spec, and the student methods' modules import the reward models
# (distill.py's pixel and latent rewards), about 1 s of CPU an actor start would spend for nothing.
_ALGORITHMS: dict[str, tuple[str, str]] = {
    "dancegrpo": ("dancegrpo:DanceGRPO", "dancegrpo:rollout_spec"),
    "dgpo": ("dgpo:DGPO", "dgpo:rollout_spec"),
    "mixgrpo": ("mixgrpo:MixGRPO", "mixgrpo:rollout_spec"),
    "flow_grpo": ("flow_grpo:FlowGRPO", "flow_grpo:rollout_spec"),
    "diffusionnft": ("diffusionnft:DiffusionNFT", "diffusionnft:rollout_spec"),
    "diffusion_dpo": ("dcpo:DiffusionDPO", "dcpo:rollout_spec"),
    "dcpo": ("dcpo:DiffusionDPO", "dcpo:rollout_spec"),  # the same loss; the captions differ in the data
    "rg_lcd": ("rg_lcd:RGLCD", "distill:rollout_spec"),  # both students sample with consistency (distill.py)
    "di_star": ("di_star:DiffInstructStar", "distill:rollout_spec"),
}


def _load(name: str, half: int):
    module, attribute = _ALGORITHMS[name][half].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


def make_algorithm(config: Config) -> Algorithm:
    """The learner half of ``config.algorithm.name``."""
    return _load(config.algorithm.name, 0)(config)


def rollout_spec(config: Config) -> RolloutSpec:
    """What rollout must record for ``config.algorithm.name``."""
    return _load(config.algorithm.name, 1)(config)


__all__ = ["DGPO", "Algorithm", "DanceGRPO", "LossTerm", "RolloutSpec", "StepDraws", "WindowGroup", "make_algorithm", "rollout_spec"]
