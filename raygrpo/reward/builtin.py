"""Rewards computed from the pixels alone: no downloaded weights, no GPU, deterministic and fast.

They exist so that the whole training loop can be run and tested end to end without reward models,
and because a reward whose optimum is known (a flat red image, a tiny JPEG) makes it easy to see
whether training moves the policy at all.

Every reward is a :class:`Reward` subclass with a registry key ``name`` and a pydantic model of its
parameters, ``Params``. Unknown or out-of-range parameters fail at construction with a
``ValueError`` that names the reward and the parameter, so a typo in a config file stops the run
before any sampling is done. ``score`` takes ``images`` ``[N, H, W, 3]`` uint8 and ``N`` prompts
and returns ``[N]`` float32; ``score_with_errors`` additionally reports per-item failures.
"""

from __future__ import annotations

import io
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raygrpo.contracts import GroupMedia, Scores

Unit = Annotated[float, Field(ge=0.0, le=1.0)]

NON_FINITE_ERROR = "non-finite score"

# Pure primaries and a few common names. The table is deliberately small: ``from_prompt`` matches
# these words in prompts, and every name added here is one more word that can match by accident.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "pink": (1.0, 0.75, 0.8),
    "brown": (0.6, 0.3, 0.1),
    "gray": (0.5, 0.5, 0.5),
    "grey": (0.5, 0.5, 0.5),
}

