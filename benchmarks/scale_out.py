"""Scale-out benchmarks (issue #4, item 8): each raygrpo stage against a bare baseline measured in the same run.

    python benchmarks/scale_out.py                        # all four parts, tiny FLUX on CPU, 3-7 minutes on 2 cores
    python benchmarks/scale_out.py --only a,b --repeats 7
    python benchmarks/scale_out.py --realistic --device cuda --only a,b     # FLUX.1 widths at 512x512 (untested on GPU)
    python benchmarks/scale_out.py --realistic --width 256 --layers 1,1 --text-width 256 --vae-width 32 --resolution 256 \
        --only b --presets dancegrpo                                        # a mid-size learner step on CPU (12-13 min on 2 cores)

(a) rollout: ``RolloutWorker.generate`` in process, images/s, against a bare ``FluxPipeline`` loop on
    the same folder, steps, group size and micro-batch (the pipeline gets the prompt embeddings once,
    as the worker caches them). Once for the ODE sampler (DGPO preset, DPM-Solver++ 2M, no recording)
    and once for the Dance-SDE with trajectory and log-probs (DanceGRPO preset).
(b) learner: ``Learner.update`` in process on TrainGroups built from real rollouts, seconds per
    update, against a bare loop on a copy of the same network: the same forwards with gradient (same
    samples x trained timesteps, same batch shapes), a backward each, AdamW steps as often as the
    algorithm steps. DanceGRPO's baseline has no log-probs and no surrogate clipping (it clips the gradient norm
    before AdamW, as the learner and the released scripts do); DGPO's does DGPO's whole
    math in plain PyTorch (``bare_dgpo_step``: the no-gradient reference/base forwards, gate, clip, KL,
    gradient clipping, AdamW, EMA updates) with its shadows as separate modules; like the learner, it draws
    each step's noise levels and noises and forms x_t and the targets inside the timed step. Each figure's
    ``time_split_s`` says where both sides' seconds go (forwards, backwards, optimizer, the rest); ``own_work_s``
    times both sides again with each network's forward replaced by one multiply, so that what each side does besides
    the network is measured without the network's run-to-run swings (``excess_of_step``: raygrpo's extra, as a
    share of the baseline's fastest step).
(c) end to end: the real Controller on Ray (tiny DanceGRPO preset, 2 rollout workers) at
    ``train.max_staleness`` 0 and 1, samples/s per step (step 1 and the last max_staleness steps skipped),
    against the serial sum of the stages read from metrics.jsonl: rollout busy s / workers + reward s /
    replicas + learner s + sync s; and staleness 1 against 0.
(d) weight sync: what ``WeightSync.push`` does (learner rank 0 puts its message, every rollout worker
    copies it into its parameters and verifies the digest), against the honest floor: one actor returns
    numpy arrays of the same shapes (a put), as many actors receive them (a get) and copy each once into
    a tensor of its shape. The raw transfer (put and get alone) is reported beside it. On the tiny FLUX
    and on a wider one (``--sync-width``, 2 + 4 blocks: 512 is 145 MB, 1408 is 1.09 GB) whose bytes dominate;
    the wider one is built in the same actors' processes (no second round of actor starts), after a warm-up call.

Ratios are ``value / baseline`` (above 1: more images/s, or more seconds, than the baseline). Sides
alternate repeat by repeat so both see the same machine load; medians are reported. Results go to
outputs/benchmarks/scale_out.json (untracked; override with --out). ``make figures`` runs it for the README.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray socket on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the cluster started here is local to this script
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from raygrpo.algorithms.advantages import group_advantages
from raygrpo.config import Config, load_config
from raygrpo.contracts import PromptGroup, Rollout, TrainGroup
from raygrpo.models import resolve_pretrained

logger = logging.getLogger("scale_out")
PRESETS = {"dancegrpo": "cluster/tiny.yaml", "dgpo": "cluster/tiny_dgpo.yaml"}
PARTS = ("a", "b", "c", "d")
# --smoke: the smallest sizes that still exercise every code path (tests/test_benchmarks_smoke.py).
SMOKE = {
    "common": ["algorithm.group_size=2", "model.max_sequence_length=8"],
    "dancegrpo": ["rollout.num_steps=3", "algorithm.grad_accum_samples=4"],
    "dgpo": ["rollout.num_steps=3", "algorithm.trunc_steps=2", "algorithm.num_train_timesteps=2", "rollout.micro_batch_size=2"],
}


@dataclass(frozen=True)
class Realistic:
    """A FLUX.1-architecture transformer at FLUX.1's widths with fewer blocks (19 + 38 is too big to build here).

    FLUX.1-dev: hidden 3072 = 24 heads x 128, RoPE axes (16, 56, 56), 64 input channels (16 latent x 2x2),
    text width 4096 (T5-XXL), pooled width 768 (CLIP-L), guidance embedding; VAE 128/256/512/512 channels.
    The text encoders have the real output widths but one layer: prompts are encoded once per text.
    """

    width: int = 3072
    double_blocks: int = 2
    single_blocks: int = 4
    text_width: int = 4096
    vae_width: int = 128
    resolution: int = 512
    max_sequence_length: int = 512

    @property
    def pooled_width(self) -> int:
        return max(32, self.text_width * 3 // 16)  # 768 for T5-XXL's 4096

    def folder_name(self) -> str:
        return f"bench-flux-w{self.width}-d{self.double_blocks}-s{self.single_blocks}-t{self.text_width}-v{self.vae_width}"


def build_realistic_flux(folder: Path, size: Realistic, device: str) -> Path:
    """A random FLUX pipeline of ``size`` saved with save_pretrained (bf16 on cuda), so raygrpo loads it the ordinary way."""
    if (folder / "model_index.json").is_file():
        return folder
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from raygrpo.models.tiny import build_clip_tokenizer, build_t5_tokenizer

    if size.width % 128:
        raise SystemExit(f"--width {size.width}: FLUX heads are 128 wide, so the width must be a multiple of 128")
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(0)
    v = size.vae_width
    with torch.device(device):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=size.double_blocks, num_single_layers=size.single_blocks,
            attention_head_dim=128, num_attention_heads=size.width // 128, joint_attention_dim=size.text_width,
            pooled_projection_dim=size.pooled_width, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(v, 2 * v, 4 * v, 4 * v), layers_per_block=2, latent_channels=16, norm_num_groups=min(32, v),
            sample_size=size.resolution, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=size.pooled_width, intermediate_size=4 * size.pooled_width, num_hidden_layers=1,
                num_attention_heads=max(1, size.pooled_width // 64), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2), d_model=size.text_width, d_kv=64, d_ff=size.text_width * 5 // 2, num_layers=1,
                num_heads=max(1, size.text_width // 64), feed_forward_proj="gated-gelu", pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id, decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )  # fmt: skip
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    if device == "cuda":
        pipeline.to(torch.bfloat16)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    pipeline.save_pretrained(tmp, safe_serialization=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process published it first
        if not (folder / "model_index.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------- settings


def make_config(preset: str, args: argparse.Namespace, *extra: str) -> Config:
    """The tiny preset, or the realistic model, with this run's overrides; nothing is checkpointed or logged to TensorBoard."""
    overrides = [f"run.output_root={args.work}", "logging.sample_every=0", "logging.tensorboard=false", "train.checkpoint_every=0"]
    if args.smoke:
        overrides += SMOKE["common"] + SMOKE[preset]
    if args.realistic:
        size, gpu = args.size, int(args.device == "cuda")
        overrides += [
            f"model.pretrained={args.model_folder}", f"model.height={size.resolution}", f"model.width={size.resolution}",
            f"model.max_sequence_length={min(size.max_sequence_length, 8 if args.smoke else 512)}",
            f"model.dtype={'bfloat16' if gpu else 'float32'}", f"rollout.num_gpus={gpu}", f"learner.num_gpus={gpu}",
        ]  # fmt: skip
        if not args.smoke:
            # The papers' FLUX rollouts: DanceGRPO 16 SDE steps, DGPO 10 DPM-Solver++ steps (the tiny presets' DGPO value).
            overrides += ["rollout.num_steps=16"] if preset == "dancegrpo" else []
    if args.micro_batch:
        overrides.append(f"rollout.micro_batch_size={args.micro_batch}")
    return load_config(ROOT / PRESETS[preset], [*overrides, *extra])


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def alternate(
    system: Callable[[int], None],
    baseline: Callable[[int], None],
    repeats: int,
    device: str,
    *more: Callable[[int], None],
    cpu: list[list[float]] | None = None,
) -> tuple:
    """Seconds of ``repeats`` calls of each (``more``: further baselines), alternating (same load for all), after one
    warm-up call of each; one list per function, in their order. ``cpu`` (an empty list) receives the same per
    function in CPU seconds of this process (every thread counted): on a shared machine far less disturbed by
    other load than wall time, and equal to it for one busy thread on an idle one."""
    functions = (system, baseline, *more)
    times: tuple[list, ...] = tuple([] for _ in functions)
    if cpu is not None:
        cpu.extend([] for _ in functions)
    for r in range(-1, repeats):
        for side, fn in enumerate(functions):
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn(r + 1)
            sync(device)
            if r >= 0:
                times[side].append(time.perf_counter() - start)
                if cpu is not None:
                    cpu[side].append(time.process_time() - cpu_start)
    return times


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def figure(
    what: str, unit: str, values: list[float], baseline: list[float], baseline_what: str, paired: bool = True, **details
) -> dict:
    """``ratio``: the medians' ratio. ``paired`` (the two lists' entries measured side by side: a repeat's two sides back
    to back, or one step's rate and its stages): also ``paired_ratio``, the median of the entries' own ratios, which a
    host whose speed drifts from repeat to repeat (a shared VM: up to 40% here) moves less than the medians."""
    value, base = statistics.median(values), statistics.median(baseline)
    out = {
        "what": what, "unit": unit, "value": value, "baseline": base, "ratio": value / base, "baseline_what": baseline_what,
        "values": values, "baseline_values": baseline,
    }  # fmt: skip
    if paired:
        out["paired_ratio"] = statistics.median(v / b for v, b in zip(values, baseline, strict=True))
    return out | details


