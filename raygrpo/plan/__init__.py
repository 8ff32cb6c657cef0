"""The resource planner: per role, the GPUs, the peak memory per GPU and the FLOPs of a run config, before any GPU.

    python -m raygrpo.plan cluster/flux.yaml [key.path=value ...] [--gpu-memory 80GiB] [--mfu 0.4]

:func:`make_plan` dry-runs the config at its true size on fake tensors (raygrpo/plan/measure.py: one
rollout step of a worker and one learner step of a rank, measured by PyTorch's own memory trackers and
FLOP counter), then turns the per-call numbers into a step's: FLOPs per rollout image and per learner
step, seconds at an assumed MFU, images per GPU-second, and a verdict against a GPU memory size. The
driver runs it in its preflight (raygrpo/run.py) and refuses a plan that cannot fit, with the table; there
it measures the configured gradient checkpointing only and keeps the measurements under
``<run.output_root>/.plans/`` (raygrpo/plan/cache.py), so a repeated or resumed launch plans at once.

What the numbers are. Rollout (per worker): every weight it holds (network, encoders, VAE in
``model.dtype``) plus the largest transient of its phases (encode one group, one denoising step of one
micro-batch, one decode call); the trajectory lives in host memory (rollout/worker.py copies each step
there). Learner (per rank): FSDPMemTracker's categories at the peak of one loss term's forward and
backward (sharded and gathered parameters, sharded and unsharded gradients, activations, temporaries),
plus the AdamW states and the algorithm's parameter shadows (EMAs, frozen copies, Diff-Instruct*'s fake score) that persist
across windows, and a student method's other held parts (the fake score's AdamW states, a pixel reward's float32 VAE). FLOPs
per learner step count every loss term of the step (DanceGRPO: trained members x trained timesteps; DGPO: its timesteps x
groups x micro-batches, each with the no-gradient forwards dgpo.py runs, :func:`~raygrpo.algorithms.dgpo.no_grad_forwards`;
DiffusionNFT: each sample's noise levels x groups x micro-batches, with the old policy's and the reference's forwards;
RG-LCD and Diff-Instruct*: the rank's whole window run through the algorithm's own loss terms, raygrpo/plan/students.py:
the teacher / reference with its CFG, the EMA target, the fake score's forwards and its DSM step, the latent reward
model's fit, the student's forward and backward with the reward through the VAE decoder or the latent reward model);
with gradient checkpointing they include the backward's recompute of every block. Seconds assume the step is
compute-bound at ``mfu`` of ``gpu_flops``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from raygrpo.algorithms import diffusionnft, dgpo, rollout_spec
from raygrpo.config import Config, DGPOConfig, DiffusionDPOConfig, DiffusionNFTConfig
from raygrpo.models import VIDEO_FAMILIES
from raygrpo.plan.architecture import ArchitectureError, architecture
from raygrpo.plan.cache import cached_measure
from raygrpo.plan.measure import LearnerMeasure, Measurements, RolloutMeasure
from raygrpo.plan.students import is_student

GiB = 2**30
DEFAULT_GPU_MEMORY = 80 * GiB  # H100 / A100-80GB
DEFAULT_GPU_FLOPS = 989e12  # H100/H200 SXM dense bf16 tensor-core peak
DEFAULT_MFU = 0.4


@dataclass
class RolePlan:
    """One role's row: its actors, GPUs each, and (where measured) the peak memory per GPU by part and its FLOPs."""

    role: str
    actors: int
    gpus_each: float
    parts: dict[str, int] = field(default_factory=dict)  # part -> bytes per GPU at the peak
    peak_bytes: int | None = None  # None: not measured (reward models)
    flops: float = 0.0  # rollout: per image; learner: per step per rank
    note: str = ""

    def fits(self, gpu_memory_bytes: int) -> bool:
        """A measured role on whole GPUs fits when its peak is within its GPUs' memory; others are not judged."""
        if self.peak_bytes is None or self.gpus_each < 1:
            return True
        return self.peak_bytes <= gpu_memory_bytes * self.gpus_each


