"""The data that moves between roles: one dataclass per message, every field with one meaning.

Heavy arrays are numpy, not torch: Ray stores numpy arrays zero-copy in the object store (a 64 MB
array puts in ~10 ms and gets in ~0.5 ms here, against 100-350 ms for a pickled torch tensor).
Receivers turn them into tensors with :func:`as_tensor`.

Flow of one training step (see ``controller.py``)::

    Controller --PromptGroup--> RolloutWorker --Rollout (ref)-------------------> Learner
                                              \\--GroupMedia (ref)--> RewardWorker --Scores--> Controller
    Controller --TrainGroup (advantages + Rollout ref)--> Learner --LearnerMetrics--> Controller
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch


def as_tensor(array: np.ndarray, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A writable tensor from an array that may be a read-only object-store view."""
    tensor = torch.from_numpy(np.array(array, copy=True))
    return tensor.to(device=device, dtype=dtype) if dtype is not None else tensor.to(device)


@dataclass(frozen=True)
class PromptGroup:
    """One prompt to be sampled ``group_size`` times; the unit of work of the rollout side."""

    group_id: int  # unique within a run; the key that ties Rollout, GroupMedia and Scores together
    prompt_id: int  # index of the prompt in the data set
    prompt: str
    group_size: int  # G
    seed: int  # seeds the initial noise and the SDE noise of the whole group
    policy_version: int  # version of the weights the controller wants this group sampled with
    image: np.ndarray | None = None  # [H, W, 3] uint8 conditioning image (editing, image-to-video; rewards' reference); None: text-only
    member_offset: int = 0  # index of this request's first member when a group is spread over workers (Flow-GRPO)


@dataclass
class Conditioning:
    """Conditioning of one prompt (and image), computed once and sent once per group (not per sample).

    Which fields are set depends on the model family; absent ones are None.
    """

    prompt_embeds: np.ndarray  # [L, D_text] float32 (FLUX: T5 hidden states; SD3: joint CLIP+T5 sequence)
    pooled_prompt_embeds: np.ndarray | None = None  # [D_pool] float32 (FLUX/SD3/HunyuanVideo: CLIP pooled output)
    prompt_mask: np.ndarray | None = None  # [L] int64, 1 = real token (families whose network takes a mask)
    image_embeds: np.ndarray | None = None  # [N, D_img] float32, image-encoder states (image-to-video)
    image_latents: np.ndarray | None = None  # VAE latents (and mask channels) of the conditioning image (image-to-video)

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.prompt_embeds, self.pooled_prompt_embeds, self.prompt_mask, self.image_embeds, self.image_latents) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


@dataclass
class ConditioningBatch:
    """A :class:`Conditioning` as tensors on the model's device, expanded to ``B`` samples (what
    model adapters' ``velocity`` takes). Expansion is a view: one copy per group, not per sample."""

    prompt_embeds: torch.Tensor  # [B, L, D_text]
    pooled_prompt_embeds: torch.Tensor | None = None  # [B, D_pool]
    prompt_mask: torch.Tensor | None = None  # [B, L]
    image_embeds: torch.Tensor | None = None  # [B, N, D_img]
    image_latents: torch.Tensor | None = None  # [B, ...]

    @classmethod
    def of(cls, cond: Conditioning, batch: int, device: torch.device | str = "cpu") -> ConditioningBatch:
        def expand(array: np.ndarray | None) -> torch.Tensor | None:
            if array is None:
                return None
            tensor = as_tensor(array, device)[None]
            return tensor.expand(batch, *tensor.shape[1:])

        return cls(
            prompt_embeds=expand(cond.prompt_embeds),
            pooled_prompt_embeds=expand(cond.pooled_prompt_embeds),
            prompt_mask=expand(cond.prompt_mask),
            image_embeds=expand(cond.image_embeds),
            image_latents=expand(cond.image_latents),
        )

    def __len__(self) -> int:
        return len(self.prompt_embeds)

    def rows(self, index: slice) -> ConditioningBatch:
        """The conditioning of samples ``index`` (a learner micro-batch); views, no copies."""
        return ConditioningBatch(**{f.name: None if (t := getattr(self, f.name)) is None else t[index] for f in fields(self)})

    @classmethod
    def concat(cls, batches: list[ConditioningBatch]) -> ConditioningBatch:
        """The rows of ``batches`` (several prompts) stacked in order: one batch for one forward (continuous batching).
        A single batch comes back as it is (no copy). Every prompt of a family has the same padded shapes."""
        if len(batches) == 1:
            return batches[0]
        stacked = {}
        for f in fields(cls):
            tensors = [getattr(b, f.name) for b in batches]
            if any(t is None for t in tensors):
                if any(t is not None for t in tensors):
                    raise ValueError(f"ConditioningBatch.concat: {f.name} is set in some batches and None in others (mixed model families?)")
                stacked[f.name] = None
                continue
            if len({tuple(t.shape[1:]) for t in tensors}) > 1:
                raise ValueError(f"ConditioningBatch.concat: {f.name} rows differ in shape {sorted({tuple(t.shape[1:]) for t in tensors})}")
            stacked[f.name] = torch.cat(tensors)
        return cls(**stacked)