def cpu_figures(cpu: list[list[float]], per_call: bool) -> dict:
    """The figure's ratio in CPU seconds of this process (``alternate(cpu=...)``, system and baseline): ``cpu_ratio``
    of the medians, oriented as the figure's ratio (``per_call``: a rate, calls per CPU second, so baseline / system
    seconds), and ``cpu_ratios`` repeat by repeat (both sides of one repeat ran back to back)."""
    system, baseline = cpu[0], cpu[1]
    ratios = [(b / s) if per_call else (s / b) for s, b in zip(system, baseline)]
    median = statistics.median(system) / statistics.median(baseline)
    return {"cpu_s": system, "cpu_baseline_s": baseline, "cpu_ratio": 1 / median if per_call else median, "cpu_ratios": ratios}


# ------------------------------------------------------------------------------------- (a) rollout


def bench_rollout(preset: str, args: argparse.Namespace) -> dict:
    from diffusers import FluxPipeline

    from raygrpo.rollout.worker import RolloutWorker

    config = make_config(preset, args)
    worker = RolloutWorker(config)
    dtype = worker.model.dtype
    pipe = FluxPipeline.from_pretrained(resolve_pretrained(config.model.pretrained), dtype=dtype).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    torch.set_num_threads(args.threads)  # both sides alike (the worker set its own from rollout.num_cpus)
    g, micro, steps, m = config.algorithm.group_size, config.rollout.micro_batch_size, config.rollout.num_steps, config.model
    prompt = config.data.prompts[0]
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=args.device, max_sequence_length=m.max_sequence_length)

    def system(r: int) -> None:
        worker.generate(PromptGroup(r, 0, prompt, g, seed=r, policy_version=0))

    def baseline(r: int) -> None:
        generator = torch.Generator().manual_seed(r)
        for lo in range(0, g, micro):
            pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=min(micro, g - lo), num_inference_steps=steps,
                 height=m.height, width=m.width, guidance_scale=m.guidance_scale, generator=generator, output_type="np")  # fmt: skip

    cpu: list[list[float]] = []
    seconds = alternate(system, baseline, args.repeats, args.device, cpu=cpu)
    rate = [[g / s for s in side] for side in seconds]
    sampler = config.algorithm.sampler
    return figure(
        f"RolloutWorker.generate, {sampler}{' + trajectory and log-probs' if sampler == 'dance_sde' else ''}",
        "images/s per GPU" if args.device == "cuda" else "images/s",
        rate[0], rate[1], f"FluxPipeline loop, num_images_per_prompt={micro}, output_type='np'",
        group_size=g, micro_batch=micro, num_steps=steps, resolution=m.height, preset=PRESETS[preset],
        **cpu_figures(cpu, per_call=True),
    )  # fmt: skip


