"""The run configuration: one pydantic model tree, loaded from YAML with dotted command-line overrides.

    python -m raygrpo.run cluster/tiny.yaml train.steps=3 rollout.num_workers=2

Every section forbids unknown keys, so a typo fails before Ray starts with the dotted name of the
field. Override values are parsed as YAML scalars (``3`` is an int, ``1e-4`` a float, ``null`` None,
``[a, b]`` a list).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending field(s)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = "run"
    output_root: str = "outputs"
    """Each run writes to ``<output_root>/<name>-<timestamp>``. Use an absolute, shared path on a cluster
    (every learner rank writes its checkpoint shards there)."""
    seed: int = 0
    in_process: bool = False
    """Run every role (rollout, rewards, learner) as objects in the driver process, without Ray: the same
    step, under a debugger or in tests (one learner rank; the metrics equal a Ray run of the same seed on CPU)."""
    resume: str = "auto"
    """auto: continue the newest unfinished run of this name under output_root from its newest checkpoint
    (a resubmitted Ray job continues instead of restarting); never: always start a new run; or the path
    of a checkpoint folder (``<run>/checkpoints/step-NNNNNN``) or of a run folder to continue."""
    device_override: Literal["cpu"] | None = None
    """Test-only. "cpu": rollout workers and learner ranks run their models on the CPU even when they reserve
    GPUs (``num_gpus`` > 0), so a Ray cluster whose nodes declare GPUs they do not have (a simulated multi-node
    cluster, scripts/multinode_sim.py) runs the GPU layouts with tiny weights. The GPUs are still reserved and
    placed as on a real cluster. None (every real run): a role with ``num_gpus`` > 0 runs on its GPU."""


class RayConfig(_Section):
    address: str | None = None
    """None: join the cluster in RAY_ADDRESS if set, else start a local one. "auto": join the running one."""
    num_cpus: int | None = None
    """CPUs of a local instance (ignored when joining a cluster). None: all of this machine's."""


class LoraConfig(_Section):
    """Train a LoRA adapter (peft, through diffusers' add_adapter) instead of the whole network."""

    rank: int = Field(64, ge=1)
    alpha: float = Field(128, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"])
    """Joint-attention projections of the image and the text stream (DGPO's SD3 targets; FLUX names them alike)."""
    init: Literal["gaussian", "default"] = "gaussian"


class ModelConfig(_Section):
    family: Literal["flux", "sd3", "sd", "hunyuan_video", "wan_i2v", "flux_kontext", "flux2", "qwen_image", "qwen_image_edit", "wan_t2v"] = "flux"
    """Adapter (raygrpo/models/): images flux, sd3, sd; videos hunyuan_video (text-to-video), wan_i2v (image-to-video:
    Wan 2.1 or SkyReels-V2 I2V checkpoints, told apart by the pipeline's model_index.json); image editing flux_kontext
    (FLUX.1 Kontext: each prompt's reference image in the transformer's sequence); flux2 (FLUX.2 [dev] with embedded
    guidance, [klein] base with CFG, step-distilled [klein]: told apart by model_index.json); qwen_image (Qwen-Image,
    true CFG with guidance_scale as true_cfg_scale) and qwen_image_edit (Qwen-Image-Edit: each prompt's reference image
    read by Qwen2.5-VL and appended to the transformer's sequence). Wan 2.2: wan_t2v (text-to-video: Wan 2.1 T2V,
    Wan2.2-T2V-A14B's two experts, TI2V-5B) and wan_i2v (also Wan2.2-I2V-A14B's two experts; train_expert)."""
    pretrained: str = "tiny-random"
    """A hub id, a local folder holding a diffusers pipeline, or "tiny-random" (a tiny random instance)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Rollout's weights and the learner's compute dtype. The learner keeps float32 master weights, gradients
    and AdamW state and computes in this dtype (the reference's fp32 master + bf16 autocast): through
    FSDP2's MixedPrecisionPolicy (a learner alone in its process joins a one-rank process group for it)."""
    height: int = Field(64, gt=0, multiple_of=16)
    width: int = Field(64, gt=0, multiple_of=16)
    guidance_scale: float = Field(3.5, ge=0)
    """Guidance in rollout. FLUX.1-dev: the embedded (distilled) guidance value; SD3: the CFG scale."""
    train_guidance_scale: float | None = None
    """Guidance the learner evaluates the policy with; None: the same as rollout. FLUX is guidance-
    distilled, so one value serves both; DGPO trains SD3 without CFG (1.0) on CFG rollouts (4.5)."""
    max_sequence_length: int = Field(512, gt=0)
    num_frames: int | None = Field(None, ge=1)
    """Frames per video (video families only; 4k+1, e.g. 53 for DanceGRPO's HunyuanVideo). None: the
    family's default (tiny models: 5)."""
    lora: LoraConfig | None = None
    """None: full fine-tuning."""
    train_expert: Literal["high", "low", "both"] = "high"
    """Wan 2.2 A14B (two experts switched at the pipeline's boundary_ratio): the expert the learner trains, holds and
    syncs; rollout samples the other's steps with it frozen, and it never travels (raygrpo/models/wan_experts.py).
    dancegrpo and dgpo train only the noise levels the trained expert owns. both: refused (one network per run:
    train high, then low from the first run's export). One-transformer models: high (the one network)."""

    @model_validator(mode="after")
    def _check_num_frames(self) -> ModelConfig:
        if self.train_expert == "both":
            raise ValueError(
                "train_expert: both is not supported: the learner trains one network per run (one FSDP tree, one optimizer, one "
                "weight message); train the high-noise expert, then the low-noise one from the first run's export"
            )
        if self.train_expert != "high" and self.family not in ("wan_t2v", "wan_i2v"):
            raise ValueError(f"train_expert is for Wan 2.2's two-expert models (wan_t2v, wan_i2v), not {self.family!r}; remove it")
        if self.num_frames is not None:
            if self.family not in ("hunyuan_video", "wan_i2v", "wan_t2v"):
                raise ValueError(f"num_frames is for the video families (hunyuan_video, wan_i2v, wan_t2v), not {self.family!r}; remove it")
            if (self.num_frames - 1) % 4:
                below = (self.num_frames - 1) // 4 * 4 + 1
                raise ValueError(f"num_frames must be 4k+1 (the video VAEs compress time 4x after its first frame): {below} or {below + 4}")
        return self

    def guidance_kind(self) -> GuidanceKind:
        """How ``guidance_scale`` acts on this model: ``cfg`` (classifier-free: an unconditional branch when it is above 1),
        ``embedded`` (guidance-distilled: the value enters the one forward), ``none`` (ignored), or ``unknown``.

        By family (:data:`FAMILY_GUIDANCE`); FLUX.2 by variant, from its pipeline's ``model_index.json`` as the adapter
        tells them apart (raygrpo/models/flux2.py): [klein] base ``cfg``, [dev] ``embedded``, step-distilled [klein]
        ``none``. ``unknown``: a FLUX.2 hub id not downloaded yet; the loaded adapter, which knows its variant
        (``ModelAdapter.guidance``), is asked again where it matters (DiffusionNFT's learner)."""
        return FAMILY_GUIDANCE.get(self.family) or _flux2_guidance(self.pretrained)

    def cfg_scales(self, guidance: GuidanceKind | None = None) -> list[str]:
        """The settings (``"model.guidance_scale=4.5"``) that turn on classifier-free guidance in rollout or training: a
        scale other than 1 where the guidance is ``cfg`` (``guidance``: the adapter's word; None: :meth:`guidance_kind`)."""
        if (guidance or self.guidance_kind()) != "cfg":
            return []
        scales = {"model.guidance_scale": self.guidance_scale, "model.train_guidance_scale": self.train_guidance_scale}
        return [f"{key}={value:g}" for key, value in scales.items() if value is not None and value != 1.0]


class AutoscaleConfig(_Section):
    """An elastic rollout pool (raygrpo/rollout/autoscale.py, README "Resizing the rollout pool"): every worker in a
    placement group of its own, resized while the run goes on by command (``python -m raygrpo.pool``) and, with
    ``auto``, from the queue depth and idle fractions. ``rollout.num_workers`` is the size it starts with."""

    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)
    auto: bool = True
    """Resize from the measurements after every step; false: by command only (within min..max)."""
    window: int = Field(3, ge=1)
    """Steps in a row (at the current size, every worker up) a signal must hold before the pool changes by one worker."""
    grow_wait: float = Field(0.3, gt=0, le=1)
    """Grow when groups wait for a worker (more in flight than workers) and the driver waited for generation at least
    this share of the step (generation-bound)."""
    shrink_idle: float = Field(0.75, gt=0, le=1)
    """Shrink when the workers idled at least this share of the step (``idle/rollout``) and no group waited."""
    token_env: str | None = None
    """NAME of an environment variable holding the token resize commands must be signed with (HMAC-SHA256, the same
    variable on the driver and for ``python -m raygrpo.pool --token-env``); None: anyone who can write the run folder."""

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscaleConfig:
        if self.min > self.max:
            raise ValueError(f"min={self.min} is above max={self.max}")
        return self


