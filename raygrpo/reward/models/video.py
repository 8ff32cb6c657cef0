"""Video rewards: an image reward averaged over frames."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from raygrpo.reward.builtin import Reward, RewardParams, _mark_non_finite, make_reward


# --------------------------------------------------------------------------------------------------
# Video: an image reward averaged over frames


class RewardSpec(RewardParams):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class FrameAverage(Reward):
    """Score of a video = mean of an image reward over up to ``max_frames`` uniformly spaced frames.

    A wrapper of this project, not a published reward: the plain mean of per-frame scores, which is
    how frame-wise CLIP or aesthetic scores of videos are commonly computed (DanceGRPO itself trains
    its video models on VideoAlign, a video reward model). Frames are ``round(linspace(0, F - 1, min(F, max_frames)))``, so the first and last
    frames are always scored. Accepts videos ``[N, F, H, W, 3]`` and, unchanged, images
    ``[N, H, W, 3]`` (scored by the inner reward directly). A video is invalid in
    :meth:`score_with_errors` when any of its scored frames is.

    Params: ``reward``: ``{"kind": ..., "params": {...}}`` of any registered reward;
    ``max_frames``: at most this many frames per video are scored.
    """

    name = "frame_average"

    class Params(RewardParams):
        reward: RewardSpec
        max_frames: int = Field(8, ge=1)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        spec = self.params.reward
        try:
            self.inner = make_reward(spec.kind, spec.params)
        except ValueError as exc:
            raise ValueError(f"reward {self.name!r}: parameter 'reward': {exc}") from exc

    def frame_indices(self, num_frames: int) -> np.ndarray:
        count = min(num_frames, self.params.max_frames)
        return np.unique(np.rint(np.linspace(0, num_frames - 1, count)).astype(np.int64))

    def _frames(self, videos: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, list[str], int]:
        if not isinstance(videos, np.ndarray) or videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
            desc = f"{videos.dtype} array of shape {videos.shape}" if isinstance(videos, np.ndarray) else type(videos).__name__
            raise ValueError(f"videos must be a uint8 array [N, F, H, W, 3] (or images [N, H, W, 3]), got {desc}")
        if len(prompts) != len(videos):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        if videos.shape[1] == 0:
            raise ValueError("videos have no frames")
        index = self.frame_indices(videos.shape[1])
        frames = videos[:, index].reshape(-1, *videos.shape[2:])
        return frames, [p for p in prompts for _ in index], len(index)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        if _is_image_batch(images):
            return self.inner.score(images, prompts)
        frames, frame_prompts, k = self._frames(images, prompts)
        values = np.asarray(self.inner.score(frames, frame_prompts), dtype=np.float64).reshape(len(images), k)
        return values.mean(axis=1).astype(np.float32)

    def score_with_errors(
        self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        if _is_image_batch(images):
            return self.inner.score_with_errors(images, prompts, policy_version=policy_version)
        frames, frame_prompts, k = self._frames(images, prompts)
        values, valid, errors = self.inner.score_with_errors(frames, frame_prompts, policy_version=policy_version)
        values = np.asarray(values, dtype=np.float64).reshape(len(images), k)
        valid = np.asarray(valid, dtype=bool).reshape(len(images), k)
        index = self.frame_indices(images.shape[1])
        video_errors: list[str | None] = []
        for i in range(len(images)):
            bad = np.flatnonzero(~valid[i])  # the first invalid frame's error stands for the video
            video_errors.append(f"frame {int(index[bad[0]])}: {errors[i * k + bad[0]]}" if len(bad) else None)
        return _mark_non_finite(values.mean(axis=1), video_errors)


def _is_image_batch(array: Any) -> bool:
    """``[N, H, W, 3]``: handed to the inner reward as is (anything else must be a video batch)."""
    return isinstance(array, np.ndarray) and array.ndim == 4 and array.shape[-1] == 3