# ------------------------------------------------------------------------------------- (b) learner


def train_batch(config: Config, worker) -> list[TrainGroup]:
    """One step's TrainGroups from real rollouts, with advantages of random rewards (timing does not depend on them)."""
    algo, rng = config.algorithm, np.random.default_rng(0)
    groups = []
    for k in range(algo.groups_per_step):
        prompt = config.data.prompts[k % len(config.data.prompts)]
        rollout, _, _ = worker.generate(PromptGroup(k, k, prompt, algo.group_size, seed=k, policy_version=0))
        advantages = group_advantages(rng.normal(size=(1, algo.group_size)), algo.adv_clip_max)
        groups.append(TrainGroup(rollout, k, advantages.astype(np.float32), np.ones(1, np.float32), np.arange(algo.group_size)))
    return groups


@dataclass
class BareForward:
    """One forward with gradient of the bare loop (DanceGRPO), or one group's constants (DGPO: its forwards' inputs are
    drawn at every step by ``bare_dgpo_step``)."""

    kwargs: dict  # FluxTransformer2DModel's keyword arguments, on the device (DGPO: without hidden_states and timestep)
    x0: torch.Tensor | None = None  # DGPO: [G, ...] the group's final latents
    advantages: torch.Tensor | None = None  # DGPO: [G]


def bare_forwards(config: Config, batch: list[TrainGroup], device: str, img_ids: torch.Tensor) -> tuple[list[BareForward], int]:
    """What the bare loop feeds its network, built once, and after how many forwards with gradient it steps.

    DanceGRPO: each sample alone at ``trained_timesteps`` of its transitions (inputs read from the recorded
    trajectory, nothing to draw), a step every ``grad_accum_samples`` samples. DGPO: one entry per group (its x0,
    advantages and conditioning; the conditioning is constant, as a hand-written loop would hold it), and
    ``bare_dgpo_step`` draws each step's noise levels and noises and forms ``x_t`` and the targets, as the learner
    must (built once here, they would leave the learner's draws unmatched); one optimizer step per update.
    """
    algo, rng, m = config.algorithm, np.random.default_rng(0), config.model

    def inputs(r: Rollout, b: int, x: np.ndarray | None = None, sigma: float | None = None) -> dict:
        text = torch.as_tensor(r.conditioning.prompt_embeds, device=device)
        kwargs = {
            "guidance": torch.full((b,), m.guidance_scale, device=device), "encoder_hidden_states": text[None].expand(b, -1, -1),
            "pooled_projections": torch.as_tensor(r.conditioning.pooled_prompt_embeds, device=device)[None].expand(b, -1),
            "txt_ids": torch.zeros(text.shape[0], 3, device=device), "img_ids": img_ids,
        }  # fmt: skip
        if x is not None:
            kwargs |= {"hidden_states": torch.as_tensor(x, device=device), "timestep": torch.full((b,), sigma, device=device)}
        return kwargs

    if algo.name == "dancegrpo":
        forwards = []
        for group in batch:
            r = group.rollout
            for member in group.members:
                for j in rng.permutation(len(r.sigmas) - 2)[: config.trained_timesteps]:
                    forwards.append(BareForward(inputs(r, 1, r.trajectory[member, j][None], float(r.sigmas[j]))))
        return forwards, config.trained_timesteps * algo.grad_accum_samples
    groups = []
    for group in batch:
        r, advantages = group.rollout, (group.reward_weights[:, None] * group.advantages).sum(axis=0)
        x0 = torch.as_tensor(r.final_latents[group.members], device=device)
        groups.append(BareForward(inputs(r, len(x0)), x0, torch.as_tensor(advantages, device=device)))
    return groups, algo.num_train_timesteps * len(groups)