class RolloutConfig(_Section):
    num_workers: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0)
    """GPUs per rollout worker."""
    num_cpus: float = Field(1, ge=0)
    num_steps: int = Field(16, ge=1)
    """Denoising steps per sample; 1 only for one-step generation (sampler ``consistency``: Diff-Instruct*)."""
    shift: float = Field(3.0, gt=0)
    micro_batch_size: int = Field(1, ge=1)
    """Samples per rollout forward. DanceGRPO: 1 is the paper's (each sample its own trained steps); m > 1
    samples m members per forward and the learner recomputes their log-probs in one forward of the same m
    (they share their trained steps), so the first ratio stays exactly 1; it needs group_size and
    grad_accum_samples / learner.num_ranks to be multiples of m, no best_of_n and no spread_groups.
    DGPO (ODE, no log-probs): any value."""
    continuous_batching: bool = False
    """ODE rollouts (DGPO, DiffusionNFT: algorithm.sampler euler or dpmpp_2m) only. True: each worker runs the groups
    it is sent in one batching loop that admits new members at every denoising-step boundary, so a forward holds up
    to micro_batch_size members of any groups (each at its own step) and a group returns as soon as its members are
    done (raygrpo/rollout/continuous.py; the samples equal the plain worker's up to float rounding of other batch
    compositions). False: one group per call, micro-batches of that group only."""
    weight_sync: Literal["auto", "object_store", "collective"] = "auto"
    """How new weights reach the rollout workers. object_store: one numpy message through Ray's object store.
    collective: learner rank 0 broadcasts raw tensors in a process group of its own (NCCL on GPU, gloo on
    CPU) straight into the workers' parameters. Both verified (``weight_verify``). auto: collective when the
    learner ranks and the rollout workers each have whole GPUs (NCCL needs one device per member), else
    object_store."""
    weight_sync_timeout_s: float = Field(300.0, gt=0)
    """collective: how long a member waits in a broadcast before failing (a member that died mid-broadcast
    stops the others after this; that version then goes through the object store)."""
    weight_verify: Literal["sample", "full"] = "sample"
    """How each worker proves it holds the version the learner sent (raygrpo/weights.py). Always: version,
    names, shapes, dtypes. sample: a digest of about a thousand elements per tensor (the last included, the
    positions moving with the version) on both sides; microseconds per tensor. full: a CRC-32 of every byte on
    both sides (one extra pass over the weights per side, 0.25-0.5 s per GB on one CPU core); catches any changed byte."""
    spread_groups: bool = False
    """False (DanceGRPO): a group's G members are sampled by one worker. True (Flow-GRPO): they are split
    over the rollout workers (about G / num_workers each) and put back together for scoring statistics and
    advantages, which are always computed over the whole group."""
    max_restarts: int = Field(3, ge=0)
    """A rollout worker that dies is restarted this many times; it re-pulls the current weights and the
    groups it had in flight are generated again (never lost, never trained twice)."""
    autoscale: AutoscaleConfig | None = None
    """None: a fixed pool of num_workers in one placement group. Set: an elastic pool of min..max workers."""

    @model_validator(mode="after")
    def _check_autoscale(self) -> RolloutConfig:
        scale = self.autoscale
        if scale is not None and not scale.min <= self.num_workers <= scale.max:
            raise ValueError(
                f"num_workers={self.num_workers} (the size the pool starts with) must lie in autoscale min..max = {scale.min}..{scale.max}"
            )
        return self


class RewardConfig(_Section):
    name: str
    """Unique name; it keys the metrics (reward/<name>/mean)."""
    kind: str
    """Which reward: a built-in kind (see raygrpo.reward.BUILTIN_REWARDS)."""
    weight: float = 1.0
    """Weight of this reward's advantage in the loss (DanceGRPO: HPS 0.7, CLIP 1.4)."""
    params: dict[str, Any] = Field(default_factory=dict)
    threshold: float | None = None
    """Binary reward: 1 where the score is >= threshold, else 0 (DanceGRPO's sparse-feedback experiment)."""
    replicas: int = Field(1, ge=1)
    """Actors serving this reward; groups are spread over them round robin."""
    num_cpus: float = Field(0.25, ge=0)
    num_gpus: float = Field(0, ge=0)
    """Per replica; fractions share a GPU between replicas or with other rewards."""
    max_restarts: int = Field(3, ge=0)
    """A replica that dies is restarted this many times and the groups it was scoring are scored again."""


