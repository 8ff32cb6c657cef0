"""Dry runs at real size on fake tensors: one rollout step and one learner step, measured by PyTorch itself.

Everything runs inside ``FakeTensorMode``: every tensor has its true shape, dtype and device and no data,
so shape, dtype and device errors of the real sizes surface here and nothing is computed. Memory is
measured by ``torch.distributed._tools``' trackers (``MemTracker`` for a rollout worker,
``FSDPMemTracker`` for a learner rank, whose network is FSDP2-sharded over a fake process group of
``learner.num_ranks`` ranks exactly as :func:`raygrpo.learner.learner.prepare_network` shards it);
FLOPs by ``torch.utils.flop_counter.FlopCounterMode`` (without its per-module hooks: :func:`flop_counter`).

Attention is measured as a GPU runs it: under fake tensors on the CPU, ``scaled_dot_product_attention``
dispatches to PyTorch's fused CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``), which,
like the GPU's flash and memory-efficient kernels, keeps the output and the log-sum-exp for the backward
and never the sequence x sequence matrix (checked on every preset: FLUX, SD3, HunyuanVideo's masked
text attention, Wan's self and cross attention).

**Rollout step** (per worker): encode one group's prompt (each encoder on its true token count), one
denoising step of one micro-batch (the adapter's ``velocity``, CFG batched, and the sampler's
transition with its log-probability), and the group's VAE decode (images: the whole group at once;
videos: one, as the adapters decode). **Learner step** (per rank): one loss term's forward and
backward through the adapter (DanceGRPO: one member at one timestep; DGPO: one micro-batch of a group,
after the reference's no-gradient forward), with gradient sync as the learner sets it for a term that
is not the window's last, then the AdamW step (its states stay for the next window).

Depth. The planner runs every block. Extrapolating from networks of 1-2 blocks was tried and is not
exact: a learner rank's peak comes in the backward, where FSDP2 holds the previous unit's reduce-scatter
input and prefetches the next unit's gather while saved activations are freed block by block, so which
transients meet at the peak changes with the depth. ``depth="shallow"`` (one layer of each kind in every
component: network, encoders, VAE) is for the dry-run test: real widths, lengths and batch sizes, so the
same shape, dtype and device errors, but not the model's numbers.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from raygrpo.algorithms import rollout_spec
from raygrpo.algorithms.dancegrpo import clipped_surrogate
from raygrpo.algorithms.dcpo import diffusion_dpo_loss
from raygrpo.algorithms.diffusionnft import nft_policy_loss, reward_weight
from raygrpo.algorithms.dgpo import denoising_loss, group_gate_logit
from raygrpo.config import Config, DGPOConfig, DiffusionDPOConfig, DiffusionNFTConfig
from raygrpo.contracts import ConditioningBatch
from raygrpo.learner.ema import ParameterShadow
from raygrpo.learner.fsdp import transformer_blocks
from raygrpo.plan.architecture import Architecture, ArchitectureError, shallow
from raygrpo.plan.students import each_forward, fake_window, held_tensors, is_student, stand_in_decoder, train_window, window_groups_of
from raygrpo.plan.fake import build_components, conditioning, decode_input_shape, encoders, fake_adapter
from raygrpo.sampling import grid_steps, make_ode_solver


@dataclass
class Phase:
    """Peak memory of one phase, by category at the peak (the trackers' names), and its FLOPs."""

    peak: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)
    flops: int = 0
    transient: int = 0  # the peak less the weights (MemTracker's Parameter and Buffer): what the phase adds



@dataclass
class RolloutMeasure:
    """One rollout worker: what it holds, and each phase of one group."""

    params: dict[str, int]  # component -> bytes of its weights on the GPU
    encode: Phase  # one group's prompt (and image) through the encoders
    step: Phase  # one denoising step of one micro-batch
    decode: Phase  # one decode call (images: the group; videos: one)
    latent_bytes: int  # one sample's float32 latent
    conditioning_bytes: int  # one group's conditioning, sent once per group


