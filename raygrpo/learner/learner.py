"""The learner rank: owns the trainable network (full, or a LoRA adapter), its optimizer and the update loop.

Each rank is a Ray actor of :class:`~raygrpo.learner.group.LearnerGroup` (built with the group's
rendezvous address, it joins the process group before it loads the model), or an object in this
process (``run.in_process``, tests, benchmarks: ``Learner(config)``, one rank, no process group).

One update (:meth:`Learner.update`) on this rank's group slots::

    draws   = algorithm.draw(rng, every group of the step)          # the same draws on every rank
    for window in windows of algorithm.window_samples() samples:    # one optimizer step each
        N = real samples of the window, over every rank
        for term in algorithm.loss_terms(model, window, draws):     # one forward each
            term.backward((M if real else 0) / N)                   # FSDP syncs on term.final only
        clip the gradient norm; optimizer step; algorithm.after_optimizer_step()

The algorithm computes losses (raygrpo/algorithms/); windows, padding, normalisation, gradient sync and
optimizer steps are the learner's (raygrpo/learner/shard.py says why each is the way it is).

Precision (reference doc §6.4, DanceGRPO FLUX: "fp32 master weights + bf16 autocast"): the
network, its gradients and the AdamW moments are always float32 here. With ``model.dtype``
bfloat16/float16 the compute runs in that dtype: through FSDP2's ``MixedPrecisionPolicy`` when the
network is sharded (always, below float32: a learner alone in its process joins a one-rank process
group for it). Exported weights are cast to ``model.dtype``, the dtype the rollout side holds. FSDP's
policy computes exactly what the rollout's pure-bf16 model computes, so the first ratio stays exactly 1;
``torch.autocast``, used here before, keeps some ops in float32 (3e-4 off on tiny FLUX from step 2).

Sharding: FSDP2 ``fully_shard`` on every transformer block and the root whenever a process group is
up (every LearnerGroup rank, and a one-rank group in this process for a GPU or a compute dtype below
float32) and there is more than one rank, a GPU, or a compute dtype below float32; one float32 CPU rank
runs unsharded, in process or not.

Activation checkpointing (``learner.gradient_checkpointing``, DanceGRPO's per-block checkpointing,
reference doc §9.1): diffusers' own ``enable_gradient_checkpointing`` on the trained network, so each
block's forward runs under non-reentrant ``torch.utils.checkpoint`` (it works with frozen inputs and a
LoRA adapter's parameters alike). The backward recomputes one block at a time: the gradients are
those of the plain forward (identical on CPU in tests/test_gradient_checkpointing.py).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from raygrpo.actor_group import get
from raygrpo.algorithms import LossTerm, StepDraws, WindowGroup, make_algorithm
from raygrpo.config import Config
from raygrpo.contracts import LearnerMetrics, Rollout, TrainGroup, WeightsMessage, merge_rollouts
from raygrpo.learner.fsdp import full_state_dict, gathered_tensors, init_process_group, join_single_rank_group, shard_network
from raygrpo.learner.shard import RankBatch, clip_grad_norm, global_sums, pick
from raygrpo.learner.state import load_training_state, save_training_state
from raygrpo.models import load_model
from raygrpo.models.lora import add_lora
from raygrpo.net import rendezvous_address
from raygrpo.runtime import role_device, set_torch_threads, torch_dtype
from raygrpo.weight_broadcast import WeightBroadcastGroup
from raygrpo.weights import export_weights

logger = logging.getLogger(__name__)


class Learner:
    """One learner rank.

    Components: ``model`` (the family's adapter; ``model.transformer`` is trained, FSDP-sharded or
    not), ``parameters`` (the trainable ones, DTensor shards when sharded), ``optimizer`` (AdamW),
    ``algorithm`` (DanceGRPO or DGPO, with its shadows), ``rng`` (numpy, draws timesteps and noise
    seeds; identical on every rank), ``policy_version``.
    """

    def __init__(self, config: Config, rank: int = 0, world_size: int = 1, rendezvous: tuple[str, int] | None = None):
        set_torch_threads(config.learner.num_cpus)
        device = role_device(config.learner.num_gpus, config.run.device_override)
        if rendezvous is not None:
            # First: FSDP needs the process group when the network is sharded below.
            init_process_group(rank, world_size, *rendezvous, use_cuda=device.type == "cuda")
        elif world_size == 1 and (device.type == "cuda" or torch_dtype(config.model.dtype) != torch.float32):
            # Alone in this process (run.in_process, tests): shard as a Ray rank does, for the same numerics.
            join_single_rank_group(use_cuda=device.type == "cuda")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size > 1 and not distributed:
            raise RuntimeError(f"a learner rank of {world_size} needs torch.distributed initialised first (LearnerGroup does it)")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.device = device
        self.compute_dtype = torch_dtype(config.model.dtype)
        self.sharded = distributed and (world_size > 1 or self.device.type == "cuda" or self.compute_dtype != torch.float32)
        # Training may see the policy without CFG (DGPO on SD3) while rollout uses it.
        train_scale = config.model.train_guidance_scale if config.model.train_guidance_scale is not None else config.model.guidance_scale
        # A teacher or reference with CFG (RG-LCD, Diff-Instruct*) needs the negative prompt's encoding while the student
        # trains without it: load at the teacher's scale (the loader keeps the negative) and train at the policy's own.
        teacher_scale = config.algorithm.teacher_guidance(config.model) or train_scale
        self.model = load_model(
            config.model.family,
            config.model.pretrained,
            torch_dtype=torch.float32,  # master weights; compute_dtype applies in the forward
            # A sharded rank loads on the CPU and fully_shard moves the network to its GPU unit by unit: loading
            # there first held the whole float32 network on every GPU before sharding (FLUX: 48 GB per rank).
            device="cpu" if self.sharded else self.device,
            load_text_encoders=False,
            load_vae=False,
            height=config.model.height,
            width=config.model.width,
            guidance_scale=max(train_scale, teacher_scale),
            max_sequence_length=config.model.max_sequence_length,
            num_frames=config.model.num_frames,
            train_expert=config.model.train_expert,  # Wan 2.2 A14B: the expert this side trains / receives
        )
        self.model.guidance_scale = train_scale
        network = self.model.transformer
        self.synced_names = prepare_network(network, config, shard=self.sharded)
        self.parameter_names = [n for n, p in network.named_parameters() if p.requires_grad]
        self.parameters = [p for p in network.parameters() if p.requires_grad]
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(self.parameters, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        self.algorithm = make_algorithm(config)
        self.algorithm.setup(self.model, self.parameters, lora=config.model.lora is not None)
        self.rng = np.random.default_rng(config.run.seed + 1)
        self.policy_version = 0

    def update(self, part: RankBatch) -> LearnerMetrics:
        """One training step on this rank's group slots; the rollouts are fetched here, never on the controller.

        Every rank of the group calls it at once with its own part (:func:`~raygrpo.learner.shard.split_batch`);
        an in-process learner takes ``RankBatch.whole(groups)``.
        """
        start = time.perf_counter()
        rollouts = fetch_rollouts(part.groups)
        shard, algorithm = part.shard, self.algorithm
        draws = algorithm.draw(self.rng, shard.total_groups or len(part.groups), len(part.groups[0].members), rollouts[0])
        mine = pick(draws.per_group, shard.group_offset, len(part.groups))
        self.policy_version += 1
        windows = list(self._windows(part, rollouts, mine))
        # Each window's real samples over every rank, for all windows in one all-reduce.
        n_real = global_sums([sum(len(wg.rows) for wg in window if part.is_real(wg.slot)) for window in windows], self.world_size)
        tally = _Tally()
        self.optimizer.zero_grad(set_to_none=True)
        for window, n in zip(windows, n_real):
            self._train_window(part, window, n, draws, tally)
        samples = sum(len(g.members) for k, g in enumerate(part.groups) if part.is_real(k))
        metrics = tally.metrics(self.policy_version, samples, time.perf_counter() - start, algorithm.on_policy_ratio, draws.extras)
        return global_metrics(metrics) if self.world_size > 1 else metrics

    def _train_window(self, part: RankBatch, window: list[WindowGroup], n_real: float, draws: StepDraws, tally: _Tally) -> None:
        """One optimizer step: a backward per loss term, then clip and step. Nothing here waits for the device
        (the statistics stay tensors until the update ends), so a GPU runs the terms back to back."""
        losses = []  # the real terms' losses, detached
        first_window = not tally.grad_norms
        synced = None  # FSDP's gradient sync as last set: toggling it walks every FSDP module, so only on change
        # M per real term undoes FSDP's average over the ranks; padding weighs 0 (learner/shard.py). Passed to
        # LossTerm.backward: the gradients of ``loss * scale``, without a multiply and its node per term.
        scales: dict[tuple[bool, torch.dtype], torch.Tensor] = {}
        for term in self.algorithm.loss_terms(self.model, window, draws):
            real = part.is_real(term.slot)
            if self.sharded and synced != (sync := term.final or self.config.learner.reduce_every_backward):
                # One reduce-scatter per window: only its last backward syncs gradients over the ranks.
                self.model.transformer.set_requires_gradient_sync(sync)
                synced = sync
            scale = scales.get(key := (real, term.loss.dtype))
            if scale is None:
                # a fill on the device, not a host-to-device copy (nothing here waits for the device)
                scale = scales[key] = torch.full((), (self.world_size if real else 0.0) / n_real, dtype=key[1], device=term.loss.device)
            term.backward(scale)
            if real:
                # DanceGRPO's terms mostly share one constant loss (their window group's last carries its value): no detach
                losses.append(term.loss.detach() if term.loss.requires_grad else term.loss)
                tally.add(term, first_window)
        # float64: the terms' losses carry the advantages' signs and largely cancel
        tally.losses.append(torch.stack(losses).double().sum() / n_real if losses else torch.zeros((), dtype=torch.float64))
        tally.grad_norms.append(clip_grad_norm(self.parameters, self.config.optimizer.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.algorithm.after_optimizer_step()

    def _windows(self, part: RankBatch, rollouts: list[Rollout], draws: list):
        """This rank's samples (slot by slot, member by member) cut into the algorithm's windows, as WindowGroups."""
        samples = [(slot, row) for slot, group in enumerate(part.groups) for row in range(len(group.members))]
        size = self.algorithm.window_samples(self.world_size) or len(samples)
        for lo in range(0, len(samples), size):
            rows_by_slot: dict[int, list[int]] = {}
            for slot, row in samples[lo : lo + size]:
                rows_by_slot.setdefault(slot, []).append(row)
            yield [
                WindowGroup(slot, part.groups[slot], rollouts[slot], np.asarray(rows, np.int64), draws[slot], padding=not part.is_real(slot))
                for slot, rows in rows_by_slot.items()
            ]

    def export_weights(self) -> WeightsMessage | None:
        """The weights rollout should sample with (DGPO: the fast EMA after its switch step), in ``model.dtype``.

        Every rank must call it (the shards are gathered); rank 0 returns the message, the others None.
        """
        with self.algorithm.sampling_weights():
            state = full_state_dict(self.model.transformer, self.synced_names, self.compute_dtype, keep=self.rank == 0)
        if self.rank != 0:
            return None
        return export_weights(_StateView(state), self.policy_version, self.synced_names, self.config.rollout.weight_verify)

    def publish_weights(self):
        """As a Ray actor: :meth:`export_weights` without its snapshot copy, put into the object store here;
        rank 0 returns the message's ObjectRef, the others None (every rank must call it: shards are gathered).

        The message's arrays are views of the tensors; ``ray.put`` copies them into shared memory inside the
        ``sampling_weights`` block, so before the block swaps the live weights back (DGPO's fast EMA) and
        before any later call can change them: what is put is what rollout should sample with (weights.py).
        """
        import ray

        with self.algorithm.sampling_weights():
            tensors = gathered_tensors(self.model.transformer, self.synced_names, self.compute_dtype)
            if self.rank != 0:
                for _ in tensors:  # join every gather
                    pass
                return None
            state = _StateView(dict(tensors))
            return ray.put(export_weights(state, self.policy_version, self.synced_names, self.config.rollout.weight_verify, copy=False))

    @contextmanager
    def sampling_tensors(self):
        """``(name, whole tensor)`` of what rollout samples with, one at a time in sorted name order, where the
        network is, in ``model.dtype`` (LoRA: the adapter's alone); every rank must consume it to the end."""
        with self.algorithm.sampling_weights():
            yield gathered_tensors(self.model.transformer, self.synced_names, self.compute_dtype)

    def weight_names(self) -> list[str]:
        """Names of the tensors :meth:`sampling_tensors` yields, sorted (the broadcast's order)."""
        return sorted(self.synced_names) if self.synced_names is not None else sorted(self.model.transformer.state_dict())

    def save(self, folder: str) -> str | None:
        """Write the evaluation weights (DGPO: the slow EMA) loadable by diffusers; every rank calls it, rank 0 writes.

        Full fine-tuning: ``transformer/`` (``unet/`` for UNet families: the adapter's
        ``network_component``), loadable with ``from_pretrained``. LoRA: ``transformer_lora/`` (``unet_lora/``),
        loadable with ``load_lora_adapter``; the base stays the pretrained one.
        """
        folder_path = Path(folder)
        network, component = self.model.transformer, self.model.network_component
        with self.algorithm.evaluation_weights():
            if not self.sharded:
                if self.config.model.lora is not None:
                    network.save_lora_adapter(folder_path / f"{component}_lora")
                else:
                    network.save_pretrained(folder_path / component)
            else:
                state = full_state_dict(network, self.synced_names, None, keep=self.rank == 0)
                if self.rank == 0:
                    _save_gathered(network, state, folder_path / component, lora=self.config.model.lora is not None)
        if self.rank != 0:
            return None
        model, rollout = self.config.model, self.config.rollout
        state = {
            "policy_version": self.policy_version,
            "pretrained": model.pretrained,
            "family": model.family,
            "algorithm": self.config.algorithm.name,
            # How the run sampled: what the exported pipeline's README snippet generates with.
            "generation": {
                "height": model.height, "width": model.width, "num_inference_steps": rollout.num_steps,
                "guidance_scale": model.guidance_scale, "num_frames": model.num_frames, "shift": rollout.shift,
            },
        }  # fmt: skip
        (folder_path / "raygrpo_state.json").write_text(json.dumps(state, indent=2))
        return str(folder_path)

    # ----- as a Ray actor of the learner group -----

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def rendezvous(self, loopback: bool) -> tuple[str, int]:
        """An address on this node and a free port there (rank 0: for the learner-to-rollout broadcast group)."""
        return rendezvous_address(loopback)

    def join_weight_group(self, host: str, port: int, world_size: int, timeout_s: float = 600.0) -> int:
        """Rank 0 only: join the learner-to-rollout broadcast group as its sender (its rank 0), leaving an older one."""
        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
        self.weight_group = WeightBroadcastGroup(host, port, 0, world_size, self.device, timeout_s=timeout_s)
        return 0

    def send_weights(self) -> tuple[int, int] | None:
        """Every rank gathers the sampling weights tensor by tensor; rank 0 broadcasts each as it is gathered
        and returns ``(policy_version, digest)``. No rank holds a second whole copy of the network."""
        with self.sampling_tensors() as tensors:
            if self.rank != 0:
                for _ in tensors:  # join every gather
                    pass
                return None
            return self.policy_version, self.weight_group.send(tensors, self.config.rollout.weight_verify, self.policy_version)

    def save_state(self, folder: str, rollback: bool = False) -> None:
        """The full training state for an exact resume (see :mod:`raygrpo.learner.state`); every rank calls it.
        ``rollback``: only what a guard rollback restores (no generators, no frozen copies)."""
        save_training_state(self, Path(folder), rollback)

    def load_state(self, folder: str) -> int:
        """Restore what :meth:`save_state` wrote; returns the restored policy version."""
        load_training_state(self, Path(folder))
        return self.policy_version


def prepare_network(network: torch.nn.Module, config: Config, shard: bool, mesh=None) -> set[str] | None:
    """Make a loaded network the learner's, in place: train mode, a seeded LoRA adapter or every parameter
    trainable, activation checkpointing, then (``shard``) FSDP2 shards on ``mesh`` (None: the process group's).

    Returns the names rollout receives: the adapter's with LoRA, None (everything) for full fine-tuning.
    The planner prepares its fake-tensor network with this same function (raygrpo/plan/measure.py).
    """
    network.train()
    if config.model.lora is not None:
        # A seeded adapter init: every rank (and a resumed learner) starts from the same adapter.
        on_gpu = next(network.parameters()).is_cuda
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if on_gpu else []):
            torch.manual_seed(config.run.seed)
            add_lora(network, config.model.lora)
    else:
        network.requires_grad_(True)
    synced = {n for n, p in network.named_parameters() if p.requires_grad} if config.model.lora else None
    if config.learner.gradient_checkpointing:
        # Before sharding: each block is then both the checkpointed function and the FSDP unit, and FSDP2
        # skips its unshard/reshard hooks while the backward recomputes a block (the gather is already done).
        network.enable_gradient_checkpointing()
    if shard:
        shard_network(network, torch_dtype(config.model.dtype), mesh=mesh)  # parameters become DTensor shards, names unchanged
    return synced


class _StateView:
    """Gathered full tensors presented as a module to ``weights.export_weights`` (which reads ``state_dict()``)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _save_gathered(network: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path, lora: bool) -> None:
    """Write gathered full tensors in the layouts diffusers loads (a sharded network cannot ``save_pretrained`` itself):
    ``folder`` is the component's folder (``<ckpt>/transformer``); a LoRA adapter goes beside it (``<ckpt>/transformer_lora``)."""
    if lora:
        import safetensors.torch
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(network, state_dict=state, adapter_name="default")
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in network.peft_config["default"].to_dict().items()}
        metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
        lora_folder = folder.with_name(f"{folder.name}_lora")
        lora_folder.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in layers.items()}, lora_folder / LORA_WEIGHT_NAME_SAFE, metadata=metadata
        )
        return
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    network.save_config(folder)
    # fully_shard swaps the module's class for a generated ``FSDP<Class>`` subclass, and save_config writes
    # that name: diffusers could not load the folder by its _class_name. Write the model's own class.
    from torch.distributed.fsdp import FSDPModule

    own = next(cls for cls in type(network).__mro__ if not issubclass(cls, FSDPModule))
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "_class_name": own.__name__}, indent=2, sort_keys=True) + "\n")
    # The file names diffusers' from_pretrained looks for, sharded with an index when large.
    save_torch_state_dict(state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB")


def fetch_rollouts(batch: list[TrainGroup]) -> list[Rollout]:
    """Each group's Rollout: refs fetched in one call; a group spread over workers (a list of refs) merged
    back into one (``contracts.merge_rollouts``); Rollouts given as they are (tests) are used as they are."""
    parts = [group.rollout if isinstance(group.rollout, list) else [group.rollout] for group in batch]
    refs = [p for group_parts in parts for p in group_parts if not isinstance(p, Rollout)]
    fetched = iter(get(refs) if refs else [])
    return [merge_rollouts([p if isinstance(p, Rollout) else next(fetched) for p in group_parts]) for group_parts in parts]


@dataclass
class _Tally:
    """The statistics of one update's real loss terms, detached tensors read back once by :meth:`metrics`."""

    losses: list[torch.Tensor] = field(default_factory=list)  # per window: sum of its real terms' loss / its real samples
    grad_norms: list[torch.Tensor] = field(default_factory=list)  # per window, before clipping
    ratios: list[torch.Tensor] = field(default_factory=list)
    first_ratios: list[torch.Tensor] = field(default_factory=list)  # ratios of the first window (before any optimizer step)
    clipped: list[torch.Tensor] = field(default_factory=list)
    extras: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, term: LossTerm, first_window: bool) -> None:
        if term.ratios is not None:
            self.ratios.append(term.ratios)
            if first_window:
                self.first_ratios.append(term.ratios)
        if term.clipped is not None:
            self.clipped.append(term.clipped)
        for key, value in term.extras.items():
            self.extras.setdefault(key, []).append(value)

    def metrics(self, version: int, samples: int, seconds: float, on_policy_ratio: bool, step_extras: dict[str, float]) -> LearnerMetrics:
        def values(tensors: list[torch.Tensor]) -> np.ndarray:
            # float64 before the mean: the ratios' deviations from 1 are near float32's resolution
            if not tensors:
                return np.full(1, np.nan)
            # 0-dim statistics (most lists: one per term) stacked, and [n] ones (ratios) joined, without a reshape each
            if all(t.ndim == 0 for t in tensors):
                flat = torch.stack(tensors)
            else:
                flat = torch.cat([t if t.ndim == 1 else t.reshape(-1) for t in tensors])
            return flat.double().cpu().numpy()

        ratios, first = values(self.ratios), values(self.first_ratios)  # NaN: only padding here, or no ratios
        return LearnerMetrics(
            policy_version=version,
            loss=float(np.mean(values(self.losses))),
            grad_norm=float(np.mean(values(self.grad_norms))),
            clip_fraction=float(np.mean(values(self.clipped))) if self.clipped else float("nan"),
            ratio_mean=float(ratios.mean()),
            ratio_max_abs_dev=float(np.abs(ratios - 1).max()),
            first_ratio_max_abs_dev=float(np.abs(first - 1).max()) if on_policy_ratio else float("nan"),
            optimizer_steps=len(self.grad_norms),
            samples=samples,
            seconds=seconds,
            extras={key: float(np.mean(values(v))) for key, v in self.extras.items()} | step_extras,
        )