class ScoringConfig(_Section):
    on_failure: Literal["drop_group", "group_min", "abort"] = "drop_group"
    """A member without a score: drop its whole group from training; give it the lowest score that reward
    gave a member of the same group (group_min: a failure never scores better than a real sample, so it
    never gets a positive advantage; a group without any valid score of a reward is dropped); or abort the
    run. Every such event is counted in the metrics (rewards/<name>/missing, groups/dropped)."""
    max_empty_steps: int = Field(2, ge=1)
    """Abort the run (exit 3) after this many consecutive steps that trained no group (every group dropped,
    e.g. a reward server that stopped answering); the message says which rewards failed and how often."""

    @model_validator(mode="before")
    @classmethod
    def _no_zero(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("on_failure") == "zero":
            raise ValueError(
                "on_failure: zero was removed: a 0 is the best score of a negative reward (JPEG compressibility), so a "
                "failed sample would get the top advantage. Use group_min (the group's lowest score), drop_group or abort"
            )
        return data
    combine: Literal["per_reward", "weighted_sum"] = "per_reward"
    """per_reward (DanceGRPO): a group-normalised advantage per reward, losses weighted by reward.weight.
    weighted_sum (Flow-GRPO): sum_k weight_k * r_k of the raw rewards, normalised once."""


class _AlgorithmBase(_Section):
    group_size: int = Field(12, ge=2)
    groups_per_step: int = Field(1, ge=1)
    """Prompt groups sampled (and trained on) per training step."""
    shared_noise: bool = True
    """One initial noise for every member of a group (DanceGRPO's --init_same_noise)."""
    adv_clip_max: float = Field(5.0, gt=0)
    best_of_n: int | None = Field(None, ge=2)
    """Train only on the top n/2 and bottom n/2 of each group by weighted advantage (DanceGRPO video)."""
    global_std: bool = False
    """Normalise advantages by the std of each reward over the whole step (True) or per group (False)."""
    # How the algorithm's reference code normalises (not user knobs): (r - mean) / (std(ddof) + eps).
    advantage_eps: ClassVar[float] = 1e-8
    advantage_ddof: ClassVar[int] = 1

    def teacher_guidance(self, model: ModelConfig) -> float | None:
        """The guidance of the learner's frozen teacher / reference forwards where it is a scale of its own (RG-LCD,
        Diff-Instruct*: the learner then keeps CFG's negative encoding even though the policy trains without CFG)."""
        return None

    @model_validator(mode="after")
    def _check_best_of_n(self):
        if self.best_of_n is not None:
            if self.best_of_n % 2:
                raise ValueError(f"best_of_n must be even (top n/2 + bottom n/2), got {self.best_of_n}")
            if self.best_of_n > self.group_size:
                raise ValueError(f"best_of_n ({self.best_of_n}) cannot exceed group_size ({self.group_size})")
        return self


class DanceGRPOConfig(_AlgorithmBase):
    """DanceGRPO (raygrpo/algorithms/dancegrpo.py); defaults are the FLUX recipe."""

    name: Literal["dancegrpo"] = "dancegrpo"
    sampler: Literal["dance_sde", "flow_sde", "ddim"] = "dance_sde"
    """Flow families: dance_sde or flow_sde. Stable Diffusion (family sd, a VP diffusion model): ddim."""
    noise_level: float = Field(0.3, ge=0)
    """eta of the Dance-SDE (FLUX 0.3, HunyuanVideo 0.25), a of the Flow-SDE, or DDIM's eta in [0, 1] (SD 1.4: 1.0)."""
    timestep_fraction: float = Field(0.6, gt=0, le=1)
    clip_range: float = Field(1e-4, gt=0)
    grad_accum_samples: int = Field(4, ge=1)
    """Optimizer step every this many trained samples (each with all its selected timesteps)."""


class DGPOConfig(_AlgorithmBase):
    """DGPO (raygrpo/algorithms/dgpo.py); defaults are the released code's OCR recipe (reference doc §3.6)."""

    name: Literal["dgpo"]
    sampler: Literal["dpmpp_2m", "euler"] = "dpmpp_2m"
    """Deterministic ODE rollouts: DPM-Solver++(2M) on the flow-sigma grid, or Euler on the shifted linear grid."""
    shared_noise: bool = False
    """DGPO draws fresh initial noise per sample."""
    beta: float = Field(100.0, gt=0)
    """beta of the group preference gate sigma(S_g), S_g = beta/G sum_i A_i (l_i - l_ref_i) (beta_dpo)."""
    kl_beta: float = Field(0.02, ge=0)
    """Weight of the velocity-space KL mean ||v_theta - v_base||^2 (released code; 0 turns it off)."""
    clip_range: float = Field(1e-2, gt=0)
    """PPO-style clip on the denoising loss against the fast-EMA policy (released code)."""
    clip_dsm: bool = True
    clip_kl: bool = False
    num_train_timesteps: int = Field(4, ge=1)
    """M timesteps per step, shared by every sample of the step."""
    trunc_steps: int | None = Field(6, ge=0)
    """Timestep clip as the released code: the M indices come from {0..trunc_steps} of the rollout grid
    (6 of 10 steps = sigma above shift(0.3)). None: the paper's continuous t ~ U[t_min, 1]."""
    t_min: float = Field(0.3, ge=0, lt=1)
    """Lower bound of t in unshifted time, used when trunc_steps is None (paper: t_min > 0)."""
    reference: Literal["frozen", "fast_ema"] = "frozen"
    """The l_ref model: the frozen base (LoRA disabled, or a frozen copy), or the fast EMA (Mode 2b)."""
    switch_ema_ref: int = Field(200, ge=0)
    """After this many optimizer steps, rollout samples with the fast EMA instead of the current weights."""
    fast_ema_max_decay: float = Field(0.3, ge=0, lt=1)
    fast_ema_decay_rate: float = Field(0.001, ge=0)
    """Fast EMA decay at optimizer step k: min(fast_ema_max_decay, fast_ema_decay_rate * k)."""
    slow_ema_decay: float = Field(0.9, ge=0, lt=1)
    slow_ema_every: int = Field(8, ge=1)
    """Slow EMA (evaluation and checkpoints): decay min((1+k)/(10+k), slow_ema_decay) every this many steps."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Group members per training forward (twice the rows with CFG in training). None (or at least the
    members trained): a whole group per forward, as the released code. Smaller bounds the learner's
    activation memory (video models): every member's loss is first evaluated without gradients to form
    the group's gate, then the members train in micro-batches under that gate, with the whole group's
    gradient (raygrpo/algorithms/dgpo.py)."""
    advantage_eps: ClassVar[float] = 1e-4
    advantage_ddof: ClassVar[int] = 0


class FlowGRPOConfig(DanceGRPOConfig):
    """Flow-GRPO (raygrpo/algorithms/flow_grpo.py): DanceGRPO's clipped surrogate on Flow-SDE (or CPS) rollouts, with
    a KL to the reference policy, and its Fast variant (an SDE window, ODE elsewhere)."""

    name: Literal["flow_grpo"]
    sampler: Literal["flow_sde", "cps"] = "flow_sde"
    """flow_sde: Flow-GRPO's SDE (a = noise_level); cps: Coefficients-Preserving Sampling (eta = noise_level in [0, 1],
    the released code's constant-free log-prob; Flow-GRPO-Fast's sampler)."""
    noise_level: float = Field(0.7, gt=0)
    """a of the Flow-SDE (SD3.5-M 0.7, FLUX 0.9) or eta of CPS (0.8 in the Fast/CPS configs)."""
    shared_noise: bool = False
    """Flow-GRPO draws fresh initial noise per member (``same_latent=False``)."""
    timestep_fraction: float = Field(0.99, gt=0, le=1)
    """Trains the first int(T * fraction) steps, in order, the same for every sample (0.99 of 10: steps 0..8).
    Ignored with fast_window (the window's steps are trained)."""
    clip_range: float = Field(1e-4, gt=0)
    """PPO clip of the ratio (Flow-GRPO 1e-4; Fast/CPS configs 1e-5)."""
    global_std: bool = True
    """Flow-GRPO's default: advantages (r - group mean) / (std over the whole step); False: the group's std."""
    beta: float = Field(0.04, ge=0)
    """Weight of the KL to the reference (LoRA disabled / the starting weights): GenEval, OCR 0.04, PickScore 0.01,
    CLIPScore 0.02, FLUX and Fast 0. 0 skips the reference forward."""
    fast_window: int | None = Field(None, ge=1)
    """Flow-GRPO-Fast: W SDE (recorded, trained) steps per group, Euler ODE steps elsewhere (released: 3). None: every
    step is an SDE step and the first int(T * timestep_fraction) are trained."""
    fast_window_range: tuple[int, int] | None = None
    """[r0, r1): each group's window start is drawn uniformly from r0..r1-W (released: (0, T // 2)). None: (0, T // 2)."""
    guard: bool = False
    """GRPO-Guard (arXiv 2510.22319): RatioNorm of the per-step log-ratio and 1/dsigma gradient reweighting (flow_sde only)."""
    advantage_eps: ClassVar[float] = 1e-4
    advantage_ddof: ClassVar[int] = 0

    @model_validator(mode="after")
    def _check_flow_grpo(self) -> FlowGRPOConfig:
        if self.sampler == "cps" and self.noise_level > 1:
            raise ValueError(f"algorithm.noise_level={self.noise_level} is CPS's eta here and must be in (0, 1] (Flow-GRPO-Fast: 0.8)")
        if self.guard and self.sampler != "flow_sde":
            raise ValueError("algorithm.guard (GRPO-Guard's RatioNorm) needs the Gaussian log-ratio of sampler: flow_sde, not cps")
        if self.fast_window_range is not None and self.fast_window is None:
            raise ValueError("algorithm.fast_window_range is set but fast_window is not: set fast_window (Flow-GRPO-Fast: 3) or remove the range")
        return self

    def window_range(self, num_steps: int) -> tuple[int, int]:
        """``[r0, r1)`` of the Fast window's steps: ``fast_window_range`` or the released default ``(0, T // 2)``."""
        return self.fast_window_range if self.fast_window_range is not None else (0, num_steps // 2)

    def trained_step_count(self, num_steps: int) -> int:
        """Steps trained per sample: the Fast window, else int(T * timestep_fraction) (the released code's count)."""
        return self.fast_window if self.fast_window is not None else int(num_steps * self.timestep_fraction)

    def check_run(self, num_steps: int, max_staleness: int) -> None:
        """What depends on other sections: the trained steps fit in the T - 1 steps before the last (whose Gaussian is
        degenerate: CPS's std is 0 there), and GRPO-Guard's old means come from the weights at the update's start."""
        trained = self.trained_step_count(num_steps)
        if self.fast_window is None and not 1 <= trained <= num_steps - 1:
            raise ValueError(
                f"algorithm.timestep_fraction={self.timestep_fraction} trains int({num_steps} * fraction) = {trained} steps of "
                f"rollout.num_steps={num_steps}; it must be 1..{num_steps - 1} (the last step is never trained): Flow-GRPO uses 0.99"
            )
        if self.fast_window is not None:
            r0, r1 = self.window_range(num_steps)
            if not 0 <= r0 < r1 <= num_steps - 1:
                raise ValueError(
                    f"algorithm.fast_window_range=({r0}, {r1}) must satisfy 0 <= r0 < r1 <= rollout.num_steps - 1 = {num_steps - 1} "
                    "(the last step, into sigma 0, is never an SDE step)"
                )
            if self.fast_window > r1 - r0:
                raise ValueError(
                    f"algorithm.fast_window={self.fast_window} is longer than its range [{r0}, {r1}) of {r1 - r0} steps: "
                    "lower fast_window or widen fast_window_range"
                )
        if self.guard and max_staleness:
            raise ValueError(
                f"algorithm.guard needs train.max_staleness=0 (got {max_staleness}): GRPO-Guard's RatioNorm evaluates the old "
                "policy's means with the weights the update starts from, which are the sampling weights only on-policy"
            )


class MixGRPOConfig(DanceGRPOConfig):
    """MixGRPO (raygrpo/algorithms/mixgrpo.py): SDE sampling and the clipped surrogate inside a sliding window of
    steps, ODE outside it. Defaults are the released FLUX script (finetune_flux_grpo_MixGRPO.sh): Flow-SDE eta 0.7,
    window 4, moved by 1 step every 25 training steps, back to the start past the last step."""

    name: Literal["mixgrpo"]
    sampler: Literal["dance_sde", "flow_sde"] = "flow_sde"
    """The SDE inside the window (rectified flows only). The released script samples with Flow-GRPO's SDE."""
    noise_level: float = Field(0.7, gt=0)
    """a of the Flow-SDE (eta of the Dance-SDE) inside the window; MixGRPO's eta 0.7."""
    window_size: int = Field(4, ge=1)
    """w: SDE (recorded, trained) steps per rollout; must fit in the rollout.num_steps - 1 trainable steps."""
    window_strategy: Literal["progressive", "random", "frozen"] = "progressive"
    """progressive: the window's first step advances by window_stride every shift_interval training steps (policy
    versions); random: a fresh start every training step; frozen: the first window_size steps (MixGRPO-Flash*)."""
    shift_interval: int = Field(25, ge=1)
    """tau: training steps between two moves of a progressive window (released script: 25)."""
    window_stride: int = Field(1, ge=1)
    """s: steps a progressive window moves at a time (released script: 1)."""
    window_wrap: bool = True
    """progressive: past the last whole window, start again at step 0 (the released script's --roll_back); False: stay
    at the last window (the paper's Algorithm 1, l <- min(l + s, T - w))."""
    flash: bool = False
    """MixGRPO-Flash: after the window, DPM-Solver++(2M) on a compressed grid instead of Euler on the rollout's."""
    flash_compression: float = Field(0.4, gt=0, le=1)
    """Flash: the steps after the window are cut to about this fraction (released dpm_post_compress_ratio 0.4)."""

    @model_validator(mode="after")
    def _no_timestep_fraction(self) -> MixGRPOConfig:
        if "timestep_fraction" in self.model_fields_set:
            raise ValueError("MixGRPO trains every step of its window: remove timestep_fraction and set window_size instead")
        return self

    def check_run(self, num_steps: int, spread_groups: bool) -> None:
        """What depends on the rollout section: the window fits in the trainable steps 0..T-2 (the last one, into
        sigma 0, is never trained), and a group's parts share one window."""
        if self.window_size > num_steps - 1:
            raise ValueError(
                f"algorithm.window_size={self.window_size} does not fit in the {num_steps - 1} trainable steps of "
                f"rollout.num_steps={num_steps} (the last step is never in the window): lower window_size or raise num_steps"
            )
        if spread_groups and self.window_strategy != "frozen":
            raise ValueError(
                "rollout.spread_groups: MixGRPO's window follows the policy version a group is sampled with, and a part "
                "generated again after a worker restart gets the current version (maybe another window): set "
                "spread_groups: false (each group on one worker, as the released code) or window_strategy: frozen"
            )


class DiffusionNFTConfig(_AlgorithmBase):
    """DiffusionNFT (raygrpo/algorithms/diffusionnft.py): forward-process training on any sampler's final samples.
    Defaults are the released code's SD3.5-M PickScore / GenEval recipe (NVlabs/DiffusionNFT config/nft.py)."""

    name: Literal["diffusionnft"]
    sampler: Literal["dpmpp_2m", "euler"] = "dpmpp_2m"
    """Deterministic ODE rollouts (the released code: a 10-step second-order DPM solver), final latents only."""
    shared_noise: bool = False
    """Fresh initial noise per sample, as the released code."""
    global_std: bool = True
    """Advantages (r - group mean) / (std over the whole step) (released ``sample.global_std``); False: the group's std."""
    beta: float = Field(1.0, gt=0)
    """beta of the implicit policies v+- (released ``config.beta``): 1.0; 0.1 in the OCR and multi-reward recipes."""
    kl_beta: float = Field(1e-4, ge=0)
    """Weight of mean ||v_theta - v_ref||^2 against the frozen base (released ``train.beta``); 0 skips its forward."""
    timestep_fraction: float = Field(0.99, gt=0, le=1)
    """Each sample trains on int(T * fraction) distinct noise levels of the T-step rollout grid, its own random choice
    (released ``train.timestep_fraction`` 0.99: 9 of 10)."""
    old_ema_max_decay: float = Field(0.5, ge=0, lt=1)
    old_ema_decay_rate: float = Field(0.001, ge=0)
    old_ema_delay: int = Field(0, ge=0)
    """The "old" (sampling) policy: theta_old <- d theta_old + (1 - d) theta once per update, after its optimizer steps,
    d = min(old_ema_max_decay, old_ema_decay_rate * max(0, k - old_ema_delay)) at optimizer step k (released
    ``decay_type`` 1: 0.5, 0.001, 0; the OCR recipe's ``decay_type`` 2: 0.999, 0.0075, 75)."""
    ema_decay: float = Field(0.9, ge=0, lt=1)
    """EMA of evaluation and checkpoints: decay min((1 + k) / (10 + k), ema_decay) after every optimizer step."""
    optimizer_steps_per_update: int = Field(1, ge=1)
    """Optimizer steps per update, each on an equal share of the step's samples (released ``gradient_step_per_epoch``:
    1; 2 for OCR)."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Members per training forward (None: a group's members of the optimizer step at once). Every sample's loss is
    its own (no group statistic), so micro-batches change memory only, never the gradient."""
    advantage_eps: ClassVar[float] = 1e-4
    advantage_ddof: ClassVar[int] = 0

    def trained_step_count(self, num_steps: int) -> int:
        """Noise levels each sample trains on: int(T * timestep_fraction) of the T rollout steps."""
        return int(num_steps * self.timestep_fraction)

    def check_run(self, num_steps: int, model: ModelConfig, samples: int) -> None:
        """What depends on other sections: at least one trained noise level; CFG-free sampling and training (the
        method's premise: v_old in the loss must be the velocity that sampled); equal optimizer-step shares of the
        ``samples`` each learner rank trains per step."""
        if self.trained_step_count(num_steps) < 1:
            raise ValueError(
                f"algorithm.timestep_fraction={self.timestep_fraction} of rollout.num_steps={num_steps} trains no noise level: "
                "raise either (DiffusionNFT: 0.99)"
            )
        self.check_cfg_free(model)
        if samples % self.optimizer_steps_per_update:
            raise ValueError(
                f"algorithm.optimizer_steps_per_update={self.optimizer_steps_per_update} does not divide the {samples} samples each "
                "learner rank trains per step (groups_per_step / learner.num_ranks x trained members): change either"
            )

    def check_cfg_free(self, model: ModelConfig, guidance: GuidanceKind | None = None) -> None:
        """No classifier-free guidance in rollout or training (``guidance``: the loaded adapter's word, see
        :meth:`ModelConfig.cfg_scales`)."""
        guided = model.cfg_scales(guidance)
        if guided:
            raise ValueError(
                f"DiffusionNFT is CFG-free, but {' and '.join(guided)} turns on classifier-free guidance of model.family={model.family!r} "
                f"({model.pretrained}): set model.guidance_scale: 1.0 and leave model.train_guidance_scale unset"
            )


class DiffusionDPOConfig(_AlgorithmBase):
    """Diffusion-DPO (raygrpo/algorithms/dcpo.py): offline preference pairs, a frozen reference. Defaults are the released
    SD 1.5 recipe (SalesforceAIResearch/DiffusionDPO launchers/sd15.sh). Each prompt group is one preference pair of
    ``data.prompt_file`` (raygrpo/data/preferences.py) plus ``group_size`` evaluation samples of the policy, scored by
    the rewards for the metrics only (the loss never reads them)."""

    name: Literal["diffusion_dpo"]
    group_size: int = Field(2, ge=2)
    """Evaluation samples per pair and step (the reward metrics); none of them is trained on."""
    groups_per_step: int = Field(1, ge=1)
    """Preference pairs per optimizer step (the released recipe: 2048 = 16 GPUs x 1 x 128 accumulation)."""
    sampler: Literal["dpmpp_2m", "euler"] = "dpmpp_2m"
    """The deterministic sampler of the evaluation samples."""
    shared_noise: bool = False
    """Fresh initial noise per evaluation sample (they must differ for the reward spread to mean anything)."""
    beta: float = Field(5000.0, gt=0)
    """beta of -log sigmoid(-beta/2 [(l_w - l_ref_w) - (l_l - l_ref_l)]) (released ``--beta_dpo``: 5000 for SD 1.5 and SDXL)."""
    loss_space: Literal["auto", "epsilon", "velocity"] = "auto"
    """Which squared error l is: ``epsilon`` ||eps - eps_theta||^2 (the paper's, for epsilon/VP models), ``velocity``
    ||(eps - x0) - v_theta||^2 (flow matching). auto: epsilon for model.family sd, velocity otherwise."""
    train_timesteps: int = Field(1000, ge=2)
    """Each pair's noise level is drawn uniformly from this many levels of the model's grid (released: t ~ U{0..999})."""
    eval_groups: int | None = Field(None, ge=0)
    """Pairs per step that also sample ``group_size`` evaluation images (the step's first pairs); the others are only
    VAE- and text-encoded for the loss, which does not change. None: every pair. At real size a few dozen of the
    step's 2048 pairs measure the policy as well, without sampling 4096 images a step (raygrpo/algorithms/dcpo.py)."""
    eval_every: int = Field(1, ge=1)
    """Evaluate on every this many steps (step 1 and the last step always); the steps between sample nothing."""


class DCPOConfig(DiffusionDPOConfig):
    """DCPO (raygrpo/algorithms/dcpo.py): Diffusion-DPO with a caption of its own for each image of a pair."""

    name: Literal["dcpo"]
    captions: Literal["captioner", "perturbed", "hybrid"] = "hybrid"
    """Which captions a pair trains with (paper §3): captioner (DCPO-c: a captioner's caption for each image), perturbed
    (DCPO-p: the prompt for the preferred image, a perturbed prompt for the rejected one), hybrid (DCPO-h: the
    captioner's caption for the preferred image, a perturbed captioner caption for the rejected one; the paper's best)."""


class _DistillConfig(_AlgorithmBase):
    """What the few-step student methods share (raygrpo/algorithms/distill.py): the student samples with LCM's
    multistep ``consistency`` sampling in rollout; the reward reaches it through gradients in the learner."""

    sampler: Literal["consistency"] = "consistency"
    """The student's sampling in rollout and eval: LCM's multistep consistency sampling (raygrpo/sampling/ode.py)."""
    group_size: int = Field(8, ge=2)
    """Rollout samples per prompt and step: scored by the pools (metrics, gallery, the latent reward model's pairs)."""
    shared_noise: bool = False
    """Fresh initial noise per sample (the samples of a group must differ for the pools' ordering to mean anything)."""
    reward_scale: float = Field(1.0, ge=0)
    """Weight of the reward term in the student's loss (RG-LCD's beta, released ``--reward_scale`` 1.0; DI*'s alpha)."""
    reward_source: Literal["pixel", "latent"] = "latent"
    """pixel: decode the student's latents with the VAE in the learner and score them with the config's rewards in torch
    (raygrpo/reward/differentiable.py: brightness, color, contrast and the neural rewards); latent: a latent reward model learns the pools'
    scores online (any reward, JPEG and HTTP included) and gives the gradient (RG-LCD's LRM)."""
    lrm_lr: float = Field(1e-3, gt=0)
    """AdamW learning rate of the latent reward model (released 3.3e-6 for a pretrained latent CLIP; ours starts from scratch)."""
    lrm_steps: int = Field(1, ge=1)
    """Latent reward model steps per training step, on the step's rollout samples and their scores."""
    lrm_hidden: int = Field(64, ge=4)
    """Width of the latent reward model."""
    lrm_temperature: float = Field(1.0, gt=0)
    """T of the pools' pair preference sigmoid((A_i - A_j) / T) the latent reward model is fitted to."""

    def check_run(self, model: ModelConfig) -> None:
        """The student samples and trains without CFG (guidance is the teacher's, distilled into it)."""
        guided, family = model.cfg_scales(), model.family
        if guided:
            raise ValueError(
                f"the few-step student of {self.name} samples without classifier-free guidance, but {' and '.join(guided)} turns it on "
                f"for model.family={family!r}: set model.guidance_scale: 1.0 and give the teacher's scale in the algorithm section"
            )


class RGLCDConfig(_DistillConfig):
    """RG-LCD (raygrpo/algorithms/rg_lcd.py); defaults are the released script's (Ji4chenLi/rg-lcd train_lcm_distill_sd_wds.py)."""

    name: Literal["rg_lcd"]
    num_ddim_timesteps: int = Field(50, ge=1)
    """N levels of the teacher's grid; the skipping step is one of its steps (released: 50 of 1000 DDPM timesteps, k = 20)."""
    teacher_guidance_scale: float | None = None
    """The teacher's guidance in the distilled ODE step (CFG families: classifier-free guidance; FLUX: the embedded
    value). None: model.guidance_scale. The released student draws w ~ U[5, 15] per sample and embeds it."""
    loss_type: Literal["huber", "l2"] = "huber"
    huber_c: float = Field(1e-3, gt=0)
    """c of the pseudo-Huber distance sqrt(d^2 + c^2) - c (released 0.001)."""
    target_ema_decay: float = Field(0.95, ge=0, lt=1)
    """The target network: an EMA of the student after every optimizer step (released 0.95)."""

    def teacher_guidance(self, model: ModelConfig) -> float:
        return model.guidance_scale if self.teacher_guidance_scale is None else self.teacher_guidance_scale


class DiffInstructStarConfig(_DistillConfig):
    """Diff-Instruct* (raygrpo/algorithms/di_star.py): a one-step generator (rollout.num_steps: 1)."""

    name: Literal["di_star"]
    reward_source: Literal["pixel", "latent"] = "pixel"
    """The paper backpropagates through differentiable reward models: pixel; latent: through a latent reward model."""
    reference_guidance_scale: float | None = None
    """Guidance of the reference score s_ref (the paper's CFG "implicit reward"). None: model.guidance_scale."""
    huber_c: float = Field(1e-3, gt=0)
    """Per-element c of the pseudo-Huber distance between scores (c = huber_c sqrt(dim))."""
    fake_lr: float | None = Field(None, gt=0)
    """AdamW learning rate of the fake score network; None: optimizer.lr."""
    fake_steps: int = Field(1, ge=1)
    """Fake score (DSM) steps before each generator step."""
    t_min: float = Field(0.02, gt=0, lt=1)
    t_max: float = Field(0.98, gt=0, lt=1)
    """Noise levels t ~ U[t_min, t_max] of the divergence and of the fake score's DSM (flow sigmas)."""

    @model_validator(mode="after")
    def _check_levels(self) -> DiffInstructStarConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min={self.t_min} must be below t_max={self.t_max}")
        return self

    def teacher_guidance(self, model: ModelConfig) -> float:
        return model.guidance_scale if self.reference_guidance_scale is None else self.reference_guidance_scale


ALGORITHM_NAMES = ("dancegrpo", "dgpo", "flow_grpo", "mixgrpo", "diffusionnft", "diffusion_dpo", "dcpo", "rg_lcd", "di_star")

AlgorithmConfig = Annotated[
    DanceGRPOConfig | DGPOConfig | FlowGRPOConfig | MixGRPOConfig | DiffusionNFTConfig | DiffusionDPOConfig | DCPOConfig
    | RGLCDConfig | DiffInstructStarConfig,
    Field(discriminator="name"),
]


class OptimizerConfig(_Section):
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class LearnerConfig(_Section):
    num_ranks: int = Field(1, ge=1)
    """Learner ranks (one Ray actor each) in one torch.distributed group, FSDP2-sharded (raygrpo/learner/group.py).
    Each rank trains whole groups: algorithm.groups_per_step must be a multiple of it."""
    num_gpus: float = Field(0, ge=0)
    """GPUs per rank (NCCL when > 0, gloo on CPU)."""
    num_cpus: float = Field(1, ge=0)
    reduce_every_backward: bool = False
    """False: gradients are reduce-scattered once per accumulation window (its last backward); the
    backwards before it keep whole, unsharded float32 gradients on each rank (FLUX: 48 GB). True:
    reduce-scatter on every backward (as DanceGRPO's reference does), so a rank only ever holds its
    gradient shard: more communication, far less memory; the update is the same."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of the trained network (diffusers' enable_gradient_checkpointing): each
    transformer block keeps only its inputs in the forward and recomputes its activations in the backward.
    The same gradients for about one more forward of compute; activation memory of one block instead of
    all of them. DanceGRPO trains FLUX and HunyuanVideo so (per block); 13B/14B video models need it."""


class DataConfig(_Section):
    prompts: list[str] | None = None
    """Prompts given inline."""
    prompt_file: str | None = None
    """A .txt file (one prompt per line) or a .parquet file with a ``prompt`` column. Image-to-video
    (model.family wan_i2v) and image editing (flux_kontext, qwen_image_edit): a .jsonl of ``{"prompt": ..., "image": path}``
    lines or a .parquet with an ``image`` column (a path, relative to the file, or PNG/JPEG bytes)."""

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.prompts is None) == (self.prompt_file is None):
            raise ValueError("give exactly one of data.prompts or data.prompt_file")
        if self.prompts is not None and not self.prompts:
            raise ValueError("data.prompts is empty")
        return self


class TrainConfig(_Section):
    steps: int = Field(100, ge=1)
    max_staleness: int = Field(0, ge=0)
    """How many policy versions old a sample may be when it is trained. 0: strictly on-policy (the papers'
    loop: generate, score, train, sync). k >= 1: the groups of steps t+1..t+k are generated (and scored)
    while step t trains, with the weights of up to k updates ago."""
    sample_grid_groups: int = Field(4, ge=1)
    """How many groups of the first and last step go into samples.png."""
    checkpoint_every: int = Field(50, ge=0)
    """Save a resumable checkpoint (raygrpo/checkpoint.py) every this many steps; 0: only the final weights."""
    keep_checkpoints: int = Field(2, ge=0)
    """Keep the newest this many checkpoints (older ones are removed after a newer one is complete); 0: keep all."""


class LoggingConfig(_Section):
    sample_every: int = Field(10, ge=0)
    """Write a sample gallery (``<run>/samples/step-NNNNNN/``, raygrpo/gallery.py) every this many steps; 0: never."""
    sample_groups: int = Field(2, ge=1)
    """Prompt groups per gallery (all G samples of each, with their scores)."""
    tensorboard: bool = True
    wandb_project: str | None = None
    """None: no wandb."""


GUARD_DIVERSITY_SIGNALS = ("diversity/latent/within", "diversity/latent/across", "diversity/pixels/within", "diversity/pixels/across")
"""The guard's diversity measures (raygrpo/guard/diversity.py); its reward signals are ``reward/<name>`` (a trained
reward), ``reward/total`` (their weighted sum) and ``gold/<name>`` (a gold reward)."""


class GuardRewardConfig(_Section):
    """A gold reward: scored by the guard on its held-out samples only, never trained on."""

    name: str
    """Unique among the gold rewards; its signal is ``gold/<name>``."""
    kind: str
    """A reward kind, as in ``rewards`` (built-in, ``http``, ``vlm_judge`` with a ``url``): built in the driver."""
    params: dict[str, Any] = Field(default_factory=dict)


class GuardRuleConfig(_Section):
    """Fire when ``signal`` fell from its reference round by more than the threshold while ``rising`` rose."""

    signal: str
    """What is watched: gold/<name>, reward/<name>, reward/total or one of GUARD_DIVERSITY_SIGNALS."""
    max_drop: float | None = Field(None, gt=0)
    """Threshold on the fall, in the signal's own units (exactly one of max_drop and max_drop_fraction)."""
    max_drop_fraction: float | None = Field(None, gt=0)
    """Threshold on the fall as a fraction of the reference value's magnitude (0.15: 15% below it)."""
    reference: Literal["best", "first"] = "best"
    """The round the fall is measured from: the one where ``signal`` was highest so far, or the first round."""
    rising: str = "reward/total"
    """The trained signal that must be higher now than at the reference round (reward hacking: it rises while
    ``signal`` falls)."""
    action: Literal["warn", "stop", "rollback"] = "warn"
    """warn: log it; stop: end the run (exit 3) with a resumable checkpoint; rollback: restore the learner and the
    rollout weights from the best guard round by ``guard.rollback_score`` and go on (after ``guard.max_rollbacks``
    rollbacks it stops instead)."""

    @model_validator(mode="after")
    def _one_threshold(self) -> GuardRuleConfig:
        if (self.max_drop is None) == (self.max_drop_fraction is None):
            raise ValueError("give exactly one of max_drop and max_drop_fraction")
        return self


class GuardConfig(_Section):
    """The reward-hacking guard (raygrpo/guard/): held-out prompts sampled with the current policy every ``every``
    steps (deterministic ODE, fixed noise per prompt), scored by the trained and the gold rewards, with diversity
    measures, and rules that warn, stop or roll back."""

    every: int = Field(10, ge=1)
    """A guard round after every this many steps (with that step's metrics)."""
    prompts: list[str] | None = None
    """Held-out prompts given inline (a set of their own: not the training prompts)."""
    prompt_file: str | None = None
    """Or a file of them, as data.prompt_file (.txt one per line, or .parquet with a ``prompt`` column); image editing
    and image-to-video: a .jsonl or .parquet with an image per prompt."""
    samples_per_prompt: int = Field(4, ge=2)
    """Samples per held-out prompt, each from its own fixed noise (2 or more: within-prompt diversity needs pairs)."""
    sampler: Literal["euler", "dpmpp_2m"] | None = None
    """ODE solver; None: the algorithm's when it is an ODE solver, else euler (as raygrpo.eval)."""
    num_steps: int | None = Field(None, ge=2)
    """ODE steps; None: rollout.num_steps."""
    seed: int | None = None
    """Noise seed; None: run.seed. Prompt p's noises come from SeedSequence([seed, p]) in every round."""
    batch_size: int = Field(8, ge=1)
    """Samples per forward."""
    gold_rewards: list[GuardRewardConfig] = Field(default_factory=list)
    rules: list[GuardRuleConfig] = Field(default_factory=list)
    rollback_score: str | None = None
    """The signal whose best round is the rollback target; None: the first rollback rule's signal."""
    max_rollbacks: int = Field(2, ge=0)
    """Rollbacks allowed in a run; a rollback rule that fires after them stops the run."""
    gallery_prompts: int = Field(4, ge=0)
    """Held-out prompts whose samples go into each round's gallery (``<run>/guard/samples/step-NNNNNN/``)."""

    @property
    def data(self) -> DataConfig:
        """The held-out prompts as a prompt source (raygrpo/data/prompts.py loads it)."""
        return DataConfig(prompts=self.prompts, prompt_file=self.prompt_file)

    @model_validator(mode="after")
    def _check(self) -> GuardConfig:
        try:
            self.data
        except ValidationError as exc:  # DataConfig's own check of the source, named for this section
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ").replace("data.", "guard.")) from None
        names = [g.name for g in self.gold_rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"gold reward names must be unique, got {names}")
        return self


def _check_guard(guard: GuardConfig, config: Config) -> None:
    """Every signal a rule names exists; rollback needs a strictly on-policy run; image-conditioned families take
    held-out prompts from a file with their images."""
    known = {f"reward/{r.name}" for r in config.rewards} | {"reward/total"} | {f"gold/{g.name}" for g in guard.gold_rewards}
    known |= set(GUARD_DIVERSITY_SIGNALS)
    named = [(f"guard.rules.{i}.signal", r.signal) for i, r in enumerate(guard.rules)]
    named += [(f"guard.rules.{i}.rising", r.rising) for i, r in enumerate(guard.rules)]
    named += [("guard.rollback_score", guard.rollback_score)] if guard.rollback_score else []
    for where, signal in named:
        if signal not in known:
            raise ValueError(f"{where}={signal!r} is not a guard signal; known: {', '.join(sorted(known))}")
    if config.model.family in ("wan_i2v", "flux_kontext", "qwen_image_edit") and guard.prompts is not None:
        raise ValueError(
            f"guard.prompts: model.family {config.model.family} is image-conditioned and needs a conditioning image per "
            'held-out prompt: give guard.prompt_file, a .jsonl of {"prompt": ..., "image": path} lines or a .parquet with an image column'
        )
    if any(r.action == "rollback" for r in guard.rules) and config.train.max_staleness:
        raise ValueError(
            f"guard.rules: rollback needs train.max_staleness=0 (with {config.train.max_staleness}, groups sampled by the "
            "policy being rolled back are still in flight); use stop, or set train.max_staleness: 0"
        )


VP_FAMILIES = ("sd",)
"""Variance-preserving diffusion families: their DanceGRPO sampler is DDIM-eta (raygrpo/sampling/ddim.py)."""
GuidanceKind = Literal["cfg", "embedded", "none", "unknown"]
FAMILY_GUIDANCE: dict[str, GuidanceKind] = {
    **dict.fromkeys(("sd3", "sd", "wan_i2v", "wan_t2v", "qwen_image", "qwen_image_edit"), "cfg"),
    **dict.fromkeys(("flux", "hunyuan_video", "flux_kontext"), "embedded"),
}
"""How each family's guidance acts (ModelConfig.guidance_kind): classifier-free (a second, unconditional branch above
1.0), or a guidance-distilled value embedded in the one forward (FLUX.1-dev, HunyuanVideo, FLUX.1 Kontext). FLUX.2 is
not listed: its variant decides."""


def _flux2_guidance(pretrained: str) -> GuidanceKind:
    """A FLUX.2 variant's guidance from its ``model_index.json`` (a local folder or the Hugging Face cache), without loading it.

    The same reading as raygrpo/models/flux2.py's ``pipeline_variant`` (tests/test_config.py holds them together)."""
    if pretrained == "tiny-random":
        return "cfg"  # the tiny FLUX.2 is [klein] base (raygrpo/models/tiny_flux2.py)
    index_file = Path(pretrained).expanduser() / "model_index.json"
    if not index_file.is_file():
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError

        try:
            cached = try_to_load_from_cache(pretrained, "model_index.json")
        except HFValidationError:  # neither a folder nor a hub id: the preflight's check_pretrained says so
            return "unknown"
        if not isinstance(cached, str):
            return "unknown"
        index_file = Path(cached)
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):  # a damaged file: check_pretrained names it
        return "unknown"
    if index.get("_class_name") == "Flux2KleinPipeline":
        return "none" if index.get("is_distilled") else "cfg"
    return "embedded" if index.get("_class_name") == "Flux2Pipeline" else "unknown"