@dataclass
class LearnerMeasure:
    """One learner rank: the peak of one loss term's forward+backward with the optimizer states held."""

    term: Phase  # forward + backward of one loss term (FSDPMemTracker categories at its peak; DGPO: after one reference forward;
    # RG-LCD / Diff-Instruct*: the rank's whole window, every term of the step: raygrpo/plan/students.py)
    optimizer_bytes: int  # AdamW states of this rank's shards
    shadow_bytes: int  # the algorithm's ParameterShadows of the trainable shards: EMAs, frozen copies, Diff-Instruct*'s fake score
    no_grad_flops: int  # DGPO / NFT / DPO: one no-gradient forward of the term's rows; students: all of the window's (teacher,
    # target, fake score); counted in term.flops too (0 for DanceGRPO)
    largest_unit_bytes: int  # the largest FSDP unit's whole float32 parameters (what loading moves to the GPU at once)
    held_bytes: dict[str, int] = field(default_factory=dict)  # part -> bytes kept across steps besides shards, AdamW states and
    # shadows (students: the fake score's AdamW states, the pixel reward's float32 VAE)


def _quiet():
    # FSDP2 warns about view outputs of the wrapped blocks and diffusers about casts: noise for a dry run.
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("ignore")
    return context


def _snapshot_total(snapshot: dict) -> tuple[int, dict[str, int]]:
    total, parts = 0, {}
    for per_device in snapshot.values():
        for key, value in per_device.items():
            name = getattr(key, "value", str(key))
            if name == "Total":
                total += value
            elif value:
                parts[name] = parts.get(name, 0) + value
    return total, parts


def peak_only(tracker_class: type) -> type:
    """``tracker_class`` (MemTracker or FSDPMemTracker) keeping the device-wide peak only.

    The trackers also keep every module's own peak, walking all tracked modules on every operator and
    copying a snapshot at each new local peak: most of a dry run's time, and the planner reads only the
    device-wide peak (the same number, the same categories).
    """

    class PeakOnly(tracker_class):
        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    PeakOnly.__name__ = f"PeakOnly{tracker_class.__name__}"
    return PeakOnly


def _inference_tracker() -> type:
    from torch.distributed._tools.mem_tracker import MemTracker

    class InferenceTracker(peak_only(MemTracker)):
        """No per-module statistics at all: the weights are registered up front (``track_external``), and the
        video VAEs call their modules once per tile or frame chunk, which those statistics refuse."""

        def _pre_fw_hook(self, module, inputs) -> None:
            pass

        def _post_fw_hook(self, module, inputs, outputs) -> None:
            pass

    return InferenceTracker


class _Global:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to the total, none to a module."""

    parents = frozenset({"Global"})

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc) -> None:
        pass


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` counting the total only, which is all the planner reads.

    Why not the stock one: its per-module attribution (``torch.utils.module_tracker.ModuleTracker``)
    registers gradient hooks on every module's inputs and outputs in each module's forward, also
    when activation checkpointing re-runs a block's forward inside the backward. Those hooks never
    fire, and they keep each recomputed block's activations alive to the end of the backward
    (pytorch/pytorch#139214). Under the memory tracker that looked like gradient checkpointing
    saving almost nothing (FLUX at 720 px: 14 GiB of "activations" with it on, a leak of about
    0.26 GiB per block, where a GPU run holds the blocks' inputs and one block's recompute). The
    counts are the same without the attribution (same dispatch mode, same FLOP formulas).
    """
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Global()
    return counter


@contextmanager
def _measured(tracker, phase: Phase, track: bool, flops: bool = True) -> Iterator[None]:
    """Run the block under ``tracker`` and (``flops``) a FLOP counter, and record both into ``phase``."""
    if not track:
        yield
        return
    counter = flop_counter() if flops else nullcontext()
    with tracker, counter:
        yield
    phase.peak, phase.breakdown = _snapshot_total(tracker.get_tracker_snapshot("peak"))
    phase.flops = counter.get_total_flops() if flops else 0
    phase.transient = phase.peak - phase.breakdown.get("Parameter", 0) - phase.breakdown.get("Buffer", 0)