@dataclass
class Rollout:
    """What the learner needs from one sampled group. Decoded media never travel with it."""

    group: PromptGroup
    policy_version: int  # version of the weights that actually produced these samples
    conditioning: Conditioning
    sigmas: np.ndarray  # [T+1] float32, the noise levels of the sampler, sigmas[0] = 1
    final_latents: np.ndarray  # [G, S, D] float32, packed latents the media were decoded from
    # GRPO-style algorithms record the trajectory; ODE-only algorithms leave these as None.
    trajectory: np.ndarray | None = None  # [G, W+1, S, D] float32, x at steps start..stop (every step: x_0 (noise) .. x_T)
    log_probs: np.ndarray | None = None  # [G, W] float32, log pi_old(x_{i+1} | x_i) of steps start..stop-1, element mean
    window: tuple[int, int] | None = None  # [start, stop): the SDE steps recorded (Flow-GRPO-Fast, MixGRPO); None: all T

    def __post_init__(self) -> None:
        g = self.group.group_size
        if self.final_latents.shape[0] != g:
            raise ValueError(f"final_latents has {self.final_latents.shape[0]} samples, group size is {g}")
        start, stop = self.sde_steps
        if not 0 <= start < stop <= len(self.sigmas) - 1:
            raise ValueError(f"window {self.window} is not a non-empty range of the {len(self.sigmas) - 1} steps")
        if self.trajectory is not None:
            w = stop - start
            if self.trajectory.shape[:2] != (g, w + 1):
                raise ValueError(f"trajectory shape {self.trajectory.shape} does not start with (G, W+1) = ({g}, {w + 1})")
            if self.log_probs is None or self.log_probs.shape != (g, w):
                raise ValueError(f"log_probs must have shape (G, W) = ({g}, {w}) when a trajectory is recorded")

    @property
    def sde_steps(self) -> tuple[int, int]:
        """``(start, stop)``: ``trajectory[:, k]`` is x at grid step ``start + k`` (noise level ``sigmas[start + k]``)
        and ``log_probs[:, k]`` the log-prob of step ``start + k``; ``(0, T)`` without a window."""
        return self.window if self.window is not None else (0, len(self.sigmas) - 1)

    @property
    def nbytes(self) -> int:
        """Bytes of array data that reach the learner for this group."""
        arrays = [self.final_latents, self.sigmas, *self.conditioning.arrays()]
        arrays += [a for a in (self.trajectory, self.log_probs) if a is not None]
        return sum(a.nbytes for a in arrays)