def _check_preference_run(config: Config) -> None:
    """Diffusion-DPO / DCPO: pairs come from a file, each group is one pair sampled on one worker, training is conditional
    (the released code trains without CFG), images only."""
    data, model, rollout = config.data, config.model, config.rollout
    if data.prompt_file is None or Path(data.prompt_file).suffix.lower() not in (".jsonl", ".parquet"):
        raise ValueError(
            f"algorithm {config.algorithm.name!r} trains on preference pairs: set data.prompt_file to a .jsonl or .parquet of "
            "pairs (schema in raygrpo/data/preferences.py), not data.prompts or a .txt"
        )
    if rollout.spread_groups or rollout.continuous_batching:
        raise ValueError(f"algorithm {config.algorithm.name!r}: each group carries its pair from one worker; set rollout.spread_groups and rollout.continuous_batching false")
    if model.family in ("hunyuan_video", "wan_i2v"):
        raise ValueError(f"algorithm {config.algorithm.name!r} trains on image pairs; model.family {model.family!r} makes videos")
    train_scale = model.train_guidance_scale if model.train_guidance_scale is not None else model.guidance_scale
    if model.guidance_kind() == "cfg" and train_scale != 1.0:
        raise ValueError(
            f"algorithm {config.algorithm.name!r} trains the conditional prediction (no CFG), but model.family={model.family!r} would "
            f"train with guidance {train_scale:g}: set model.train_guidance_scale: 1.0 (model.guidance_scale stays the evaluation samples')"
        )