def _nbytes(tensors) -> int:
    """Bytes of tensors' local data (a DTensor's own shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


# ------------------------------------------------------------------------------------------------ rollout
def rollout_step(config: Config, arch: Architecture, track: bool = True, media: bool = True) -> RolloutMeasure:
    """One rollout worker's encode, one denoising step and decode at the config's sizes, on fake tensors.

    ``media=False`` skips the encoders and the VAE (the dry-run test skips the slow video VAEs)."""
    _InferenceTracker = _inference_tracker()
    spec = rollout_spec(config)
    micro = min(config.rollout.micro_batch_size, config.algorithm.group_size)
    group = config.algorithm.group_size
    quiet = _quiet()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            components = build_components(config, arch, "rollout")
        adapter = fake_adapter(config, arch, components)
        if arch.family == "hunyuan_video":
            adapter.vae.enable_tiling()  # as HunyuanVideoModel.from_pretrained (vae_tiling=True)
        sigmas = adapter.sigma_grid(spec.sampler, config.rollout.num_steps, config.rollout.shift)  # [T+1], real
        solver = None if spec.record_trajectory else make_ode_solver(spec.sampler, sigmas)
        steps = grid_steps(spec.sampler, spec.noise_level, sigmas) if spec.record_trajectory else None
        cond = conditioning(config, arch, adapter)
        phases = {name: Phase() for name in ("encode", "step", "decode")}

        def tracker():
            t = _InferenceTracker()
            t.track_external(*components.values())  # the weights, registered up front
            return t

        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            if media:
                with _measured(tracker(), phases["encode"], track):
                    _encode(config, arch, adapter, components)
            with _measured(tracker(), phases["step"], track):
                x = adapter.initial_noise(None, micro)  # [m, ...]
                batch = ConditioningBatch.of(cond, micro)
                v = adapter.velocity(x, sigmas[0].expand(micro), batch)  # [m, ...]
                if solver is not None:
                    solver.step(x, v, 0)
                else:
                    step = steps.transition(x, v, 0)
                    step.log_prob(step.sample(None))  # [m]
            if media:
                with _measured(tracker(), phases["decode"], track):
                    adapter.vae.decode(torch.zeros(decode_input_shape(adapter, group), dtype=adapter.vae.dtype), return_dict=False)
    finally:
        quiet.__exit__(None, None, None)
    latent = math.prod(adapter.latent_shape) * 4
    params = {name: _nbytes(module.parameters()) + _nbytes(module.buffers()) for name, module in components.items()}
    return RolloutMeasure(params, phases["encode"], phases["step"], phases["decode"], latent, cond.nbytes)


def _encode(config: Config, arch: Architecture, adapter, components) -> None:
    """Each encoder's forward on one group's input (and the VAE encode of Wan's conditioning video or Kontext's reference)."""
    for enc in encoders(config, arch):
        module = components[enc.component]
        if enc.image_size:
            module(pixel_values=torch.zeros(1, 3, enc.image_size, enc.image_size, dtype=module.dtype), output_hidden_states=True)
        else:
            module(torch.zeros(1, enc.tokens, dtype=torch.long), output_hidden_states=True)
    if arch.family == "wan_i2v":
        # WanImageToVideoPipeline.prepare_latents encodes the first frame followed by F - 1 black frames.
        video = torch.zeros(1, 3, adapter.num_frames, adapter.height, adapter.width, dtype=adapter.vae.dtype)
        adapter.vae.encode(video).latent_dist.mode()
    if arch.family == "flux_kontext":  # the reference image, resized to the output size
        adapter.vae.encode(torch.zeros(1, 3, adapter.height, adapter.width, dtype=adapter.vae.dtype)).latent_dist.mode()
    if arch.family == "qwen_image_edit":  # the reference image at the output's pixel count, one frame of the 3-D VAE
        adapter.vae.encode(torch.zeros(1, 3, 1, adapter.height, adapter.width, dtype=adapter.vae.dtype)).latent_dist.mode()


# ------------------------------------------------------------------------------------------------ learner
@contextmanager
def fake_process_group(world_size: int):
    """A fake torch.distributed group of ``world_size`` ranks (this process is rank 0) and a CPU mesh over it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if torch.distributed.is_initialized():
        raise RuntimeError("a dry run needs its own fake process group, but torch.distributed is already initialised here")
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        torch.distributed.destroy_process_group()


