"""The run configuration: one pydantic model tree, loaded from YAML with dotted command-line overrides.

    python -m raygrpo.run cluster/tiny.yaml train.steps=3 rollout.num_workers=2

Every section forbids unknown keys, so a typo fails before Ray starts with the dotted name of the
field. Override values are parsed as YAML scalars (``3`` is an int, ``1e-4`` a float, ``null`` None,
``[a, b]`` a list).
"""

from __future__ import annotations

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
    family: Literal["flux", "sd3", "sd", "hunyuan_video", "wan_i2v"] = "flux"
    """Adapter (raygrpo/models/): images flux, sd3, sd; videos hunyuan_video (text-to-video), wan_i2v (image-to-video:
    Wan 2.1 or SkyReels-V2 I2V checkpoints, told apart by the pipeline's model_index.json)."""
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

    @model_validator(mode="after")
    def _check_num_frames(self) -> ModelConfig:
        if self.num_frames is not None:
            if self.family not in ("hunyuan_video", "wan_i2v"):
                raise ValueError(f"num_frames is for the video families (hunyuan_video, wan_i2v), not {self.family!r}; remove it")
            if (self.num_frames - 1) % 4:
                below = (self.num_frames - 1) // 4 * 4 + 1
                raise ValueError(f"num_frames must be 4k+1 (the video VAEs compress time 4x after its first frame): {below} or {below + 4}")
        return self


class RolloutConfig(_Section):
    num_workers: int = Field(1, ge=1)
    num_gpus: float = Field(0, ge=0)
    """GPUs per rollout worker."""
    num_cpus: float = Field(1, ge=0)
    num_steps: int = Field(16, ge=2)
    shift: float = Field(3.0, gt=0)
    micro_batch_size: int = Field(1, ge=1)
    """Samples per rollout forward. DanceGRPO: 1 is the paper's (each sample its own trained steps); m > 1
    samples m members per forward and the learner recomputes their log-probs in one forward of the same m
    (they share their trained steps), so the first ratio stays exactly 1; it needs group_size and
    grad_accum_samples / learner.num_ranks to be multiples of m, no best_of_n and no spread_groups.
    DGPO (ODE, no log-probs): any value."""
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


AlgorithmConfig = Annotated[DanceGRPOConfig | DGPOConfig, Field(discriminator="name")]


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
    (model.family wan_i2v): a .jsonl of ``{"prompt": ..., "image": path}`` lines or a .parquet with an
    ``image`` column (a path, relative to the file, or PNG/JPEG bytes)."""

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


VP_FAMILIES = ("sd",)
"""Variance-preserving diffusion families: their DanceGRPO sampler is DDIM-eta (raygrpo/sampling/ddim.py)."""


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
        gpus = {"rollout": self.rollout.num_gpus, "learner": self.learner.num_gpus}
        shared = [f"{role}.num_gpus={n:g}" for role, n in gpus.items() if 0 < n < 1]
        if self.run.in_process and ranks > 1:
            raise ValueError(
                f"run.in_process runs one learner rank in the driver process, but learner.num_ranks={ranks}: "
                "set learner.num_ranks=1 or run on Ray (run.in_process=false)"
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
        return self

    @property
    def trained_timesteps(self) -> int:
        """DanceGRPO: floor((N - 1) * fraction), it drops the last transition then keeps a random fraction."""
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
        if loc[:1] == ["algorithm"] and loc[1:2] and loc[1] in ("dancegrpo", "dgpo"):
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
