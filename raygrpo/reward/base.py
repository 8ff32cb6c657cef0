"""What every reward shares: the :class:`Reward` base, its parameter model, the :class:`ScoreOutcome` it
returns, and the batch checks. Every reward module imports this one; this one imports no reward module.

Extension pattern: subclass :class:`Reward`, set ``name`` and ``Params``, implement :meth:`Reward.score`;
override :meth:`Reward.score_outcome` only when single items can fail (or calls are retried), and
:meth:`Reward.check_service` when the reward depends on a server. Register the class in
:mod:`raygrpo.reward.registry`.

References (image editing, image-to-video): a reward that judges an output against the image it was made from
says so with :attr:`Reward.wants_references`; it is then called ``score_outcome(..., references=...)`` with each
item's conditioning image (the edit's source, the i2v first frame). Every caller goes through
:func:`score_outcome_of`, so a reward that does not want them never sees the argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from raygrpo.contracts import GroupMedia, Scores

NON_FINITE_ERROR = "non-finite score"

VIDEO_HINT = (
    "score videos frame by frame with kind: frame_average, params: {reward: {kind: <this kind>, params: {...}}}, "
    "or send them whole to a video reward server with kind: http, params: {media_type: video/mp4, ...}"
)


class RewardParams(BaseModel):
    """Base of every reward's parameter model: frozen, and unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RewardServiceError(ValueError):
    """A service a reward depends on cannot be used: not reachable, rejecting the token, or not speaking the protocol.

    The message names the URL and the cause. A ValueError, like every other config problem the
    preflight reports, so that the run stops before any actor starts (exit 2).
    """


@dataclass(frozen=True)
class ScoreOutcome:
    """What one scoring call produced: per-item scores and how the call went.

    ``values`` ``[N]`` float32 hold NaN where ``valid`` ``[N]`` is False, and ``errors[i]`` says why.
    NaN rather than 0 so that a caller who forgets to check ``valid`` gets a loud NaN instead of a
    silently plausible reward.

    ``retries``: attempts repeated after a transient failure (transport error, timeout, 429, 5xx).
    ``failures``: calls that ended without usable scores (a request that failed after all its
    attempts, a batch the reward could not score). ``fatal``: set when no retry can help for the
    rest of the run (a server rejecting the token), naming the URL and what to fix.
    """

    values: np.ndarray
    valid: np.ndarray
    errors: list[str | None]
    retries: int = 0
    failures: int = 0
    fatal: str | None = None

    def __post_init__(self) -> None:
        if not (len(self.values) == len(self.valid) == len(self.errors)):
            raise ValueError(
                f"ScoreOutcome needs one value, flag and error per item, got {len(self.values)}, {len(self.valid)} and {len(self.errors)}"
            )

    @classmethod
    def all_invalid(cls, n: int, error: str, *, retries: int = 0, failures: int = 1, fatal: str | None = None) -> ScoreOutcome:
        """Every one of ``n`` items invalid with the same ``error``: a call that failed as a whole."""
        return cls(np.full(n, np.nan, np.float32), np.zeros(n, bool), [error] * n, retries=retries, failures=failures, fatal=fatal)


# Builds a reward from its kind and params: the registry's make_reward, handed to rewards that wrap others.
RewardFactory = Callable[[str, Mapping[str, Any]], "Reward"]

# One conditioning image per scored item, [H0, W0, 3] uint8 of any size (None: that item has none). The members of
# one group share one array object, so a reward may encode it once per group.
References = Sequence[np.ndarray | None]


class Reward(ABC):
    """A reward function over a batch of images and their prompts.

    Subclasses set ``name`` (the registry key) and ``Params`` and implement :meth:`score`.
    Instances are cheap and picklable, so a Ray actor can build one from ``(kind, params)`` or
    receive it whole. Unknown or out-of-range params fail at construction with a ``ValueError``
    naming the reward and the parameter.
    """

    name: ClassVar[str]
    Params: ClassVar[type[RewardParams]] = RewardParams

    def __init__(self, **params: Any) -> None:
        self.params = _validate_params(type(self), params)

    @classmethod
    def from_config(cls, params: Mapping[str, Any], make_reward: RewardFactory) -> Reward:
        """Build from a config entry's params; ``make_reward`` builds any reward named inside them.

        Override in rewards that wrap another one (``frame_average``); the rest take params only.
        """
        return cls(**params)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({fields})"

    @abstractmethod
    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """``[N]`` float32 rewards of ``images`` ``[N, H, W, 3]`` uint8; raises for the whole batch."""

    @property
    def wants_references(self) -> bool:
        """Whether :meth:`score_outcome` takes ``references=`` (:data:`References`): each item's conditioning image.

        False by default. A reward that compares an output with its source (``edit_fidelity``, an ``http`` or
        ``vlm_judge`` reward with ``send_reference: true``) returns True and accepts the keyword; it gets None
        where the run has no conditioning images (text-to-image families).
        """
        return False

    def score_outcome(self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0) -> ScoreOutcome:
        """Per-item scores with per-item errors, and the call's retries, failures and fatal error.

        ``policy_version`` (of the weights that made the images) is for remote rewards' logs; local
        ones ignore it. Bad arguments, and a local reward failing for the whole batch, raise; remote
        rewards turn everything that goes wrong on the wire into invalid items instead. The default
        trusts :meth:`score` and only rejects non-finite values.
        """
        return mark_non_finite(self.score(images, prompts), [None] * len(prompts))

    def check_service(self, timeout_s: float = 5.0, *, start_server: bool = True) -> None:
        """Raise :class:`RewardServiceError` when a service this reward needs cannot be used; return quietly otherwise.

        Run before training so that a dead server, a rejected token or a protocol mismatch stops
        the run at once, not after the first step. Each request gets ``timeout_s`` seconds per attempt.
        ``start_server=False`` skips rewards that launch their own server (they are checked where
        they run, after starting it). Local rewards have nothing to check.
        """