def merge_rollouts(parts: list[Rollout]) -> Rollout:
    """One group's Rollout from the parts several workers generated (in member order).

    Every part carries its own members' old log-probs, so a part sampled with older weights after a
    reissue still gets the right importance ratio; the merged version is the oldest part's.
    """
    parts = sorted(parts, key=lambda r: r.group.member_offset)
    first = parts[0]
    if len(parts) == 1:
        return first
    if len({r.group.group_id for r in parts}) != 1 or any(not np.array_equal(r.sigmas, first.sigmas) or r.window != first.window for r in parts):
        raise ValueError("merge_rollouts: the parts belong to different groups or were sampled on different noise grids or SDE windows")
    size = sum(r.group.group_size for r in parts)
    stack = lambda arrays: None if arrays[0] is None else np.concatenate(arrays)  # noqa: E731
    return Rollout(
        group=replace(first.group, group_size=size, member_offset=0),
        policy_version=min(r.policy_version for r in parts),
        conditioning=first.conditioning,
        sigmas=first.sigmas,
        final_latents=np.concatenate([r.final_latents for r in parts]),
        trajectory=stack([r.trajectory for r in parts]),
        log_probs=stack([r.log_probs for r in parts]),
        window=first.window,
    )


@dataclass
class GroupMedia:
    """Decoded samples of one group, for the reward side only.

    Video families (hunyuan_video, wan_i2v) put videos here, ``[G, F, H, W, 3]`` with ``F`` frames:
    image rewards score them through ``frame_average``, remote ones as MP4 (``http``, ``video/mp4``).
    """

    group: PromptGroup
    images: np.ndarray  # [G, H, W, 3] uint8 images, or [G, F, H, W, 3] uint8 videos


# The error of every member of a group that was not sampled for evaluation (Scores.not_evaluated).
NOT_EVALUATED = "not evaluated: this group sampled nothing to score (algorithm.eval_groups / eval_every)"


@dataclass
class Scores:
    """One reward model's verdict on one group, and how getting it went."""

    group_id: int
    reward_name: str
    values: np.ndarray  # [G] float32; meaningless where valid is False
    valid: np.ndarray  # [G] bool
    errors: list[str | None] = field(default_factory=list)  # [G], why an item has no score
    retries: int = 0  # attempts repeated after a transient failure (transport error, timeout, 429, 5xx)
    failures: int = 0  # calls that ended without usable scores (failed after all attempts, or the reward raised)
    fatal: str | None = None  # set when retrying can never help for the rest of the run (e.g. 401/403); names reward, URL, fix

    def __post_init__(self) -> None:
        if not self.errors:
            self.errors = [None] * len(self.values)
        if not (len(self.values) == len(self.valid) == len(self.errors)):
            raise ValueError("Scores.values, valid and errors must have one entry per group member")

    @classmethod
    def not_evaluated(cls, group_id: int, reward_name: str, n: int) -> Scores:
        """The scores of a group that sampled nothing to score (an offline algorithm's pair between evaluations,
        Diffusion-DPO's ``algorithm.eval_groups``): no member has one, and none is missing."""
        return cls(group_id, reward_name, np.full(n, np.nan, np.float32), np.zeros(n, bool), [NOT_EVALUATED] * n)

    @property
    def evaluated(self) -> bool:
        return not self.errors or self.errors[0] != NOT_EVALUATED


def merge_scores(parts: list[Scores]) -> Scores:
    """One reward's Scores of a whole group from the Scores of its parts, in member order.

    Retries and failures add up; the first fatal error is kept.
    """
    if len(parts) == 1:
        return parts[0]
    return Scores(
        group_id=parts[0].group_id,
        reward_name=parts[0].reward_name,
        values=np.concatenate([p.values for p in parts]),
        valid=np.concatenate([p.valid for p in parts]),
        errors=[e for p in parts for e in p.errors],
        retries=sum(p.retries for p in parts),
        failures=sum(p.failures for p in parts),
        fatal=next((p.fatal for p in parts if p.fatal is not None), None),
    )


@dataclass
class TrainGroup:
    """One whole group as the learner trains on it.

    ``rollout`` is a Ray ObjectRef to a :class:`Rollout` (resolved on the learner, never on the
    controller). Whole groups only: group statistics and DGPO's gate need every member.
    """

    rollout: object  # ray.ObjectRef[Rollout], or a list of them for a group spread over workers (merge_rollouts)
    group_id: int
    advantages: np.ndarray  # [K, G] float32, one row per reward (already clipped)
    reward_weights: np.ndarray  # [K] float32, the loss weight of each reward's advantage
    members: np.ndarray  # [M] int64, indices of the members to train on (all, or best-of-N)