def _check_sampler_family(algo: DanceGRPOConfig, family: str) -> None:
    """DDIM-eta is for VP diffusion models only, the flow SDEs for rectified flows only."""
    if family in VP_FAMILIES and algo.sampler != "ddim":
        raise ValueError(
            f"algorithm.sampler={algo.sampler!r} is a rectified-flow SDE, but model.family={family!r} is a "
            "variance-preserving diffusion model: set algorithm.sampler: ddim (DanceGRPO's SD recipe, noise_level = DDIM eta 1.0)"
        )
    if family not in VP_FAMILIES and algo.sampler == "ddim":
        raise ValueError(
            f"algorithm.sampler='ddim' is for variance-preserving diffusion models (model.family: sd), but "
            f"model.family={family!r} is a rectified flow: use dance_sde or flow_sde"
        )
    if algo.sampler == "ddim" and not 0 < algo.noise_level <= 1:
        raise ValueError(f"algorithm.noise_level={algo.noise_level} is DDIM's eta here and must be in (0, 1] (1.0: DanceGRPO's SD recipe)")


def _check_batched_rollout(algo: DanceGRPOConfig, rollout: RolloutConfig, ranks: int) -> None:
    """DanceGRPO at ``rollout.micro_batch_size`` m > 1: the learner recomputes each rollout micro-batch whole
    (raygrpo/algorithms/dancegrpo.py), which needs every micro-batch to reach it whole and in order."""
    m = rollout.micro_batch_size
    if m == 1:
        return
    window = algo.grad_accum_samples // ranks
    broken = [
        f"algorithm.group_size={algo.group_size} is not a multiple of it" if algo.group_size % m else "",
        f"grad_accum_samples / learner.num_ranks = {window} is not a multiple of it" if window % m else "",
        f"algorithm.best_of_n={algo.best_of_n} trains a subset of each group" if algo.best_of_n else "",
        "rollout.spread_groups splits groups at other points" if rollout.spread_groups else "",
    ]
    if any(broken):
        raise ValueError(
            f"rollout.micro_batch_size={m}: the learner recomputes DanceGRPO's log-probs one rollout micro-batch at a time, "
            f"but {'; '.join(b for b in broken if b)}: change these, or set rollout.micro_batch_size: 1"
        )


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardConfig]
    algorithm: AlgorithmConfig = Field(default_factory=DanceGRPOConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    guard: GuardConfig | None = None
    """The reward-hacking guard (raygrpo/guard/); None: off."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not self.rewards:
            raise ValueError("rewards is empty: configure at least one reward")
        names = [r.name for r in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward names must be unique, repeated: {duplicates}")
        if all(r.weight == 0 for r in self.rewards):
            raise ValueError("every reward has weight 0: nothing to learn from")
        algo = self.algorithm
        ranks = self.learner.num_ranks
        if algo.groups_per_step % ranks:
            raise ValueError(
                f"algorithm.groups_per_step={algo.groups_per_step} is not a multiple of learner.num_ranks={ranks}: "
                "every learner rank trains whole groups; change either"
            )
        if isinstance(algo, DanceGRPOConfig) and algo.grad_accum_samples % ranks:
            raise ValueError(
                f"algorithm.grad_accum_samples={algo.grad_accum_samples} is not a multiple of learner.num_ranks={ranks}: "
                "each rank accumulates an equal share of every optimizer step's samples"
            )
        if isinstance(algo, DanceGRPOConfig):
            _check_sampler_family(algo, self.model.family)
            _check_batched_rollout(algo, self.rollout, ranks)
        if isinstance(algo, MixGRPOConfig):
            algo.check_run(self.rollout.num_steps, self.rollout.spread_groups)
        if isinstance(algo, FlowGRPOConfig):
            algo.check_run(self.rollout.num_steps, self.train.max_staleness)
        if isinstance(algo, DiffusionNFTConfig):
            model, per_rank = self.model, algo.groups_per_step // ranks * (algo.best_of_n or algo.group_size)
            algo.check_run(self.rollout.num_steps, model, per_rank)
        if isinstance(algo, DiffusionDPOConfig):
            _check_preference_run(self)
        if isinstance(algo, _DistillConfig):
            algo.check_run(self.model)
        if isinstance(algo, DiffInstructStarConfig) and self.rollout.num_steps != 1:
            raise ValueError(f"Diff-Instruct* trains a one-step generator: set rollout.num_steps: 1 (got {self.rollout.num_steps})")
        if self.rollout.num_steps < 2 and getattr(algo, "sampler", None) != "consistency":
            raise ValueError(f"rollout.num_steps={self.rollout.num_steps}: only one-step generators (Diff-Instruct*) sample in one step; use 2 or more")
        gpus = {"rollout": self.rollout.num_gpus, "learner": self.learner.num_gpus}
        shared = [f"{role}.num_gpus={n:g}" for role, n in gpus.items() if 0 < n < 1]
        if self.run.in_process and ranks > 1:
            raise ValueError(
                f"run.in_process runs one learner rank in the driver process, but learner.num_ranks={ranks}: "
                "set learner.num_ranks=1 or run on Ray (run.in_process=false)"
            )
        if self.run.in_process and self.rollout.autoscale is not None and self.rollout.autoscale.auto:
            raise ValueError(
                "rollout.autoscale.auto measures Ray workers generating beside the learner; run.in_process generates one group "
                "at a time in this process: set rollout.autoscale.auto=false (resize by command) or run on Ray"
            )
        if self.rollout.continuous_batching and getattr(algo, "sampler", None) not in ("euler", "dpmpp_2m"):
            raise ValueError(
                f"rollout.continuous_batching batches deterministic ODE rollouts (algorithm.sampler euler or dpmpp_2m: DGPO, "
                f"DiffusionNFT), but algorithm {algo.name!r} samples with {getattr(algo, 'sampler', None)!r}: set it false"
            )
        if self.run.in_process and self.rollout.weight_sync == "collective":
            raise ValueError("run.in_process has no broadcast group: set rollout.weight_sync to auto or object_store")
        if self.rollout.weight_sync == "collective" and shared:
            raise ValueError(
                f"rollout.weight_sync=collective needs a whole GPU per member, but {' and '.join(shared)} shares one "
                "(NCCL cannot put two members of a group on one device): use weight_sync: object_store or auto"
            )
        if isinstance(algo, DanceGRPOConfig) and self.trained_timesteps < 1:
            raise ValueError(
                f"algorithm.timestep_fraction={algo.timestep_fraction} of the "
                f"{self.rollout.num_steps - 1} trainable steps (rollout.num_steps - 1) trains no step; raise either"
            )
        if isinstance(algo, DGPOConfig) and algo.trunc_steps is not None:
            if algo.trunc_steps >= self.rollout.num_steps:
                raise ValueError(f"algorithm.trunc_steps={algo.trunc_steps} must be below rollout.num_steps={self.rollout.num_steps}")
            if algo.num_train_timesteps > algo.trunc_steps + 1:
                raise ValueError(
                    f"algorithm.num_train_timesteps={algo.num_train_timesteps} distinct steps cannot come from the "
                    f"{algo.trunc_steps + 1} grid points 0..trunc_steps"
                )
        if self.guard is not None:
            _check_guard(self.guard, self)
        return self

    @property
    def trained_timesteps(self) -> int:
        """DanceGRPO: floor((N - 1) * fraction), it drops the last transition then keeps a random fraction. MixGRPO: its window."""
        if isinstance(self.algorithm, MixGRPOConfig):
            return self.algorithm.window_size
        if isinstance(self.algorithm, FlowGRPOConfig | DiffusionNFTConfig):
            return self.algorithm.trained_step_count(self.rollout.num_steps)
        return math.floor((self.rollout.num_steps - 1) * getattr(self.algorithm, "timestep_fraction", 0.0))

    def to_yaml(self) -> str:
        """The whole configuration as YAML, every default filled in: a run folder's and a checkpoint's config.yaml."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def apply_override(tree: dict[str, Any], dotted: str) -> None:
    """Apply one ``a.b.c=value`` to a nested dict in place; list items are addressed by index (``rewards.0.weight``)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key.path=value")
    path, raw = dotted.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {dotted!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        node = _child(node, key, ".".join(keys[: depth + 1]), create=True)
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"override {where!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _child(node: Any, key: str, where: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"override {where!r}: the parent is a {type(node).__name__}, not a section")
    if key not in node or node[key] is None:
        node[key] = {}
    return node[key]


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        loc = list(item["loc"])
        if loc[:1] == ["algorithm"] and loc[1:2] and loc[1] in ALGORITHM_NAMES:
            del loc[1]  # pydantic adds the union's tag to the path; users never wrote it
        field = ".".join(str(p) for p in loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see raygrpo/config.py for the fields)"
        shown = item.get("input")
        detail = f" (got {shown!r})" if item["type"] != "missing" and not isinstance(shown, dict) else ""
        lines.append(f"  {field}: {message}{detail}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file, apply ``key.path=value`` overrides, validate. Raises :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (try cluster/tiny.yaml)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, not a {type(tree).__name__}")
    for override in overrides:
        apply_override(tree, override)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        source = str(path) + (f" with overrides {list(overrides)}" if overrides else "")
        raise ConfigError(_format_errors(exc, source)) from None