def _learner_step_apart(config: Config, arch: Architecture, **kwargs) -> LearnerMeasure:
    """:func:`learner_step` here, or in a fresh child process when this one already belongs to a process group
    (a learner alone in its process joins a one-rank group for bf16 or a GPU): the dry run needs a fake
    process group of its own, and a process has one default group at a time."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return learner_step(config, arch, **kwargs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(learner_step, config, arch, **kwargs).result()


def _learner(config: Config, arch: Architecture, track: bool, memory_only: bool = False, whole_step: bool = True) -> LearnerMeasure:
    """A learner rank's measurement: :func:`learner_step`, or for a student method :func:`student_learner` (without
    ``whole_step``, the shallow dry run: its one-group window alone)."""
    if is_student(config) and whole_step:
        return student_learner(config, arch, track=track, memory_only=memory_only)
    return _learner_step_apart(config, arch, track=track, memory_only=memory_only)


def student_learner(config: Config, arch: Architecture, track: bool = True, memory_only: bool = False) -> LearnerMeasure:
    """A student method's rank over its whole step of G groups, from windows of one and two groups.

    A window's every group runs the same forwards and backwards, so the step's FLOPs are G times one group's
    window, exactly. Its memory grows with G where the window holds something of every group at once
    (Diff-Instruct*'s fake-score DSM keeps every group's graph until its one backward; the teacher's, target's
    and reference's outputs wait for every group's term; the latent reward model's fit): the peak and each of its
    categories are extrapolated linearly from the two windows, ``m(G) = m(1) + (G - 1) (m(2) - m(1))``. Exact
    while the same phase holds the peak at one, two and G groups; where it moves from one phase to another
    between one group and two, the slope measured is below the growing phase's and the plan low. The step's own
    G is not run: at real sizes a group costs tens of seconds of CPU (every forward on fake tensors under the
    memory tracker)."""
    groups = window_groups_of(config)
    one = _learner_step_apart(config, arch, track=track, memory_only=memory_only, window_groups=1)
    if groups == 1:
        return one
    two = _learner_step_apart(config, arch, track=track, memory_only=True, window_groups=2).term

    def grow(a: int, b: int) -> int:
        return max(0, a + (groups - 1) * (b - a))

    parts = {k: grow(one.term.breakdown.get(k, 0), two.breakdown.get(k, 0)) for k in one.term.breakdown | two.breakdown}
    term = Phase(grow(one.term.peak, two.peak), parts, one.term.flops * groups, grow(one.term.transient, two.transient))
    return replace(one, term=term, no_grad_flops=one.no_grad_flops * groups)


def learner_step(
    config: Config, arch: Architecture, track: bool = True, memory_only: bool = False, window_groups: int = 1
) -> LearnerMeasure:
    """One loss term's forward+backward and the optimizer step of one learner rank, sharded as the learner shards.

    ``memory_only``: the term's memory alone, without FLOPs and without the optimizer step (``optimizer_bytes``
    0), for a comparison run whose other numbers are the configured run's. RG-LCD / Diff-Instruct*: the "term" is
    a whole window of ``window_groups`` groups (:func:`student_learner` extrapolates to the step's)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from raygrpo.algorithms import make_algorithm
    from raygrpo.learner.learner import prepare_network

    quiet = _quiet()
    threads = torch.get_num_threads()
    try:
        with fake_process_group(config.learner.num_ranks) as mesh:
            fake = FakeTensorMode(allow_non_fake_inputs=True)
            with fake:
                components = build_components(config, arch, "learner")
            network = components[arch.network]
            largest = max([_nbytes(b.parameters()) for b in transformer_blocks(network)] or [_nbytes(network.parameters())])
            # Outside the fake mode: the adapter's scheduler tables and the sampler's step coefficients are real.
            adapter = fake_adapter(config, arch, components)
            spec = rollout_spec(config)
            sigmas = adapter.sigma_grid(spec.sampler, config.rollout.num_steps, config.rollout.shift)  # [T+1]
            steps = grid_steps(spec.sampler, spec.noise_level, sigmas) if spec.record_trajectory else None
            with fake, _adapters_stay_put():
                prepare_network(network, config, shard=True, mesh=mesh)
            with fake:
                parameters = [p for p in network.parameters() if p.requires_grad]
                opt = config.optimizer
                optimizer = torch.optim.AdamW(parameters, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
            # Outside the mode: setup may read the adapter's real scheduler tables (a VP model's grid); copies it makes
            # of the fake parameters are fake all the same (a fake tensor dispatches to its own mode).
            algorithm = make_algorithm(config)
            with stand_in_decoder(arch, fake):  # a pixel reward's VAE decoder, built fake
                algorithm.setup(adapter, parameters, lora=config.model.lora is not None)
            # Outside the mode: the draws and the window's arrays are real (raygrpo/plan/students.py).
            window = fake_window(config, arch, algorithm, adapter, window_groups) if is_student(config) else None
            with fake:
                shadows = [s for s in vars(algorithm).values() if isinstance(s, ParameterShadow)]  # EMAs, frozen copies, fake score
                held = {part: _nbytes(tensors) for part, tensors in held_tensors(algorithm).items()} if window else {}
                term = Phase()
                network.set_requires_gradient_sync(config.learner.reduce_every_backward)  # a term that is not the window's last
                tracker = peak_only(FSDPMemTracker)(network, optimizer) if track else None
                # FSDPMemTracker takes one forward per iteration: DGPO's reference (NFT's old policy) forward comes first.
                reset = tracker.reset_mod_stats if tracker is not None else lambda: None
                with _measured(tracker, term, track, flops=not memory_only):
                    if window:  # a student's whole window: every term of its step
                        no_grad_flops = _student_window(algorithm, adapter, window, reset, track and not memory_only)
                    else:
                        loss, no_grad_flops = _loss_term(config, arch, adapter, sigmas, steps, track and not memory_only, reset)
                        loss.backward()
                optimizer_bytes = 0 if memory_only else _optimizer_state_bytes(optimizer, parameters)
    finally:
        torch.set_num_threads(threads)
        quiet.__exit__(None, None, None)
    shadow_bytes = sum(_nbytes(s.values) for s in shadows)
    return LearnerMeasure(term, optimizer_bytes, shadow_bytes, no_grad_flops, largest_unit_bytes=largest, held_bytes=held)


def _student_window(algorithm, adapter, window: tuple, reset, track: bool) -> int:
    """A student method's window (raygrpo/plan/students.py) inside the learner's measured block: the memory tracker's
    module statistics reset before each network forward; returns the FLOPs of the forwards without gradients."""
    no_grad = _NoGradFlops(track)
    with each_forward(adapter, reset, no_grad), _adapters_stay_put():
        train_window(algorithm, adapter, *window)
    return no_grad.flops


class _NoGradFlops:
    """Runs a forward without gradients under a FLOP counter of its own (nested in the step's, which counts it
    too) and sums what it counted: a student window's teacher / reference, target and fake score forwards."""

    def __init__(self, track: bool):
        self.track, self.flops = track, 0

    def __call__(self, forward):
        if not self.track:
            return forward()
        counter = flop_counter()
        with counter:
            out = forward()
        self.flops += counter.get_total_flops()
        return out


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter]) -> int:
    """Bytes of the states ``optimizer`` keeps for this rank's shards after its first step (call in the fake mode)."""
    for p in parameters:
        # A term that is not the window's last leaves the shards' gradients to the final sync: give
        # each shard one, so that AdamW makes the states it keeps from the first optimizer step on.
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return _nbytes(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim())