@dataclass
class Plan:
    """What :func:`make_plan` found; :meth:`table` for people, :meth:`to_dict` for scripts."""

    config_name: str
    depth: str
    gpu_memory_bytes: int
    mfu: float
    gpu_flops: float
    roles: list[RolePlan]
    rollout_seconds_per_image: float
    learner_seconds_per_step: float
    rollout_images_per_gpu_s: float
    learner_images_per_gpu_s: float
    host_bytes_per_group: int  # a GRPO group's trajectory and log-probs in the rollout worker's host memory
    learner_other_peak_bytes: int | None  # the learner's peak with gradient checkpointing switched the other way (None: not measured)
    gradient_checkpointing: bool

    @property
    def fits(self) -> bool:
        return all(role.fits(self.gpu_memory_bytes) for role in self.roles)

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}

    def table(self) -> str:
        gpu = self.gpu_memory_bytes
        lines = [
            f"resource plan: {self.config_name} ({self.depth})",
            f"per GPU: {_gib(gpu)} memory, {self.gpu_flops / 1e12:g} TFLOP/s at MFU {self.mfu:g}",
            f"  {'role':<22}{'actors':>7}{'GPUs':>6}{'peak/GPU':>11}  verdict",
        ]
        for role in self.roles:
            peak = _gib(role.peak_bytes) if role.peak_bytes is not None else "-"
            verdict = "not measured" if role.peak_bytes is None else ("fits" if role.fits(gpu) else "DOES NOT FIT")
            lines.append(f"  {role.role:<22}{role.actors:>7}{role.gpus_each:>6g}{peak:>11}  {verdict}{'; ' + role.note if role.note else ''}")
            for part, size in sorted(role.parts.items(), key=lambda kv: -kv[1]):
                if size >= 2**20:
                    lines.append(f"      {part:<34}{_gib(size):>11}")
        if self.learner_other_peak_bytes is not None:
            other = "off" if self.gradient_checkpointing else "on"
            lines.append(f"learner with gradient checkpointing {other}: {_gib(self.learner_other_peak_bytes)} per GPU")
        lines += [
            f"rollout: {self.rollout_seconds_per_image:.3g} s per image per worker = {self.rollout_images_per_gpu_s:.3g} images/GPU/s; "
            f"trajectory {_gib(self.host_bytes_per_group)} of host memory per group",
            f"learner: {self.learner_seconds_per_step:.3g} s per step = {self.learner_images_per_gpu_s:.3g} trained images/GPU/s",
            "verdict: " + ("fits" if self.fits else f"does not fit in {_gib(gpu)} per GPU"),
        ]
        return "\n".join(lines)


def _gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"141GB"``, ``"80"`` (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB|TiB|TB|B)?\s*", text)
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r}: write e.g. 80GiB or 141GB")
    units = {"B": 1, "MB": 10**6, "MiB": 2**20, "GB": 10**9, "GiB": GiB, "TB": 10**12, "TiB": 2**40, None: GiB}
    return int(float(match.group(1)) * units[match.group(2)])


