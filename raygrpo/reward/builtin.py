"""Rewards computed from the pixels alone: no downloaded weights, no GPU, deterministic and fast.

They exist so that the whole training loop can be run and tested end to end without reward models,
and because a reward whose optimum is known (a flat red image, a tiny JPEG) makes it easy to see
whether training moves the policy at all.

Each is a :class:`~raygrpo.reward.base.Reward` registered (in :mod:`raygrpo.reward.registry`) under
its ``name``. ``score`` takes ``images`` ``[N, H, W, 3]`` uint8 and ``N`` prompts and returns ``[N]``
float32; ``score_outcome`` additionally reports per-item failures.
"""

from __future__ import annotations

import io
import math
import re
from typing import Annotated, Any, ClassVar

import numpy as np
from PIL import Image
from pydantic import Field, field_validator, model_validator

from raygrpo.reward.base import References, Reward, RewardParams, ScoreOutcome, check_batch, mark_non_finite

Unit = Annotated[float, Field(ge=0.0, le=1.0)]

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
        check_batch(images, prompts)
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
        check_batch(images, prompts)
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

    def score_outcome(self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0) -> ScoreOutcome:
        return mark_non_finite(*self._score_items(images, prompts))

    def _score_items(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, list[str | None]]:
        check_batch(images, prompts)
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


class Contrast(Reward):
    """RMS contrast: the standard deviation of the image's luma over its pixels, scaled to [0, 0.5].

    Peli, "Contrast in complex images" (JOSA A 7(10), 1990), RMS contrast; luma with the ITU-R BT.601
    weights ``Y = 0.299 R + 0.587 G + 0.114 B`` on pixel values / 255. A flat image scores 0, an image of
    half black and half white pixels 0.5. Of this project: the reward-hacking guard's gold reward for the
    JPEG-compressibility task (raygrpo/guard/), which dislikes exactly the flat images that reward drives to.
    """

    name = "contrast"

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        check_batch(images, prompts)
        luma = _flat_pixels(images) @ np.array([0.299, 0.587, 0.114]) / 255.0  # [N, H*W]
        return luma.std(axis=1).astype(np.float32)


class EditFidelity(Reward):
    """How much of its source an edit kept: ``-mean |x - r| / 255`` over pixels and channels, in [-1, 0].

    ``x`` is the output, ``r`` the item's conditioning image (:attr:`Reward.wants_references`) resized to the
    output's height and width with Lanczos, the resampling of diffusers' ``VaeImageProcessor`` (its default
    ``resample="lanczos"``), with which the flux_kontext and qwen_image_edit adapters resize the reference before
    encoding it. An unchanged copy scores 0. Videos ``[N, F, H, W, 3]`` (wan_i2v) score their first frame, the one
    image-to-video conditions on. A toy reward of this project (no paper), like :class:`Brightness`: alone its
    optimum is "change nothing", so it belongs beside a reward for the instruction (a ``vlm_judge`` with
    ``send_reference: true``), where it penalises edits that repaint what the instruction did not ask for.

    An item without a reference (a text-to-image family; an HTTP client without ``send_reference: true``) fails
    alone with an error saying so; it never scores 0.
    """

    name = "edit_fidelity"

    @property
    def wants_references(self) -> bool:
        return True

    def score(self, images: np.ndarray, prompts: list[str], *, references: References | None = None) -> np.ndarray:
        outcome = self.score_outcome(images, prompts, references=references)
        first = next((e for e in outcome.errors if e is not None), None)
        if first is not None:
            raise ValueError(f"reward 'edit_fidelity': {first}")
        return outcome.values

    def score_outcome(
        self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0, references: References | None = None
    ) -> ScoreOutcome:
        video = isinstance(images, np.ndarray) and images.ndim == 5
        n = check_batch(images, prompts, video=video)
        references = [None] * n if references is None else references
        if len(references) != n:
            raise ValueError(f"got {n} images but {len(references)} references")
        outputs = images[:, 0] if video else images  # [N, H, W, 3]
        values, errors = np.full(n, np.nan, np.float32), [None] * n
        resized: dict[int, np.ndarray] = {}  # one resize per reference array (a group shares one)
        for i, (output, reference) in enumerate(zip(outputs, references)):
            if reference is None:
                errors[i] = (
                    "edit_fidelity needs the item's conditioning image: use it with an image-conditioned family "
                    "(flux_kontext, qwen_image_edit, wan_i2v); an http reward must set send_reference: true"
                )
                continue
            if id(reference) not in resized:
                resized[id(reference)] = _resized(reference, output.shape[:2])  # [H, W, 3] float64
            values[i] = -np.abs(output.astype(np.float64) - resized[id(reference)]).mean() / 255.0
        return mark_non_finite(values, errors)


def find_color_name(prompt: str) -> str | None:
    """The earliest colour name of :data:`COLORS` in ``prompt`` (lower case), or None."""
    match = _COLOR_WORD.search(prompt)
    return match.group(1).lower() if match else None


PIXEL_REWARDS: dict[str, type[Reward]] = {
    cls.name: cls for cls in (JpegCompressibility, JpegIncompressibility, Brightness, Color, Contrast, EditFidelity)
}


def _flat_pixels(images: np.ndarray) -> np.ndarray:
    """``[N, H*W, 3]`` float64: float64 so that sums over large images stay exact."""
    return images.reshape(len(images), -1, 3).astype(np.float64)


def _jpeg_bytes(image: np.ndarray, quality: int) -> int:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def _resized(reference: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``reference`` ``[H0, W0, 3]`` uint8 as ``[H, W, 3]`` float64 of ``size`` (H, W); Lanczos, as diffusers resizes."""
    if not isinstance(reference, np.ndarray) or reference.ndim != 3 or reference.shape[-1] != 3 or reference.dtype != np.uint8:
        desc = f"{reference.dtype} array of shape {reference.shape}" if isinstance(reference, np.ndarray) else type(reference).__name__
        raise ValueError(f"a reference must be a uint8 array [H, W, 3], got {desc}")
    if reference.shape[:2] != size:
        reference = np.asarray(Image.fromarray(reference).resize((size[1], size[0]), Image.Resampling.LANCZOS))
    return reference.astype(np.float64)


def _as_rgb(target: tuple[float, float, float] | str) -> np.ndarray:
    return np.asarray(COLORS[target] if isinstance(target, str) else target, dtype=np.float64)