def score_group(reward: Reward, media: GroupMedia, reward_name: str | None = None) -> Scores:
    """Score one sampled group; every member shares the group's prompt.

    ``reward_name`` is the configured name the scores are filed under (default: the reward's kind);
    a fatal error is prefixed with it. Raises what :meth:`Reward.score_outcome` raises.
    """
    name = reward_name or reward.name
    if len(media.images) == 0 and media.group.group_size > 0:  # rollout sampled nothing to score (Scores.not_evaluated)
        return Scores.not_evaluated(media.group.group_id, name, media.group.group_size)
    prompts = [media.group.prompt] * len(media.images)
    image = media.group.image  # the group's conditioning image (edit source, i2v first frame), or None
    references = None if image is None else [image] * len(media.images)
    outcome = score_outcome_of(reward, media.images, prompts, references, policy_version=media.group.policy_version)
    return Scores(
        group_id=media.group.group_id,
        reward_name=name,
        values=outcome.values,
        valid=outcome.valid,
        errors=outcome.errors,
        retries=outcome.retries,
        failures=outcome.failures,
        fatal=f"reward {name!r}: {outcome.fatal}" if outcome.fatal else None,
    )


def score_outcome_of(
    reward: Reward, images: np.ndarray, prompts: list[str], references: References | None = None, *, policy_version: int = 0
) -> ScoreOutcome:
    """``reward.score_outcome(images, prompts)``, with ``references`` (one per item, or None) handed over only when
    the reward wants them (:attr:`Reward.wants_references`): rewards written before references existed keep working."""
    if not reward.wants_references:
        return reward.score_outcome(images, prompts, policy_version=policy_version)
    if references is not None and len(references) != len(images):
        raise ValueError(f"got {len(images)} images but {len(references)} references")
    return reward.score_outcome(images, prompts, policy_version=policy_version, references=references)  # type: ignore[call-arg]


def check_batch(images: np.ndarray, prompts: list[str], *, video: bool = False) -> int:
    """``N``, or a ValueError unless ``images`` is ``[N, H, W, 3]`` uint8 with one prompt per image.

    ``video=True``: ``[N, F, H, W, 3]`` uint8 with ``F >= 1`` instead. Videos handed to an image
    reward get a pointer to the ways of scoring videos.
    """
    ndim, what, shape = (5, "videos", "[N, F, H, W, 3]") if video else (4, "images", "[N, H, W, 3]")
    is_array = isinstance(images, np.ndarray)
    if not video and is_array and images.ndim == 5 and images.shape[-1] == 3:
        raise ValueError(f"this reward scores images [N, H, W, 3] but got videos {list(images.shape)} [N, F, H, W, 3]: {VIDEO_HINT}")
    if not is_array or images.ndim != ndim or images.shape[-1] != 3 or images.dtype != np.uint8:
        desc = f"{images.dtype} array of shape {images.shape}" if is_array else type(images).__name__
        raise ValueError(f"{what} must be a uint8 array {shape}, got {desc}")
    if video and images.shape[1] == 0:
        raise ValueError(f"videos have no frames (shape {images.shape})")
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} {what} but {len(prompts)} prompts")
    return len(images)


def mark_non_finite(values: np.ndarray, errors: list[str | None]) -> ScoreOutcome:
    """The outcome of ``values`` ``[N]`` and per-item ``errors``: non-finite values become invalid.

    Items that already carry an error keep it (and become NaN whatever their value).
    """
    values = np.asarray(values, dtype=np.float32).copy()
    valid = np.isfinite(values) & np.array([e is None for e in errors], dtype=bool)
    errors = [e if e is not None or ok else NON_FINITE_ERROR for e, ok in zip(errors, valid)]
    values[~valid] = np.nan
    return ScoreOutcome(values, valid, errors)


def _validate_params(cls: type[Reward], params: Mapping[str, Any]) -> RewardParams:
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