def bare_dgpo_step(
    config: Config, networks: dict, adamw: torch.optim.Optimizer, groups: list[BareForward], step: int, generator: torch.Generator
) -> None:
    """DGPO's update in plain PyTorch, the same math as ``raygrpo.algorithms.dgpo`` (whole groups, one optimizer step).

    ``networks``: ``policy`` (trained), ``fast`` (fast-EMA copy: the clip's old policy, and the reference with
    ``reference: fast_ema``), ``base`` (frozen copy: the KL's anchor, and the reference with ``reference: frozen``),
    ``slow`` (slow-EMA copy). Separate modules, where raygrpo swaps shadow values into the one network. Like the
    learner it draws every step ``num_train_timesteps`` noise levels (sigma ~ U[0.3, 1], shared by the step's groups)
    and at each one noise per group (shared by its members), from ``generator``.
    """
    algo = config.algorithm
    policy, fast, base = networks["policy"], networks["fast"], networks["base"]
    reference = fast if algo.reference == "fast_ema" else base
    needs_old = algo.clip_dsm or algo.clip_kl  # the clip's old policy (the fast EMA) is evaluated only for a clip
    samples = sum(len(g.x0) for g in groups)
    adamw.zero_grad(set_to_none=True)
    for sigma in (0.3 + 0.7 * torch.rand(algo.num_train_timesteps, generator=generator)).tolist():
        for g in groups:
            noise = torch.randn((1, *g.x0.shape[1:]), generator=generator).to(g.x0.device).expand_as(g.x0)  # one per group
            target = noise - g.x0  # [G, ...] v* = eps - x0
            x_t = (1 - sigma) * g.x0 + sigma * noise  # [G, ...]
            kwargs = g.kwargs | {"hidden_states": x_t, "timestep": torch.full((len(x_t),), sigma, device=x_t.device)}
            mse = lambda v: (v.float() - target).square().flatten(1).mean(dim=1)  # noqa: E731  [G]
            with torch.no_grad():
                v_ref = reference(**kwargs, return_dict=False)[0]
                v_base = v_ref if reference is base or algo.kl_beta == 0 else base(**kwargs, return_dict=False)[0]
                v_old = v_ref if reference is fast or not needs_old else fast(**kwargs, return_dict=False)[0]
            loss_ref, loss_old = mse(v_ref), mse(v_old)
            v = policy(**kwargs, return_dict=False)[0]
            loss = mse(v)  # [G]
            adv = g.advantages
            gate = torch.sigmoid(algo.beta / len(adv) * (adv * (loss.detach() - loss_ref)).sum())
            ratio = torch.exp(loss_old - loss.detach())
            clipped = ((adv > 0) & (ratio > 1 + algo.clip_range)) | ((adv < 0) & (ratio < 1 - algo.clip_range))
            clipped &= needs_old
            used = torch.where(clipped, loss.detach(), loss) if algo.clip_dsm else loss
            kl = (v.float() - v_base.float()).square().flatten(1).mean(dim=1)
            kl = torch.where(clipped, kl.detach(), kl) if algo.clip_kl else kl
            (((gate * adv * used).sum() + algo.kl_beta * kl.sum()) / (algo.num_train_timesteps * samples)).backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), config.optimizer.max_grad_norm)
    adamw.step()
    with torch.no_grad():
        decay = min(algo.fast_ema_max_decay, algo.fast_ema_decay_rate * step)
        for shadow, live in zip(fast.parameters(), policy.parameters()):
            shadow.mul_(decay).add_(live, alpha=1 - decay)
        if step % algo.slow_ema_every == 0:
            decay = min((1 + step) / (10 + step), algo.slow_ema_decay)
            for shadow, live in zip(networks["slow"].parameters(), policy.parameters()):
                shadow.mul_(decay).add_(live, alpha=1 - decay)


@contextmanager
def _timed(obj: object, name: str, totals: dict[str, float], key: str) -> Iterator[None]:
    """While the block runs, ``totals[key]`` adds up the seconds of the outermost calls of ``obj.name``, and
    ``totals[key + ' calls']`` counts them."""
    original, own, depth = getattr(obj, name), name in vars(obj), [0]
    totals.setdefault(f"{key} calls", 0)

    def wrapper(*args, **kwargs):
        depth[0] += 1
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                totals[key] += time.perf_counter() - start
                totals[f"{key} calls"] += 1

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)  # a class's own function (or an instance's own attribute)
        else:
            delattr(obj, name)  # the instance attribute that shadowed its class's method


SPLIT_REPEATS = 7  # updates per side timed piece by piece, alternating, after the alternating repeats


