"""Rewards with gradients, for the learner: the same scores as the reward pools' built-ins, in torch, from pixels.

The reward pools score decoded uint8 media in numpy and return numbers (metrics, galleries, advantages). Methods
that maximise a reward by backpropagation (RG-LCD's reward term, Diff-Instruct*'s reward maximisation:
raygrpo/algorithms/distill.py) need the same reward as a differentiable function of the student's pixels, in the
learner process, after the VAE decoder. :func:`differentiable_reward` builds it from ``config.rewards``.

Which built-in kinds have a torch form here (:data:`DIFFERENTIABLE_KINDS`):

* ``brightness`` (mean intensity, or ``-|mean - target|``), ``color`` (``1 - ||mean rgb - target|| / sqrt(3)``, a
  fixed target or ``from_prompt``) and ``contrast`` (std of BT.601 luma): the formulas of raygrpo/reward/builtin.py
  on pixels in [0, 1] before the uint8 rounding (the pools see the rounded image: values agree to about 1/255).

Which are not differentiable at all: ``jpeg_compressibility`` / ``jpeg_incompressibility`` (an encoder's byte
count), ``http`` (a remote server's number) and ``vlm_judge`` (a sampled answer). The neural rewards (``clip_score``,
``pickscore``, ``aesthetic``, ``hps_v2.1``, ``imagereward``, ``frame_average``) are differentiable networks but
their preprocessing here runs through PIL processors on uint8 images, so they have no torch form yet. For every
reward without one, RG-LCD's latent reward model (``reward_source: latent``) stands between the student and the
pool's scores: it learns the pool's ordering online and gives the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from raygrpo.config import RewardConfig
from raygrpo.reward.builtin import COLORS, Brightness, Color, find_color_name

NOT_DIFFERENTIABLE = ("jpeg_compressibility", "jpeg_incompressibility", "http", "vlm_judge")
"""Kinds that can never give a gradient: an encoder's size, a server's number, a judge's sampled answer."""

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as the built-in contrast reward

PixelReward = Callable[[torch.Tensor, list[str]], torch.Tensor]
"""``(pixels [B, 3, H, W] in [0, 1], B prompts) -> [B]`` with gradients through the pixels."""


def brightness(params: dict) -> PixelReward:
    target = Brightness.Params.model_validate(params).target

    def score(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        mean = pixels.float().flatten(1).mean(dim=1)  # [B]
        return mean if target is None else -(mean - target).abs()

    return score


def color(params: dict) -> PixelReward:
    parsed = Color.Params.model_validate(params)

    def score(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        names = [find_color_name(p) for p in prompts] if parsed.from_prompt else [parsed.target] * len(prompts)
        if any(n is None for n in names):
            missing = next(p for p, n in zip(prompts, names) if n is None)
            raise ValueError(f"reward 'color' (from_prompt): the prompt {missing!r} names no colour; every training prompt must")
        rgb = [COLORS[n] if isinstance(n, str) else n for n in names]
        targets = torch.tensor(rgb, dtype=torch.float32, device=pixels.device)  # [B, 3]
        mean = pixels.float().mean(dim=(2, 3))  # [B, 3]
        return 1.0 - (mean - targets).norm(dim=1) / math.sqrt(3.0)

    return score


def contrast(params: dict) -> PixelReward:
    if params:
        raise ValueError(f"reward 'contrast' takes no parameters, got {sorted(params)}")

    def score(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        weights = torch.tensor(LUMA, dtype=torch.float32, device=pixels.device).reshape(1, 3, 1, 1)
        luma = (pixels.float() * weights).sum(dim=1).flatten(1)  # [B, H*W]
        return luma.std(dim=1, unbiased=False)  # numpy's std, as the pool's

    return score


DIFFERENTIABLE_KINDS: dict[str, Callable[[dict], PixelReward]] = {"brightness": brightness, "color": color, "contrast": contrast}


def differentiable_reward(rewards: list[RewardConfig]) -> PixelReward:
    """``sum_k weight_k r_k(pixels, prompts)`` over ``rewards`` with weight != 0 (a reward's own threshold is a step
    function and has no gradient: refused). Raises ValueError naming each reward that has no torch form and why."""
    problems, terms = [], []
    for reward in rewards:
        if reward.weight == 0:
            continue
        if reward.kind in NOT_DIFFERENTIABLE:
            problems.append(f"{reward.name} ({reward.kind}) is not differentiable")
        elif reward.kind not in DIFFERENTIABLE_KINDS:
            problems.append(f"{reward.name} ({reward.kind}) has no torch form here (differentiable kinds: {', '.join(DIFFERENTIABLE_KINDS)})")
        elif reward.threshold is not None:
            problems.append(f"{reward.name} has a threshold, a step function without gradient")
        else:
            terms.append((reward.weight, DIFFERENTIABLE_KINDS[reward.kind](dict(reward.params))))
    if problems:
        raise ValueError(
            "reward_source: pixel backpropagates through the rewards, but " + "; ".join(problems)
            + ": use reward_source: latent (a latent reward model learns the pools' scores) or a differentiable reward"
        )  # fmt: skip

    def total(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(weight * score(pixels, prompts) for weight, score in terms)

    return total


__all__ = ["DIFFERENTIABLE_KINDS", "NOT_DIFFERENTIABLE", "PixelReward", "differentiable_reward"]
