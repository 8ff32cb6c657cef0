"""Rewards with gradients, for the learner: the same scores as the reward pools' built-ins, in torch, from pixels.

The reward pools score decoded uint8 media in numpy and return numbers (metrics, galleries, advantages). Methods
that maximise a reward by backpropagation (RG-LCD's reward term, Diff-Instruct*'s reward maximisation:
raygrpo/algorithms/distill.py) need the same reward as a differentiable function of the student's pixels, in the
learner process, after the VAE decoder. :func:`differentiable_reward` builds it from ``config.rewards``.

Which built-in kinds have a torch form here (:data:`DIFFERENTIABLE_KINDS`):

* ``brightness`` (mean intensity, or ``-|mean - target|``), ``color`` (``1 - ||mean rgb - target|| / sqrt(3)``, a
  fixed target or ``from_prompt``) and ``contrast`` (std of BT.601 luma): the formulas of raygrpo/reward/builtin.py
  on pixels in [0, 1] before the uint8 rounding (the pools see the rounded image: values agree to about 1/255).
* the neural rewards ``clip_score``, ``pickscore``, ``aesthetic``, ``hps_v2.1`` and ``imagereward``
  (raygrpo/reward/models/): the pool's networks and weights, loaded through the same code
  (:meth:`~raygrpo.reward.models.NeuralReward.score_pixels`) once per :func:`differentiable_reward` call, on the
  first call's pixels' device (or ``device``) in the reward's ``dtype`` (or ``dtype``), frozen (eval mode,
  ``requires_grad`` False: the gradient reaches the pixels, never the reward's weights). The processor's PIL
  preprocessing is redone in torch (raygrpo/reward/models/pixels.py: the same resize filter and sizes in PIL's two
  separable passes, centre crop, mean/std); prompts are tokenised (CLIP: encoded) once each and cached. On the
  same image (pixels = uint8 / 255) the preprocessed inputs differ from PIL's by at most about 1.1 uint8 levels
  (mean 0.3: PIL rounds to uint8 after each pass), and the scores of the tiny random test models by less than
  1e-3 relative to their spread over images (tests/test_differentiable_reward.py states the bounds it checks).
  The learner's pixels are not rounded to uint8 as the pools' are: a further difference of the same order.
* ``frame_average`` (videos ``[B, 3, F, H, W]``, the VAE decoder's layout; images ``[B, 3, H, W]`` go to the inner
  reward as they are): the inner reward's torch form on the same frames as the pool
  (:meth:`~raygrpo.reward.models.FrameAverage.frame_indices`), averaged per video.

Which are not differentiable at all: ``jpeg_compressibility`` / ``jpeg_incompressibility`` (an encoder's byte
count), ``http`` (a remote server's number) and ``vlm_judge`` (an answer sampled from a language model's tokens; its
parsed number is a step function of the image). For these, RG-LCD's latent reward model (``reward_source: latent``)
stands between the student and the pool's scores: it learns the pool's ordering online and gives the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from raygrpo.config import RewardConfig
from raygrpo.reward.builtin import COLORS, Brightness, Color, find_color_name
from raygrpo.reward.models import NEURAL_REWARDS, FrameAverage, NeuralReward
from raygrpo.reward.registry import make_reward

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


class NoTorchForm(ValueError):
    """A reward kind without a differentiable form; the message is a predicate ("is not differentiable")."""


class NeuralPixelReward:
    """A neural reward's torch form (:meth:`~raygrpo.reward.models.NeuralReward.score_pixels`).

    Built from the reward's params at once, so a weights path that cannot be found is an error before training;
    the networks load at the first call (once per object), on ``params["device"]`` when given, else on the
    pixels' device: the learner's, whatever GPU the pool's entry names.
    """

    def __init__(self, kind: str, params: dict):
        self.kind, self.params = kind, dict(params)
        self.reward = self._build(self.params)
        self.on_device = "device" in self.params

    def _build(self, params: dict) -> NeuralReward:
        reward = make_reward(self.kind, params)
        if not isinstance(reward, NeuralReward):
            raise NoTorchForm(f"is {type(reward).__name__}, not a neural reward")
        return reward

    def __call__(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if not self.on_device:
            self.reward, self.on_device = self._build({**self.params, "device": str(pixels.device)}), True
        return self.reward.score_pixels(pixels, prompts)


def frame_average(params: dict) -> PixelReward:
    """The inner reward's torch form averaged over the frames the pool scores: ``[B, 3, F, H, W] -> [B]``;
    images ``[B, 3, H, W]`` are scored by the inner reward directly, as the pool does."""
    wrapper = FrameAverage.from_config(params, make_reward)  # checks params, picks the pool's frames
    spec = wrapper.params.reward
    try:
        inner = torch_form(spec.kind, spec.params)
    except NoTorchForm as exc:
        raise NoTorchForm(f"averages {spec.kind}, which {exc}") from None

    def score(pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if pixels.ndim == 4:
            return inner(pixels, prompts)
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"reward 'frame_average': pixels must be [B, 3, F, H, W] or [B, 3, H, W], got {tuple(pixels.shape)}")
        index = torch.as_tensor(wrapper.frame_indices(pixels.shape[2]), device=pixels.device)  # [k]
        frames = pixels.index_select(2, index).transpose(1, 2).flatten(0, 1)  # [B*k, 3, H, W], video-major
        values = inner(frames, [p for p in prompts for _ in range(len(index))])  # [B*k]
        return values.reshape(len(pixels), len(index)).mean(dim=1)  # [B]

    return score


NEURAL_KINDS = tuple(kind for kind, cls in NEURAL_REWARDS.items() if issubclass(cls, NeuralReward))
"""clip_score, pickscore, aesthetic, hps_v2.1, imagereward."""

DIFFERENTIABLE_KINDS: dict[str, Callable[[dict], PixelReward]] = {
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    **{kind: partial(NeuralPixelReward, kind) for kind in NEURAL_KINDS},
    "frame_average": frame_average,
}
"""Kind -> ``factory(params) -> PixelReward``, params as in the reward's config entry."""