@contextmanager
def _adapters_stay_put() -> Iterator[None]:
    """Let peft attach LoRA layers to a fake network: it moves each new layer to its base layer's device with
    ``Module.to``, and ``Module.to`` swaps every fake parameter for a converted one, which torch refuses for
    fake tensors. Built inside the fake mode, the layers are on that device and in that dtype already, so a
    swap that would change nothing keeps the parameter as it is."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensor

    swap = torch.utils.swap_tensors

    def swap_unless_same(t1, t2):
        if isinstance(t1, FakeTensor) and (t1.shape, t1.dtype, t1.device) == (t2.shape, t2.dtype, t2.device):
            return None
        return swap(t1, t2)

    with mock.patch("torch.utils.swap_tensors", swap_unless_same):
        yield


def _loss_term(config: Config, arch: Architecture, adapter, sigmas, steps, track: bool, between=None) -> tuple[torch.Tensor, int]:
    """One loss term of the configured algorithm on zeros, as the algorithm computes it (raygrpo/algorithms/),
    and the FLOPs of the no-gradient forward it needs first (DGPO's reference, DiffusionNFT's old policy). ``steps``:
    the sampler's step coefficients (GRPO), built outside the fake mode like ``sigmas``; ``between``: called between
    that no-gradient forward and the policy's forward."""
    algo = config.algorithm
    cond = conditioning(config, arch, adapter)
    if isinstance(algo, DiffusionDPOConfig):  # DCPO too: one pair (x^w, x^l) per term, the reference's forward first
        x_t = torch.zeros(2, *adapter.latent_shape)  # [2, ...]
        sigma = sigmas[0].expand(2)
        batch = ConditioningBatch.of(cond, 2)  # two captions of one length: the prompt's conditioning stands for both
        counter = flop_counter()
        with torch.no_grad(), counter if track else nullcontext():
            v_ref = adapter.velocity(x_t, sigma, batch)  # [2, ...]
        if between is not None:
            between()
        v = adapter.velocity(x_t, sigma, batch)  # [2, ...] with gradients
        err, ref = denoising_loss(v, x_t), denoising_loss(v_ref, x_t)  # [2] each
        return diffusion_dpo_loss(err[:1], err[1:], ref[:1], ref[1:], algo.beta).sum(), counter.get_total_flops() if track else 0
    if isinstance(algo, DGPOConfig | DiffusionNFTConfig):
        members = algo.best_of_n or algo.group_size
        rows = min(algo.micro_batch_size or members, members)
        x0 = torch.zeros(rows, *adapter.latent_shape)  # [b, ...]
        eps = torch.zeros(1, *adapter.latent_shape).expand_as(x0)  # [b, ...] one noise per group
        sigma = sigmas[0]
        x_t, target = (1 - sigma) * x0 + sigma * eps, eps - x0  # [b, ...]
        batch = ConditioningBatch.of(cond, rows)
        counter = flop_counter()
        with torch.no_grad(), counter if track else nullcontext():
            v_ref = adapter.velocity(x_t, sigma.expand(rows), batch)  # [b, ...] the reference (and v_base) / v_old, no gradient
        if between is not None:
            between()
        v = adapter.velocity(x_t, sigma.expand(rows), batch)  # [b, ...] with gradients
        if isinstance(algo, DiffusionNFTConfig):
            r = reward_weight(torch.zeros(rows), algo.adv_clip_max)  # [b]
            policy = nft_policy_loss(v, v_ref, x_t, x0, sigma.expand(rows), r, algo.beta, algo.adv_clip_max)  # [b]
            kl = ((v - v_ref) ** 2).flatten(1).mean(dim=1)  # [b]
            term = (policy + algo.kl_beta * kl).sum() / config.trained_timesteps
            return term, counter.get_total_flops() if track else 0
        loss = denoising_loss(v, target)  # [b]
        advantages = torch.zeros(rows)  # [b]
        gate = torch.sigmoid(group_gate_logit(advantages, loss, denoising_loss(v_ref, target), algo.beta))
        kl = ((v - v_ref) ** 2).flatten(1).mean(dim=1)  # [b]
        term = ((gate * advantages * loss).sum() + algo.kl_beta * kl.sum()) / algo.num_train_timesteps
        return term, counter.get_total_flops() if track else 0
    if steps is None:  # an ODE rollout the branches above do not model: an algorithm the planner does not know yet
        raise ArchitectureError(
            f"the planner does not model the {algo.name!r} learner yet (its loss terms, extra networks and forwards); "
            "a run starts without a plan (or pass --skip-plan)"
        )
    x = torch.zeros(1, *adapter.latent_shape)  # [1, ...] x_j of one member
    v = adapter.velocity(x, sigmas[0].reshape(1), ConditioningBatch.of(cond, 1))  # [1, ...]
    step = steps.transition(x, v, 0)
    ratio = torch.exp(step.log_prob(torch.zeros_like(x)))  # [1]; the recorded old log-prob is a constant
    advantages = torch.zeros(len(config.rewards))  # [K]
    surrogate = clipped_surrogate(ratio.expand_as(advantages), advantages, algo.clip_range)  # [K]
    return surrogate.sum() / max(config.trained_timesteps, 1), 0