def make_plan(
    config: Config,
    mfu: float = DEFAULT_MFU,
    gpu_memory_bytes: int = DEFAULT_GPU_MEMORY,
    gpu_flops: float = DEFAULT_GPU_FLOPS,
    config_name: str | None = None,
    compare: bool = True,
    cache: Path | None = None,
) -> Plan:
    """Dry-run ``config`` on fake tensors and plan it. Raises :class:`ArchitectureError` when its architecture is unknown.

    ``compare``: also measure the learner with gradient checkpointing switched the other way (a second
    learner dry run; the preflight skips it). ``cache``: a folder keeping the measurements
    (raygrpo/plan/cache.py), so that planning the same config again reads them instead of dry-running.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    arch = architecture(config.model.family, config.model.pretrained)
    measured = cached_measure(config, arch, compare, cache)
    return plan_from(config, measured, mfu, gpu_memory_bytes, gpu_flops, config_name or config.run.name)


def plan_from(config: Config, measured: Measurements, mfu: float, gpu_memory_bytes: int, gpu_flops: float, name: str) -> Plan:
    """The plan of ``config`` from its measurements (:func:`~raygrpo.plan.measure.measure`)."""
    rollout, per_image, host = _rollout_row(config, measured.rollout)
    gc = config.learner.gradient_checkpointing
    learner, images_per_step = _learner_row(config, measured.learner[gc])
    other = _learner_row(config, measured.learner[not gc])[0].peak_bytes if (not gc) in measured.learner else None
    rewards = [RolePlan(f"reward:{r.name}", r.replicas, r.num_gpus, note="reward models are outside the planner") for r in config.rewards]
    speed = mfu * gpu_flops
    rollout_s, learner_s = rollout.flops / speed, learner.flops / speed
    learner_gpus = config.learner.num_ranks * max(config.learner.num_gpus, 1)
    return Plan(
        config_name=name,
        depth=measured.depth,
        gpu_memory_bytes=gpu_memory_bytes,
        mfu=mfu,
        gpu_flops=gpu_flops,
        roles=[rollout, *rewards, learner],
        rollout_seconds_per_image=rollout_s,
        learner_seconds_per_step=learner_s,
        rollout_images_per_gpu_s=1 / rollout_s / max(config.rollout.num_gpus, 1) if rollout_s else math.inf,
        learner_images_per_gpu_s=images_per_step / learner_s / learner_gpus if learner_s else math.inf,
        host_bytes_per_group=host,
        learner_other_peak_bytes=other,
        gradient_checkpointing=gc,
    )


def _rollout_row(config: Config, m: RolloutMeasure) -> tuple[RolePlan, float, int]:
    """The rollout worker's row, its FLOPs per image, and a group's host-memory trajectory."""
    g, steps = config.algorithm.group_size, config.rollout.num_steps
    micro = min(config.rollout.micro_batch_size, g)
    weights = sum(m.params.values())
    transients = {name: phase.transient for name, phase in (("encode", m.encode), ("denoise step", m.step), ("decode", m.decode))}
    worst = max(transients, key=transients.get)
    parts = {f"weights: {name}": size for name, size in m.params.items()} | {f"{worst} (transient)": transients[worst]}
    decode_calls = g if config.model.family in VIDEO_FAMILIES else 1  # videos decode one at a time, images a group at once
    group_flops = m.encode.flops + steps * math.ceil(g / micro) * m.step.flops + decode_calls * m.decode.flops
    records = rollout_spec(config).record_trajectory
    host = g * ((steps + 1) * m.latent_bytes + steps * 4) if records else g * m.latent_bytes
    note = f"peak in {worst}; conditioning {m.conditioning_bytes / 2**20:.1f} MiB per group"
    row = RolePlan("rollout", config.rollout.num_workers, config.rollout.num_gpus, parts, weights + transients[worst], group_flops / g, note)
    return row, group_flops / g, host


def _learner_row(config: Config, m: LearnerMeasure) -> tuple[RolePlan, int]:
    """A learner rank's row (FLOPs per step per rank) and the samples all ranks train per step."""
    algo, ranks = config.algorithm, config.learner.num_ranks
    groups = algo.groups_per_step // ranks  # per rank: whole groups
    members = algo.best_of_n or algo.group_size
    if isinstance(algo, DiffusionDPOConfig):
        # Offline pairs: one term per pair of the step (the measured term holds its reference forward too); the
        # group's members are evaluation samples and train nothing. Two images (x^w, x^l) train per pair.
        flops, members = groups * m.term.flops, 2
    elif isinstance(algo, DGPOConfig | DiffusionNFTConfig):
        chunks = math.ceil(members / min(algo.micro_batch_size or members, members))
        # The measured term holds one no-gradient forward (DGPO's reference, DiffusionNFT's old policy) besides the
        # policy's forward and backward: add the others the algorithm runs per micro-batch and noise level.
        if isinstance(algo, DGPOConfig):
            extra, levels = dgpo.no_grad_forwards(algo, members) - 1, algo.num_train_timesteps
        else:
            extra, levels = diffusionnft.no_grad_forwards(algo) - 1, config.trained_timesteps
        flops = levels * groups * chunks * (m.term.flops + extra * m.no_grad_flops)
    elif is_student(config):
        # The measured "term" is the rank's whole window (raygrpo/plan/students.py): the step itself.
        flops = m.term.flops
    else:
        flops = groups * members * config.trained_timesteps * m.term.flops
    shadows = {"shadows: EMA / frozen / fake score": m.shadow_bytes}
    parts = dict(m.term.breakdown) | {"optimizer states": m.optimizer_bytes} | shadows | m.held_bytes
    parts = {k: v for k, v in parts.items() if k != "Total"}
    peak = m.term.peak + m.optimizer_bytes + m.shadow_bytes + sum(m.held_bytes.values())
    note = f"loading moves one FSDP unit of {_gib(m.largest_unit_bytes)} (float32) to the GPU at a time"
    if is_student(config):
        share = m.no_grad_flops / max(flops, 1)
        note += f"; {share:.0%} of the FLOPs in forwards without gradients (teacher / reference, target, fake score)"
    row = RolePlan("learner", ranks, config.learner.num_gpus, parts, peak, flops, note)
    return row, algo.groups_per_step * members


__all__ = ["DEFAULT_GPU_FLOPS", "DEFAULT_GPU_MEMORY", "DEFAULT_MFU", "ArchitectureError", "Plan", "RolePlan", "make_plan", "parse_bytes", "plan_from"]