def torch_form(kind: str, params: dict) -> PixelReward:
    """The differentiable form of reward ``kind``; :class:`NoTorchForm` when it has none."""
    if kind in NOT_DIFFERENTIABLE:
        raise NoTorchForm("is not differentiable")
    if kind not in DIFFERENTIABLE_KINDS:
        raise NoTorchForm(f"has no torch form here (differentiable kinds: {', '.join(DIFFERENTIABLE_KINDS)})")
    return DIFFERENTIABLE_KINDS[kind](dict(params))


def placed(kind: str, params: dict, device: torch.device | str | None, dtype: str | None) -> dict:
    """``params`` of a neural reward (or of one inside ``frame_average``) moved to the learner: ``device`` (None:
    the pixels' device, whatever the pool's entry names) and ``dtype`` (None: the entry's own)."""
    params = dict(params)
    if kind == "frame_average" and isinstance(params.get("reward"), dict):
        inner = params["reward"]
        params["reward"] = {**inner, "params": placed(inner.get("kind", ""), dict(inner.get("params") or {}), device, dtype)}
    elif kind in NEURAL_KINDS:
        params.pop("device", None)
        if device is not None:
            params["device"] = str(device)
        if dtype is not None:
            params["dtype"] = dtype
    return params


@dataclass(frozen=True)
class RewardSum:
    """``sum_k weight_k r_k(pixels, prompts)``: a :data:`PixelReward` over ``terms`` ``[(weight_k, r_k)]``."""

    terms: list[tuple[float, PixelReward]]

    def __call__(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(weight * score(pixels, prompts) for weight, score in self.terms)


def differentiable_reward(rewards: list[RewardConfig], device: torch.device | str | None = None, dtype: str | None = None) -> RewardSum:
    """``sum_k weight_k r_k(pixels, prompts)`` over ``rewards`` with weight != 0 (a reward's own threshold is a step
    function and has no gradient: refused). Neural rewards run on ``device`` (None: the pixels' device) in ``dtype``
    (``"float32"`` / ``"bfloat16"`` / ``"float16"``; None: each entry's own). Raises ValueError naming each reward
    that has no torch form and why."""
    problems, terms = [], []
    for reward in rewards:
        if reward.weight == 0:
            continue
        try:
            form = torch_form(reward.kind, placed(reward.kind, dict(reward.params), device, dtype))
        except NoTorchForm as exc:
            problems.append(f"{reward.name} ({reward.kind}) {exc}")
            continue
        if reward.threshold is not None:
            problems.append(f"{reward.name} has a threshold, a step function without gradient")
        else:
            terms.append((reward.weight, form))
    if problems:
        raise ValueError(
            "reward_source: pixel backpropagates through the rewards, but " + "; ".join(problems)
            + ": use reward_source: latent (a latent reward model learns the pools' scores) or a differentiable reward"
        )  # fmt: skip

    return RewardSum(terms)


__all__ = [
    "DIFFERENTIABLE_KINDS",
    "NEURAL_KINDS",
    "NOT_DIFFERENTIABLE",
    "NeuralPixelReward",
    "NoTorchForm",
    "PixelReward",
    "RewardSum",
    "differentiable_reward",
    "torch_form",
]