def global_metrics(metrics: LearnerMetrics) -> LearnerMetrics:
    """One rank's metrics combined with every other rank's (all ranks call it): means weighted by samples, maxima, sums."""
    gathered: list[dict] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(gathered, asdict(metrics))
    weights = np.asarray([m["samples"] for m in gathered], np.float64)

    def mean(key: str, extras: bool = False) -> float:
        # A rank holding padding alone has no real term, so none of the terms' extras: NaN, left out below.
        values = np.asarray([m["extras"].get(key, np.nan) if extras else m[key] for m in gathered], np.float64)
        used = (weights > 0) & np.isfinite(values)
        return float(np.average(values[used], weights=weights[used])) if used.any() else float("nan")

    def maximum(key: str) -> float:
        values = np.asarray([m[key] for m in gathered], np.float64)
        return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")

    return LearnerMetrics(
        policy_version=metrics.policy_version,
        loss=float(sum(m["loss"] for m in gathered)),  # each rank's share of the window objectives (divided by every rank's N)
        grad_norm=metrics.grad_norm,  # already the global norm (clip_grad_norm over DTensor shards)
        clip_fraction=mean("clip_fraction"),
        ratio_mean=mean("ratio_mean"),
        ratio_max_abs_dev=maximum("ratio_max_abs_dev"),
        first_ratio_max_abs_dev=maximum("first_ratio_max_abs_dev"),
        optimizer_steps=metrics.optimizer_steps,
        samples=int(weights.sum()),
        seconds=maximum("seconds"),
        extras={key: mean(key, extras=True) for key in metrics.extras},
    )