def time_split(sides: dict[str, tuple[Callable[[], None], list[torch.nn.Module], Any]], device: str, repeats: int = SPLIT_REPEATS) -> dict:
    """Where one step's seconds go, per side (``name: (step, its networks, its optimizer)``), medians of ``repeats``: the
    networks' forwards, every backward (the network's and the loss's), the optimizer steps, and the rest (loss math,
    model adapter, tensors in and out, Python). The sides alternate, the first one changing every repeat, so that both
    see the same load and the same caches left by the other."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            step, networks, optimizer = sides[name]
            totals = dict.fromkeys(["forward", "backward", "optimizer"], 0.0)
            with ExitStack() as stack:
                for network in networks:
                    stack.enter_context(_timed(network, "forward", totals, "forward"))
                stack.enter_context(_timed(torch.Tensor, "backward", totals, "backward"))
                stack.enter_context(_timed(optimizer, "step", totals, "optimizer"))
                sync(device)
                start = time.perf_counter()
                step()
                sync(device)
            totals["total"] = time.perf_counter() - start
            totals["rest"] = totals["total"] - totals["forward"] - totals["backward"] - totals["optimizer"]
            runs[name].append(totals)
    return {name: {key: statistics.median(run[key] for run in side) for key in side[0]} for name, side in runs.items()}


OWN_WORK_REPEATS = 25  # steps per side with stand-in networks (milliseconds each): the fastest is kept


@contextmanager
def stand_in_networks(networks: list[torch.nn.Module], device: str) -> Iterator[None]:
    """While the block runs, each network's forward is one multiply of its ``hidden_states`` by a trained scalar
    (so a backward still runs): the shapes and the graph's ends are kept, the network's own work is gone."""
    scale = torch.nn.Parameter(torch.ones((), device=device))

    def stand_in(*args, hidden_states: torch.Tensor, return_dict: bool = True, **kwargs) -> tuple[torch.Tensor]:
        return (hidden_states * scale,)

    for network in networks:
        network.forward = stand_in  # an instance attribute, shadowing the class's forward
    try:
        yield
    finally:
        for network in networks:
            del network.forward


def own_work_seconds(
    system: Callable[[int], None], baseline: Callable[[int], None], networks: list, device: str, repeats: int = OWN_WORK_REPEATS
) -> dict:
    """Seconds per step of each side's work besides the network: both run with :func:`stand_in_networks`, alternating,
    and the fastest of ``repeats`` per side is kept. The network's forwards and backwards, the same on both
    sides and most of a step, are what makes the step ratio swing with other load; without them the difference in
    the sides' own work (adapter, losses, statistics, Python) is measured nearly alone, in absolute seconds. A lower
    bound: between real network calls, which leave the caches to the network, the same work ran about twice as long
    on the tiny FLUX (``time_split_s``'s rest, alternating)."""
    with stand_in_networks(networks, device):
        seconds = alternate(system, baseline, repeats, device)
    return {"raygrpo": min(seconds[0]), "baseline": min(seconds[1])}


def shadow_swap_seconds(learner, repeats: int = 20) -> float:
    """One swap of a DGPO shadow into the network and back (median), what ``ParameterShadow.swapped`` costs each time."""
    shadow = getattr(learner.algorithm, "fast_ema", None)
    if shadow is None:
        return 0.0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with shadow.swapped():
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_learner(preset: str, args: argparse.Namespace) -> dict:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import RankBatch
    from raygrpo.rollout.worker import RolloutWorker

    config = make_config(preset, args)
    batch = train_batch(config, RolloutWorker(config))
    learner = Learner(config)
    torch.set_num_threads(args.threads)
    dev, opt, m = args.device, config.optimizer, config.model
    network = FluxTransformer2DModel.from_pretrained(resolve_pretrained(m.pretrained), subfolder="transformer", dtype=torch.float32)
    network = network.to(dev).train().requires_grad_(True)
    adamw = torch.optim.AdamW(network.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    compute = learner.compute_dtype
    _, h, w = learner.model.unpacked_latent_shape
    forwards, step_every = bare_forwards(config, batch, dev, FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, dev, torch.float32))
    dgpo = config.algorithm.name == "dgpo"
    draws = torch.Generator().manual_seed(0)  # DGPO's noise levels and noises, drawn every step
    # DGPO's shadows as modules of their own (full fine-tuning: the fast EMA, the frozen base, the slow EMA).
    networks = {"policy": network} | {k: copy.deepcopy(network).requires_grad_(False) for k in ("fast", "base", "slow") if dgpo}
    part = RankBatch.whole(batch)

    def system(r: int) -> None:
        learner.update(part)

    def baseline(r: int) -> None:
        if dgpo:
            with torch.autocast(dev, dtype=compute, enabled=compute != torch.float32):
                return bare_dgpo_step(config, networks, adamw, forwards, r + 1, draws)
        adamw.zero_grad(set_to_none=True)
        for n, f in enumerate(forwards):
            with torch.autocast(dev, dtype=compute, enabled=compute != torch.float32):
                v = network(**f.kwargs, return_dict=False)[0]
            v.float().square().mean().backward()
            if (n + 1) % step_every == 0 or n + 1 == len(forwards):
                # DanceGRPO's optimizer step clips the gradient norm (the released scripts' max_grad_norm) before AdamW
                torch.nn.utils.clip_grad_norm_(network.parameters(), config.optimizer.max_grad_norm)
                adamw.step()
                adamw.zero_grad(set_to_none=True)

    cpu: list[list[float]] = []
    seconds = alternate(system, baseline, args.repeats, dev, cpu=cpu)
    # Where the difference goes: both sides' forwards, backwards, optimizer and the rest, and DGPO's shadow swaps.
    from raygrpo.learner.ema import ParameterShadow

    swaps = {"swaps": 0.0}
    sides = {
        "raygrpo": (lambda: system(0), [learner.model.transformer], learner.optimizer),
        "baseline": (lambda: baseline(args.repeats + 1), list(networks.values()), adamw),
    }
    split_repeats = 2 if args.smoke else SPLIT_REPEATS
    with _timed(ParameterShadow, "swapped", swaps, "swaps"):  # only raygrpo swaps shadows (the baseline has copies)
        split = time_split(sides, dev, split_repeats)
    split["raygrpo"]["shadow swaps"] = swaps["swaps calls"] / split_repeats * shadow_swap_seconds(learner)  # inside "rest"
    own = {}
    if not learner.sharded:  # a stand-in forward would leave FSDP2's gathered parameters without gradients
        own = own_work_seconds(
            lambda r: system(0), lambda r: baseline(args.repeats + 2 + r), [learner.model.transformer, *networks.values()], dev,
            repeats=2 if args.smoke else OWN_WORK_REPEATS,
        )  # fmt: skip
        # The step ratio this difference alone would add: own work above the baseline's, over the baseline's step
        # (fastest against fastest, as the own work is)
        own["excess_of_step"] = (own["raygrpo"] - own["baseline"]) / min(seconds[1])
    samples = sum(len(g.members) for g in batch)
    baseline_what = (
        "DGPO in plain PyTorch on copies of the network (policy, fast EMA, frozen base, slow EMA): the same no-gradient "
        "reference/base forwards, gate, clip, KL, gradient clipping, AdamW and EMA updates, at the same batch shapes"
        if dgpo
        else "bare forward/backward, gradient clipping and AdamW on a copy of the network, same forwards with gradient and batch shapes"
    )
    return figure(
        f"Learner.update ({config.algorithm.name}), one training step", "s/step", seconds[0], seconds[1], baseline_what,
        samples=samples, forwards_with_grad=step_every if dgpo else len(forwards),
        batch_per_forward=len(forwards[0].x0) if dgpo else len(forwards[0].kwargs["hidden_states"]),
        preset=PRESETS[preset], samples_per_s=samples / statistics.median(seconds[0]),
        baseline_samples_per_s=samples / statistics.median(seconds[1]), time_split_s=split, own_work_s=own,
        **cpu_figures(cpu, per_call=False),
        # An extra figure, least disturbed by other load on a shared machine: the fastest repeat of each side, in CPU seconds.
        cpu_ratio_min=min(cpu[0]) / min(cpu[1]),
    )  # fmt: skip


# --------------------------------------------------------------------------------- (c) end to end


def serial_seconds(record: dict, config: Config) -> float:
    """What the step would take with every stage run one after the other on the same pools."""
    rewards = sum(record[f"time/reward/{r.name}"] / r.replicas for r in config.rewards)
    return record["time/rollout_worker_sum"] / config.rollout.num_workers + rewards + record["time/learner"] + record["time/sync"]


def bench_end_to_end(staleness: int, args: argparse.Namespace) -> dict:
    from raygrpo.controller import Controller

    # --smoke: one rollout worker (each is an actor start, 4-5 s on 2 cores); tests/test_scale_out.py runs two on Ray.
    steps, workers = (3, 1) if args.smoke else (args.e2e_steps, 2)
    config = make_config("dancegrpo", args, f"rollout.num_workers={workers}", f"train.max_staleness={staleness}", f"train.steps={steps}")
    run_dir = Path(args.work) / f"end-to-end-staleness{staleness}"
    controller = Controller(config, run_dir, list(config.data.prompts))
    controller.run()
    # Step 1 pays the actors' first-call costs; the last `staleness` steps have no later generation left to overlap.
    records = controller.metrics.records[1 : steps - staleness]
    rate = [r["samples/generated"] / r["time/step"] for r in records]
    serial = [r["samples/generated"] / serial_seconds(r, config) for r in records]
    return figure(
        f"Controller + Ray, tiny DanceGRPO, {workers} rollout workers, train.max_staleness={staleness}", "samples/s", rate, serial,
        "serial sum of the stages (rollout busy s / workers + reward s / replicas + learner s + sync s)",
        steps_measured=len(records), samples_per_step=records[0]["samples/generated"],
        idle={k: statistics.median(r[k] for r in records) for k in records[0] if k.startswith("idle/")},
        median_seconds={k: statistics.median(r[k] for r in records) for k in records[0] if k.startswith("time/")},
        staleness_max=max(r["staleness/max"] for r in records), run_dir=str(run_dir),
    )  # fmt: skip


# ---------------------------------------------------------------------------------- (d) weight sync


class _Rebuild:
    """An actor of (d) that builds the next model's object in its own process (``rebuild``) instead of a new actor
    doing it: each new Learner or RolloutWorker actor is a process that imports torch, diffusers and raygrpo again
    (4-5 s on 2 cores). Every timed call still goes straight to the class's own method, after a warm-up call."""

    def rebuild(self, *args) -> None:
        self.__dict__.clear()  # the previous model's tensors go before the next model is built beside them
        gc.collect()
        self.__init__(*args)


def _rebuildable(cls: type) -> type:
    """``cls`` with ``_Rebuild.rebuild``: a Learner or RolloutWorker that (d)'s next model can reuse."""
    return type(cls.__name__, (_Rebuild, cls), {"__doc__": cls.__doc__})


class _Source(_Rebuild):
    """Holds arrays like the learner's export and returns them: Ray puts the return value into the object store."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], str]]):
        self.arrays = {name: np.random.default_rng(0).random(shape).astype(dtype) for name, (shape, dtype) in shapes.items()}

    def publish(self) -> dict[str, np.ndarray]:
        return self.arrays


class _Sink(_Rebuild):
    """A rollout worker reduced to the floor: parameters of the same shapes, the same torch threads."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], str]], num_cpus: float):
        from raygrpo.runtime import set_torch_threads

        set_torch_threads(num_cpus)
        self.params = {name: torch.from_numpy(np.zeros(shape, dtype)) for name, (shape, dtype) in shapes.items()}

    def take(self, arrays: dict[str, np.ndarray]) -> int:
        """The raw transfer: the arrays arrive (zero-copy, read-only), nothing reads them."""
        return sum(a.nbytes for a in arrays.values())

    def load(self, arrays: dict[str, np.ndarray]) -> int:
        """The floor: the arrays arrive and each is copied once into its parameter."""
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only; copy_ only reads
            for name, array in arrays.items():
                self.params[name].copy_(torch.from_numpy(array))
        return sum(a.nbytes for a in arrays.values())


@dataclass
class SyncActors:
    """(d)'s actors: started for the first model, rebuilt in the same processes for each later one (``kill`` at the end).
    ``learner`` and ``rollout`` are the system side, ``source`` and ``sinks`` the floor's."""

    workers: int = 2
    learner: object = None
    rollout: list = field(default_factory=list)
    source: object = None
    sinks: list = field(default_factory=list)

    def hold(self, config: Config) -> None:
        """The learner and the rollout workers hold ``config``'s model."""
        import ray

        from raygrpo.learner.learner import Learner
        from raygrpo.rollout.worker import RolloutWorker

        if self.learner is None:
            self.learner = ray.remote(num_cpus=1)(_rebuildable(Learner)).remote(config)
            worker = ray.remote(num_cpus=0.5)(_rebuildable(RolloutWorker))
            self.rollout = [worker.remote(config) for _ in range(self.workers)]
        else:
            ray.get([actor.rebuild.remote(config) for actor in (self.learner, *self.rollout)])

    def hold_floor(self, shapes: dict[str, tuple[tuple[int, ...], str]], num_cpus: float) -> None:
        """The source and the sinks hold arrays and parameters of ``shapes``."""
        import ray

        if self.source is None:
            self.source = ray.remote(num_cpus=0.25)(_Source).remote(shapes)
            self.sinks = [ray.remote(num_cpus=0.25)(_Sink).remote(shapes, num_cpus) for _ in range(self.workers)]
        else:
            ray.get([self.source.rebuild.remote(shapes), *(s.rebuild.remote(shapes, num_cpus) for s in self.sinks)])
        ray.get([a.__ray_ready__.remote() for a in self.actors()])

    def actors(self) -> list:
        return [a for a in (self.learner, *self.rollout, self.source, *self.sinks) if a is not None]

    def kill(self) -> None:
        import ray

        for actor in self.actors():
            ray.kill(actor)


def sync_model(args: argparse.Namespace) -> list[str]:
    """Overrides for (d)'s second model: a FLUX of ``--sync-width`` (2 double + 4 single blocks), large enough that
    bytes dominate: 512 wide is 145 MB in float32, 1408 wide 1.09 GB."""
    width, blocks = (min(args.sync_width, 256), (1, 1)) if args.smoke else (args.sync_width, (2, 4))
    size = Realistic(width, *blocks, text_width=64, vae_width=8)
    cache = Path(os.environ.get("RAYGRPO_CACHE") or Path.home() / ".cache" / "raygrpo")
    folder = build_realistic_flux(cache / size.folder_name(), size, "cpu")
    return [f"model.pretrained={folder}", "model.max_sequence_length=8"]


def bench_weight_sync(args: argparse.Namespace, actors: SyncActors, *extra: str) -> dict:
    """What ``WeightSync.push`` does (the learner puts its message, every worker loads and verifies it) against
    the honest floor: one actor puts the same bytes, each of ``actors.workers`` actors gets them and copies them once
    into tensors of the same shapes. The raw transfer (the same without the copy) is reported beside it."""
    import ray

    config = make_config("dancegrpo", args, f"rollout.weight_verify={args.sync_verify}", *extra)
    actors.hold(config)
    learner, rollout, workers = actors.learner, actors.rollout, actors.workers
    message = ray.get(ray.get(learner.publish_weights.remote()))
    shapes = {name: (a.shape, a.dtype.str) for name, a in message.arrays.items()}
    nbytes, tensors = message.nbytes, len(message.arrays)
    del message  # the object store's copy is freed with its last reference
    actors.hold_floor(shapes, config.rollout.num_cpus)
    source, sinks = actors.source, actors.sinks
    parts: dict[str, list[float]] = {"export": [], "load": []}

    def system(r: int) -> None:
        start = time.perf_counter()
        ref = ray.get(learner.publish_weights.remote())  # as LearnerGroup.export_weights: the put is done
        parts["export"].append(time.perf_counter() - start)
        reports = ray.get([w.set_weights.remote(ref) for w in rollout])
        parts["load"].append(max(report.seconds for report in reports))
        if len({(report.policy_version, report.checksum) for report in reports}) != 1:
            raise RuntimeError(f"rollout workers report different (version, digest): {reports}")

    def floor(r: int) -> None:
        ref = source.publish.remote()
        ray.get([s.load.remote(ref) for s in sinks])

    def raw(r: int) -> None:
        ref = source.publish.remote()
        ray.get([s.take.remote(ref) for s in sinks])

    repeats = args.sync_repeats or (args.repeats if args.smoke else 15)
    seconds = alternate(system, floor, repeats, "cpu", raw)
    raw_median = statistics.median(seconds[2])
    return figure(
        f"weight sync: Learner.publish_weights + {workers} RolloutWorker.set_weights (copy_ in place, {args.sync_verify} verify)", "s",
        seconds[0], seconds[1],
        f"the floor: one actor returns numpy arrays of the same shapes (put), {workers} actors receive them (get) and copy_ "
        "each once into a tensor of its shape",
        raw_transfer=raw_median, raw_transfer_values=seconds[2], ratio_vs_raw_transfer=statistics.median(seconds[0]) / raw_median,
        export_s=statistics.median(parts["export"][1:]), slowest_load_s=statistics.median(parts["load"][1:]),
        verify=args.sync_verify, bytes=nbytes, tensors=tensors, workers=workers, model=config.model.pretrained, repeats=repeats,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- main


def start_ray(address: str | None, prefault: bool = False, store_bytes: int | None = None) -> None:
    """Join ``address``, or start a local instance. ``prefault``: the local object store touches all its shared memory
    at start (``RAY_preallocate_plasma_memory``), as a long-running cluster's store is after its first syncs: without
    it a GB-sized put into memory never touched before page-faults (7-11 s for 1 GiB measured on the loaded 2-core
    machine, 0.3-0.9 s after), and whichever side of (d) lands on fresh memory first looks slow. ``store_bytes``: the
    local object store's size (None: Ray's default, 30% of RAM), see :func:`sync_store_bytes`."""
    import ray
    import ray.cloudpickle

    if __name__ != "__main__":
        # Ray sends a class by reference to its module, which a worker then imports by name. Run, this script is
        # __main__ and goes by value; loaded from its path (the tests, a notebook) no worker could import it by name.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if address:
        ray.init(address=address, logging_level="WARNING")
        return
    # One new local instance for this script ("local"), never a cluster another session started on this machine.
    os.environ.pop("RAY_ADDRESS", None)
    if prefault:
        os.environ["RAY_preallocate_plasma_memory"] = "1"  # read by the raylet this ray.init starts
    for attempt in (1, 2):
        try:
            ray.init(
                address="local", num_cpus=4, include_dashboard=False, object_store_memory=store_bytes, _node_ip_address="127.0.0.1",
                logging_level="WARNING",
            )  # fmt: skip
            return
        except Exception as exc:  # Ray raises a bare Exception when its node is slow to come up (a busy shared machine)
            if attempt == 2:
                raise
            logger.warning("local Ray did not start (%s); trying once more", exc)
            ray.shutdown()


def sync_store_bytes(args: argparse.Namespace) -> int:
    """(d)'s object store: 4x its large model's message (float32 bytes grow with ``--sync-width`` squared: 145 MB at
    512), at least 1 GiB. Each put is timed by where it lands: a process writing store pages it has never touched
    page-faults on every 4 KiB (about 25 ms per 145 MB here), so with Ray's default store (30% of RAM, 7 GB here) each
    side's put drew fast or slow by chance, repeat by repeat (145 MB: 0.07 or 0.10 s the sync, 0.06 or 0.09 s the
    floor; ratios of 1.24-1.60 over 3 runs). A store a few messages large is reused by every put after the warm-up, as
    a training run's store is from one sync to the next (the previous version freed), for both sides alike."""
    large = 145e6 * (args.sync_width / 512) ** 2
    return int(max(1 << 30, 4 * large))


def machine(device: str) -> dict:
    import diffusers

    info = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "device": device, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }  # fmt: skip
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="a,b,c,d", help="comma-separated parts to run (a rollout, b learner, c end to end, d weight sync)")
    p.add_argument(
        "--presets", default="dancegrpo,dgpo", help="presets parts a and b measure, comma-separated"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per side after one warm-up (median reported)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the in-process parts (a, b), both sides")
    p.add_argument("--micro-batch", type=int, default=None, help="rollout.micro_batch_size for both presets (default: each preset's)")
    p.add_argument("--e2e-steps", type=int, default=8, help="training steps per end-to-end run (step 1 and the last max_staleness skipped)")
    p.add_argument("--sync-width", type=int, default=512, help="(d): width of the second FLUX timed (512: 145 MB, 1408: 1.09 GB)")
    p.add_argument(
        "--sync-repeats", type=int, default=None,
        help="(d): timed repeats per side (default 15, --repeats with --smoke): a put's time is bimodal on either side "
        "(0.13 or 0.35 s per GB here), so 5 repeats let the ratio swing 1.0-1.6",
    )  # fmt: skip
    p.add_argument("--sync-verify", choices=["sample", "full"], default="sample", help="(d): rollout.weight_verify of the timed syncs")
    p.add_argument("--realistic", action="store_true", help="FLUX.1 widths at 512x512, random weights (parts a and b)")
    p.add_argument("--width", type=int, default=Realistic.width, help="--realistic: transformer width (multiple of 128)")
    p.add_argument("--layers", default=f"{Realistic.double_blocks},{Realistic.single_blocks}", help="--realistic: double,single blocks")
    p.add_argument("--text-width", type=int, default=Realistic.text_width, help="--realistic: T5 width (= joint_attention_dim)")
    p.add_argument("--vae-width", type=int, default=Realistic.vae_width, help="--realistic: VAE base channels (x1, x2, x4, x4)")
    p.add_argument("--resolution", type=int, default=Realistic.resolution)
    p.add_argument(
        "--smoke", action="store_true", help="smallest sizes (tests): group 2, 3 steps, 3 end-to-end steps on 1 rollout worker, 1+1 blocks"
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "scale_out.json")
    p.add_argument("--work", type=Path, default=None, help="folder for run outputs and built models (default: a temporary one)")
    args = p.parse_args(argv)
    args.parts = [part.strip() for part in args.only.split(",") if part.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown parts {unknown}; choose from {','.join(PARTS)}")
    args.presets = [preset.strip() for preset in args.presets.split(",") if preset.strip()]
    if not args.presets or set(args.presets) - set(PRESETS):
        p.error(f"--presets {','.join(args.presets)}: choose one or more of {','.join(PRESETS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if args.realistic and set(args.parts) & {"c", "d"}:
        p.error("--realistic measures parts a and b (images per GPU per second, learner step); run c and d on the tiny model")
    double, single = (int(n) for n in args.layers.split(","))
    args.size = Realistic(args.width, double, single, args.text_width, args.vae_width, args.resolution)
    return args


def quiet_logging() -> None:
    """INFO lines of the benchmark itself; diffusers' and transformers' loading bars and notices would drown the results."""
    import diffusers
    import transformers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict:
    quiet_logging()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raygrpo-scale-out-") as tmp:
        args.work = args.work or Path(tmp)
        if args.realistic:
            cache = Path(os.environ.get("RAYGRPO_CACHE") or Path.home() / ".cache" / "raygrpo")
            args.model_folder = build_realistic_flux(cache / args.size.folder_name(), args.size, args.device)
        report = {"machine": machine(args.device), "settings": {k: str(v) for k, v in vars(args).items()}, "figures": {}}
        figures = report["figures"]
        if "a" in args.parts:
            for preset, name in (("dgpo", "a_rollout_ode_dgpo"), ("dancegrpo", "a_rollout_sde_dancegrpo")):
                if preset not in args.presets:
                    continue
                figures[name] = bench_rollout(preset, args)
                logger.info("%s: %s", name, _line(figures[name]))
        if "b" in args.parts:
            for preset in ("dancegrpo", "dgpo"):
                if preset not in args.presets:
                    continue
                release_memory()  # the previous part's models and optimizer states (tens of GB at realistic size)
                figures[f"b_learner_{preset}"] = bench_learner(preset, args)
                logger.info("b_learner_%s: %s", preset, _line(figures[f"b_learner_{preset}"]))
        if set(args.parts) & {"c", "d"}:
            import ray

            sync = "d" in args.parts and not args.smoke
            start_ray(args.ray_address, prefault=sync, store_bytes=sync_store_bytes(args) if sync else None)
            try:
                if "c" in args.parts:
                    for staleness in (0, 1):
                        figures[f"c_end_to_end_staleness{staleness}"] = bench_end_to_end(staleness, args)
                        logger.info("c staleness %d: %s", staleness, _line(figures[f"c_end_to_end_staleness{staleness}"]))
                    # Overlapped stages share the CPU cores, so their busy seconds (the serial baseline) inflate: compare the runs too.
                    on, off = figures["c_end_to_end_staleness1"], figures["c_end_to_end_staleness0"]
                    figures["c_staleness1_vs_staleness0"] = figure(  # two runs: their steps are no pairs
                        on["what"], "samples/s", on["values"], off["values"], off["what"], paired=False, steps_measured=on["steps_measured"]
                    )
                if "d" in args.parts:
                    actors = SyncActors()  # one set of actors: the second model is built in the first one's processes
                    try:
                        figures["d_weight_sync"] = bench_weight_sync(args, actors)
                        figures["d_weight_sync_large"] = bench_weight_sync(args, actors, *sync_model(args))
                    finally:
                        actors.kill()
                    for name in ("d_weight_sync", "d_weight_sync_large"):
                        logger.info("%s: %s", name, _line(figures[name]))
            finally:
                ray.shutdown()
    report["machine"]["loadavg_after"] = list(os.getloadavg())
    _check(figures)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(_table(figures))
    print(f"written: {args.out}")
    return report


def _line(f: dict) -> str:
    extra = f", per-repeat median {f['paired_ratio']:.3f}" if "paired_ratio" in f else ""
    extra += f", CPU-seconds ratio {f['cpu_ratio']:.3f}" if "cpu_ratio" in f else ""
    if own := f.get("own_work_s"):
        extra += (
            f"; besides the network {own['raygrpo'] * 1e3:.2f} vs {own['baseline'] * 1e3:.2f} ms per step,"
            f" {own['excess_of_step']:+.3f} of a baseline step"
        )
    return f"{f['value']:.4g} {f['unit']} vs baseline {f['baseline']:.4g} (ratio {f['ratio']:.3f}{extra})"


def _check(figures: dict) -> None:
    bad = {k: f for k, f in figures.items() if not all(math.isfinite(f[x]) and f[x] > 0 for x in ("value", "baseline", "ratio"))}
    if bad:
        raise RuntimeError(f"non-finite or non-positive figures: {bad}")


def _table(figures: dict) -> str:
    rows = ["| figure | raygrpo | baseline | ratio | ratio in CPU seconds |", "|---|---|---|---|---|"]
    rows += [
        f"| {k} | {f['value']:.4g} {f['unit']} | {f['baseline']:.4g} | {f['ratio']:.3f} | {f.get('cpu_ratio', float('nan')):.3f} |"
        for k, f in figures.items()
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
