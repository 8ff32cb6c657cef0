"""Video rewards: an image reward averaged over frames."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from pydantic import Field

from raygrpo.reward.base import Reward, RewardFactory, RewardParams, ScoreOutcome, check_batch, mark_non_finite

# --------------------------------------------------------------------------------------------------
# Video: an image reward averaged over frames


class RewardSpec(RewardParams):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class FrameAverage(Reward):
    """Score of a video = mean of an image reward over up to ``max_frames`` uniformly spaced frames.

    A wrapper of this project, not a published reward: the plain mean of per-frame scores, which is
    how frame-wise CLIP or aesthetic scores of videos are commonly computed (DanceGRPO itself trains
    its video models on VideoAlign, a video reward model). Frames are
    ``round(linspace(0, F - 1, min(F, max_frames)))``, so the first and last frames are always scored.
    Accepts videos ``[N, F, H, W, 3]`` and, unchanged, images ``[N, H, W, 3]`` (scored by the inner
    reward directly). A video is invalid in :meth:`score_outcome` when any of its scored frames is.

    Params: ``reward``: ``{"kind": ..., "params": {...}}`` of any registered reward;
    ``max_frames``: at most this many frames per video are scored. Built by the registry's
    ``make_reward``, which it is handed to build the inner reward; scoring and service checks go
    to the inner reward, whose retries, failures and fatal errors are the wrapper's.
    """

    name = "frame_average"

    class Params(RewardParams):
        reward: RewardSpec
        max_frames: int = Field(8, ge=1)

    def __init__(self, *, make_reward: RewardFactory, **params: Any) -> None:
        super().__init__(**params)
        spec = self.params.reward
        try:
            self.inner = make_reward(spec.kind, spec.params)
        except ValueError as exc:
            raise ValueError(f"reward {self.name!r}: parameter 'reward': {exc}") from exc

    @classmethod
    def from_config(cls, params: Mapping[str, Any], make_reward: RewardFactory) -> FrameAverage:
        return cls(make_reward=make_reward, **params)

    def frame_indices(self, num_frames: int) -> np.ndarray:
        count = min(num_frames, self.params.max_frames)
        return np.unique(np.rint(np.linspace(0, num_frames - 1, count)).astype(np.int64))

    def _frames(self, videos: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, list[str], int]:
        check_batch(videos, prompts, video=True)
        index = self.frame_indices(videos.shape[1])
        frames = videos[:, index].reshape(-1, *videos.shape[2:])
        return frames, [p for p in prompts for _ in index], len(index)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        if _is_image_batch(images):
            return self.inner.score(images, prompts)
        frames, frame_prompts, k = self._frames(images, prompts)
        values = np.asarray(self.inner.score(frames, frame_prompts), dtype=np.float64).reshape(len(images), k)
        return values.mean(axis=1).astype(np.float32)

    def score_outcome(self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0) -> ScoreOutcome:
        if _is_image_batch(images):
            return self.inner.score_outcome(images, prompts, policy_version=policy_version)
        frames, frame_prompts, k = self._frames(images, prompts)
        inner = self.inner.score_outcome(frames, frame_prompts, policy_version=policy_version)
        values = np.asarray(inner.values, dtype=np.float64).reshape(len(images), k)
        valid = np.asarray(inner.valid, dtype=bool).reshape(len(images), k)
        index = self.frame_indices(images.shape[1])
        video_errors: list[str | None] = []
        for i in range(len(images)):
            bad = np.flatnonzero(~valid[i])  # the first invalid frame's error stands for the video
            video_errors.append(f"frame {int(index[bad[0]])}: {inner.errors[i * k + bad[0]]}" if len(bad) else None)
        outcome = mark_non_finite(values.mean(axis=1), video_errors)
        return replace(outcome, retries=inner.retries, failures=inner.failures, fatal=inner.fatal)

    def check_service(self, timeout_s: float = 5.0, *, start_server: bool = True) -> None:
        self.inner.check_service(timeout_s, start_server=start_server)


def _is_image_batch(array: Any) -> bool:
    """``[N, H, W, 3]``: handed to the inner reward as is (anything else must be a video batch)."""
    return isinstance(array, np.ndarray) and array.ndim == 4 and array.shape[-1] == 3