# Whole words only, so that "reddish" or "bluetooth" do not name a colour.
_COLOR_WORD = re.compile(r"\b(" + "|".join(sorted(COLORS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


class RewardParams(BaseModel):
    """Base of every reward's parameter model: frozen, and unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Reward(ABC):
    """A reward function over a batch of images and their prompts.

    Subclasses set ``name`` and ``Params`` and implement :meth:`score`. Instances are cheap and
    picklable, so a Ray actor can build one from ``(kind, params)`` or receive it whole.
    """

    name: ClassVar[str]
    Params: ClassVar[type[RewardParams]] = RewardParams

    def __init__(self, **params: Any) -> None:
        self.params = _validate_params(type(self), params)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({fields})"

    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """``[N]`` float32 rewards of ``images`` ``[N, H, W, 3]`` uint8; raises for the whole batch."""

    def score_with_errors(
        self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """``(values [N] float32, valid [N] bool, errors [N])``; invalid items hold NaN.

        ``policy_version`` (of the weights that made the images) is for remote rewards' logs; local ones ignore it.

        NaN rather than 0 so that a caller who forgets to check ``valid`` gets a loud NaN instead of
        a silently plausible reward. The default trusts :meth:`score` and only rejects non-finite
        values; subclasses that can fail on single items override it.
        """
        return _mark_non_finite(self.score(images, prompts), [None] * len(prompts))


def score_group(reward: Reward, media: GroupMedia, reward_name: str | None = None) -> Scores:
    """Score one sampled group; every member shares the group's prompt.

    ``reward_name`` is the configured name the scores are filed under (default: the reward's kind).
    """
    prompts = [media.group.prompt] * len(media.images)
    values, valid, errors = reward.score_with_errors(media.images, prompts, policy_version=media.group.policy_version)
    name = reward_name or reward.name
    return Scores(group_id=media.group.group_id, reward_name=name, values=values, valid=valid, errors=errors)


class JpegIncompressibility(Reward):
    """Size of the image saved as JPEG, in kB (1 kB = 1000 bytes).

    From DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", 2023,
    arXiv 2305.13301), as implemented in ``ddpo_pytorch/rewards.py`` of
    github.com/kvablack/ddpo-pytorch: PIL's JPEG encoder at quality 95, size = bytes / 1000.
    Favors detail and high-frequency texture.
    """

    name = "jpeg_incompressibility"

    class Params(RewardParams):
        quality: int = Field(default=95, ge=1, le=100)

    sign: ClassVar[float] = 1.0

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        _check_batch(images, prompts)
        sizes = [_jpeg_bytes(image, self.params.quality) / 1000.0 for image in images]
        return (self.sign * np.asarray(sizes, dtype=np.float64)).astype(np.float32)


class JpegCompressibility(JpegIncompressibility):
    """Negative JPEG size in kB: DDPO's compressibility reward (arXiv 2305.13301).

    Favors flat, smooth, low-detail images. Same encoder settings as :class:`JpegIncompressibility`.
    """

    name = "jpeg_compressibility"
    sign = -1.0


class Brightness(Reward):
    """Mean pixel intensity over all pixels and channels, scaled to [0, 1].

    With ``target`` set, the reward is ``-|mean - target|`` instead, so the optimum is an image of
    that brightness rather than pure white. A toy reward of this project (no paper): its optimum
    is known and reached quickly, which makes it a good smoke test of the training loop.
    """

    name = "brightness"

    class Params(RewardParams):
        target: Unit | None = None

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        _check_batch(images, prompts)
        mean = _flat_pixels(images).mean(axis=(1, 2)) / 255.0
        if self.params.target is not None:
            mean = -np.abs(mean - self.params.target)
        return mean.astype(np.float32)


class Color(Reward):
    """Closeness of the image's mean colour to a target colour, in [0, 1].

    ``reward = 1 - ||mean_rgb / 255 - target||_2 / sqrt(3)``; sqrt(3) is the largest possible
    distance in the unit RGB cube, so a flat image of exactly the target colour scores 1 and the
    opposite corner of the cube scores 0. A toy reward of this project (no paper), like
    :class:`Brightness`; ``from_prompt`` makes it prompt-dependent, so a policy has to read the
    prompt to do well ("a red apple" -> red, "a blue car" -> blue).

    Params: ``target`` is ``[r, g, b]`` in [0, 1] or a name from :data:`COLORS`; or
    ``from_prompt=True`` takes the first colour name found in each prompt (whole words, any case).
    Exactly one of the two must be given.
    """

    name = "color"

    class Params(RewardParams):
        target: tuple[float, float, float] | str | None = None
        from_prompt: bool = False

        # A "before" validator so that a bad target gets one message, not one per union member.
        @field_validator("target", mode="before")
        @classmethod
        def _parse_target(cls, target: Any) -> Any:
            if target is None:
                return None
            if isinstance(target, str):
                if target.lower() not in COLORS:
                    raise ValueError(f"unknown colour {target!r}; known colours: {', '.join(COLORS)}")
                return target.lower()
            try:
                rgb = np.asarray(target, dtype=np.float64)
            except (TypeError, ValueError):
                rgb = np.empty(0)
            if rgb.shape != (3,) or not np.all((rgb >= 0.0) & (rgb <= 1.0)):
                raise ValueError(f"must be a colour name or [r, g, b] with each value in [0, 1], got {target!r}")
            return tuple(float(c) for c in rgb)

        @model_validator(mode="after")
        def _one_source(self) -> Any:
            if (self.target is None) == (not self.from_prompt):
                raise ValueError("give exactly one of 'target' and 'from_prompt=True'")
            return self

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        values, errors = self._score_items(images, prompts)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise ValueError(f"reward 'color': {first}")
        return values

    def score_with_errors(
        self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        return _mark_non_finite(*self._score_items(images, prompts))

    def _score_items(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, list[str | None]]:
        _check_batch(images, prompts)
        targets, errors = self._targets(prompts)
        mean_rgb = _flat_pixels(images).mean(axis=1) / 255.0
        values = 1.0 - np.linalg.norm(mean_rgb - targets, axis=1) / math.sqrt(3.0)
        return values.astype(np.float32), errors

    def _targets(self, prompts: list[str]) -> tuple[np.ndarray, list[str | None]]:
        """``[N, 3]`` target colours (NaN where the prompt names none) and per-item errors."""
        if not self.params.from_prompt:
            return np.tile(_as_rgb(self.params.target), (len(prompts), 1)), [None] * len(prompts)
        names = [find_color_name(p) for p in prompts]
        targets = np.array([COLORS[n] if n else (math.nan,) * 3 for n in names], dtype=np.float64).reshape(-1, 3)
        errors = [None if n else f"prompt names no colour: {p!r}" for n, p in zip(names, prompts)]
        return targets, errors


def find_color_name(prompt: str) -> str | None:
    """The earliest colour name of :data:`COLORS` in ``prompt`` (lower case), or None."""
    match = _COLOR_WORD.search(prompt)
    return match.group(1).lower() if match else None


BUILTIN_REWARDS: dict[str, type[Reward]] = {
    cls.name: cls for cls in (JpegCompressibility, JpegIncompressibility, Brightness, Color)
}


def make_reward(kind: str, params: Mapping[str, Any] | None = None) -> Reward:
    """Build the built-in reward registered as ``kind`` from its parameters."""
    if kind not in BUILTIN_REWARDS:
        raise ValueError(f"unknown reward kind {kind!r}; known kinds: {', '.join(sorted(BUILTIN_REWARDS))}")
    return BUILTIN_REWARDS[kind](**dict(params or {}))


def _validate_params(cls: type[Reward], params: dict[str, Any]) -> RewardParams:
    # Re-raised as a plain ValueError with the reward's name: pydantic's own message names the
    # model class ("Params"), which is the same for every reward and useless in a config error.
    try:
        return cls.Params(**params)
    except ValidationError as exc:
        problems = [_describe(err, cls.Params) for err in exc.errors()]
        raise ValueError(f"reward {cls.name!r}: " + "; ".join(problems)) from None


def _describe(err: Mapping[str, Any], model: type[RewardParams]) -> str:
    field = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields) or "none"
        return f"unknown parameter {field!r} (known parameters: {known})"
    message = err["msg"].removeprefix("Value error, ")
    return f"parameter {field!r}: {message}" if field else message


VIDEO_HINT = (
    "score videos frame by frame with kind: frame_average, params: {reward: {kind: <this kind>, params: {...}}}, "
    "or send them whole to a video reward server with kind: http, params: {media_type: video/mp4, ...}"
)


def accepts_video(kind: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether reward ``kind`` scores videos ``[N, F, H, W, 3]`` (the media of the video model families).

    Image rewards do not: wrap them in ``frame_average``; remote video rewards take ``http`` with MP4.
    """
    return kind == "frame_average" or (kind == "http" and (params or {}).get("media_type") == "video/mp4")


def _check_batch(images: np.ndarray, prompts: list[str]) -> None:
    if isinstance(images, np.ndarray) and images.ndim == 5 and images.shape[-1] == 3:
        raise ValueError(f"this reward scores images [N, H, W, 3] but got videos {list(images.shape)} [N, F, H, W, 3]: {VIDEO_HINT}")
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        desc = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images must be a uint8 array [N, H, W, 3], got {desc}")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")


def _flat_pixels(images: np.ndarray) -> np.ndarray:
    """``[N, H*W, 3]`` float64: float64 so that sums over large images stay exact."""
    return images.reshape(len(images), -1, 3).astype(np.float64)


def _jpeg_bytes(image: np.ndarray, quality: int) -> int:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def _as_rgb(target: tuple[float, float, float] | str) -> np.ndarray:
    return np.asarray(COLORS[target] if isinstance(target, str) else target, dtype=np.float64)


def _mark_non_finite(values: np.ndarray, errors: list[str | None]) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Invalidate non-finite values; items that already carry an error keep it."""
    values = np.asarray(values, dtype=np.float32).copy()
    valid = np.isfinite(values) & np.array([e is None for e in errors], dtype=bool)
    errors = [e if e is not None or ok else NON_FINITE_ERROR for e, ok in zip(errors, valid)]
    values[~valid] = np.nan
    return values, valid, errors


# At the bottom because http.py subclasses Reward from this module (a top-level import would be circular).
from raygrpo.reward.http import HttpReward  # noqa: E402

BUILTIN_REWARDS[HttpReward.name] = HttpReward


# Neural reward models (clip_score, pickscore, aesthetic, hps_v2.1, imagereward, frame_average) are registered
# here too. Imported last: raygrpo.reward.models subclasses Reward from this module.
from raygrpo.reward.models import NEURAL_REWARDS  # noqa: E402

BUILTIN_REWARDS.update(NEURAL_REWARDS)


# The VLM judge (a vLLM server as reward); also subclasses Reward from this module, so imported last.
from raygrpo.reward.vlm_judge import VlmJudgeReward  # noqa: E402

BUILTIN_REWARDS[VlmJudgeReward.name] = VlmJudgeReward