# ------------------------------------------------------------------------------------------------ depth
@dataclass
class Measurements:
    """A config's rollout worker and learner rank; :meth:`to_json` / :meth:`from_json` for the plan cache."""

    rollout: RolloutMeasure
    learner: dict[bool, LearnerMeasure]  # by gradient checkpointing: the config's setting, and the other when compared
    depth: str  # what was run, for the report

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"learner": [[gc, asdict(m)] for gc, m in self.learner.items()]})

    @classmethod
    def from_json(cls, text: str) -> Measurements:
        data = json.loads(text)
        r = data["rollout"]
        rollout = RolloutMeasure(**r | {name: Phase(**r[name]) for name in ("encode", "step", "decode")})
        learner = {gc: LearnerMeasure(**m | {"term": Phase(**m["term"])}) for gc, m in data["learner"]}
        return cls(rollout, learner, data["depth"])


def measure(
    config: Config, arch: Architecture, depth: str = "full", track: bool = True, media: bool = True, compare: bool = True
) -> Measurements:
    """Dry-run ``config`` at its true size: every block (``"full"``, what the planner reports), or one layer of
    each kind in every component (``"shallow"``, :func:`~raygrpo.plan.architecture.shallow`: the same widths,
    sequence lengths and batch sizes, so the same shape, dtype and device errors, in a fraction of the time; its
    memory and FLOPs are not the model's).

    ``compare`` (full depth): also the learner's peak with gradient checkpointing switched the other way (its
    memory only: the optimizer's states do not depend on it, and the FLOPs reported are the configured run's)."""
    if depth == "shallow":
        arch = shallow(arch)
    blocks = arch.blocks()
    rollout = rollout_step(config, arch, track=track, media=media)
    gc = config.learner.gradient_checkpointing
    learner = {gc: _learner(config, arch, track=track, whole_step=depth == "full")}
    if depth == "full" and compare:
        other = _learner(_with_checkpointing(config, not gc), arch, track=track, memory_only=True)
        learner[not gc] = replace(other, optimizer_bytes=learner[gc].optimizer_bytes)
    names = _BLOCK_NAMES | ({"num_layers": "double-stream blocks"} if "num_single_layers" in blocks else {})
    what = ", ".join(f"{n} {names.get(k, k)}" for k, n in arch.blocks().items()) or "whole network"
    return Measurements(rollout, learner, what)


_BLOCK_NAMES = {
    "num_layers": "blocks",
    "num_single_layers": "single-stream blocks",
    "dual_attention_blocks": "dual-attention blocks",
    "joint_blocks": "joint blocks",
}


def _with_checkpointing(config: Config, on: bool) -> Config:
    return config.model_copy(update={"learner": config.learner.model_copy(update={"gradient_checkpointing": on})})