@dataclass
class ScoredGroup:
    """A whole group back from rollout and from every reward (the rollout scheduler's answer to the controller).

    Refs stay refs: the controller never fetches a Rollout; it fetches media only for galleries.
    """

    group: PromptGroup  # the whole group (member_offset 0)
    rollout: object  # ref to its Rollout, or a list of its parts' refs in member order (spread_groups)
    media: object  # likewise for its GroupMedia
    infos: list[RolloutInfo]  # one per part
    scores: dict[str, Scores]  # reward name -> every member's scores
    seconds: dict[str, float]  # reward name -> seconds its replicas spent scoring it

    @property
    def evaluated(self) -> bool:
        """Whether the group sampled members for the rewards (False: an offline pair trained without evaluation)."""
        return all(s.evaluated for s in self.scores.values())

    @property
    def policy_version(self) -> int:
        """The version that sampled it (a group's oldest part decides)."""
        return min(info.policy_version for info in self.infos)


@dataclass
class RolloutInfo:
    """What the controller learns about a generated group without fetching it.

    Two clocks: ``seconds`` is the group's latency (the generate call, start to return) and ``busy_seconds`` the
    worker's time spent on it. A plain worker runs one group at a time, so the two are equal. A continuous-batching
    worker (raygrpo/rollout/continuous.py) runs many at once: latencies overlap and add up to more than its wall
    time, while busy seconds split each shared forward between the groups in it by rows, so a worker's groups add
    up to the wall seconds it spent working (``time/rollout_worker_sum``, ``idle/rollout``, the autoscale policy).
    """

    group_id: int
    policy_version: int
    seconds: float  # latency: the generate call, start to return
    rollout_bytes: int  # Rollout.nbytes: what this group sends to the learner
    busy_seconds: float  # the worker's seconds spent on this group (its share of shared forwards)


@dataclass
class WeightsMessage:
    """The trainable network's weights at one policy version, learner -> rollout workers.

    Put once, fetched by every worker. bfloat16, which numpy lacks, travels as raw 16-bit patterns.
    What the digest proves: ``raygrpo/weights.py``.
    """

    policy_version: int
    arrays: dict[str, np.ndarray]  # parameter name -> array (bf16 as uint16 bit patterns)
    dtypes: dict[str, str]  # parameter name -> torch dtype name
    checksum: int  # weights.digest of the tensors sent; the receiver recomputes it from what it holds after loading
    verify: str = "sample"  # the digest's kind (rollout.weight_verify): "sample" (sampled elements) or "full" (every byte)
    partial: bool = False  # only some tensors (the LoRA adapter); the receiver keeps the rest

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


@dataclass(frozen=True)
class SyncReport:
    """What a rollout worker holds after a weight sync, rollout -> controller (which compares it with the learner's)."""

    policy_version: int
    checksum: int  # weights.digest of the tensors the worker now holds (object store or broadcast alike)
    seconds: float  # the worker's own loading time, not the time its call waited behind queued generation


@dataclass
class LearnerMetrics:
    """Summary of one learner update, small enough to log every step."""

    policy_version: int  # version after the update
    loss: float
    grad_norm: float  # mean pre-clip norm over the optimizer steps of this update
    clip_fraction: float  # fraction of (sample, timestep) terms whose ratio left [1-eps, 1+eps]
    ratio_mean: float
    ratio_max_abs_dev: float  # max |ratio - 1|
    first_ratio_max_abs_dev: float  # max |ratio - 1| before the first optimizer step: 0 when on-policy
    optimizer_steps: int
    samples: int
    seconds: float
    extras: dict[str, float] = field(default_factory=dict)  # algorithm-specific scalars (DGPO: gate_mean, kl; DanceGRPO: approx_kl)
