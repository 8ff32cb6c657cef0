"""One prepared GPU check (issue #14, item 4): what a lent single-GPU machine should verify, in one command.

    bash benchmarks/gpu_check.sh .whl                       # on the device machine: install the carried wheels, then this
    python benchmarks/gpu_check.py --device cuda --out X.json
    python benchmarks/gpu_check.py --dry-run                # here: every section on CPU at tiny sizes (tests/test_gpu_check.py)

Sections, in this order, each in a process of its own with its own time limit (a failure, crash or hang in
one never stops the others; later ones are skipped only when the whole --budget-s is spent):

* ``environment``: Python, torch, CUDA, NCCL, the GPU, the carried packages' versions, and a bf16 matmul's
  TFLOP/s (what the card really reaches, beside its datasheet peak).
* ``first_ratio``: ``run.in_process`` through the real Controller, ``model.dtype`` bf16 on the GPU, the tiny
  DanceGRPO and DGPO presets for a few steps. DanceGRPO: ``learner/first_ratio_max_abs_dev`` must be exactly 0
  at every step (the learner recomputes the rollout's own log-probs before its first optimizer step). DGPO has
  no rollout log-probs; its ratio exp(l_old - l) compares the fast EMA with the policy, which are the same
  weights before the first optimizer step, so step 1's ``learner/ratio_max_abs_dev`` must be exactly 0.
* ``fsdp2``: ``--steps`` DanceGRPO updates of the tiny model through FSDP2 (``fully_shard``, bf16 mixed
  precision), rollout reloading the learner's weights between them, on 1 rank with NCCL (what a LearnerGroup
  rank on one GPU runs), on 2 ranks sharing the one GPU with NCCL (NCCL refuses two ranks on one device: the
  refusal is recorded, not counted as a failure), and on 2 ranks with gloo, which takes CUDA tensors. Each:
  first ratio exactly 0 at every step, the first update's loss and gradient norm, seconds.
* ``realistic``: benchmarks/scale_out.py's ``--realistic`` model (FLUX.1 widths, 2 + 4 blocks, 512x512):
  ``RolloutWorker.generate`` images/s on the GPU and ``Learner.update`` s/step for both presets, their FLOPs
  counted by ``torch.utils.flop_counter.FlopCounterMode`` on the first (warm-up) call, MFU against the GPU's
  datasheet bf16 peak, and the planner's prediction (raygrpo/plan.py) beside the measurement.
* ``weight_broadcast``: learner -> one rollout worker on the same GPU through ``WeightBroadcastGroup``, with
  NCCL (refused on one device, as above) and with the CPU fallback (gloo; tensors go through host memory):
  the sender's and receiver's digests agree, an independent sha256 of every byte agrees, seconds and GB/s.
  On the realistic model when the previous section built it, else the tiny one.

The JSON (``--out``) is rewritten after every section: a run cut short still leaves what it measured.
Exit status 0 when every section passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

# Before torch loads: torch.cuda.is_available() then asks NVML and leaves CUDA uninitialised here, so the
# section processes forked from this one can still use the GPU.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import scale_out as bench  # noqa: E402  benchmarks/scale_out.py: the realistic model and its configs

# Datasheet dense bf16 peaks (TFLOP/s) by a word of torch.cuda.get_device_name(); --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
# Sizes for --dry-run: scale_out.py's --smoke sizes, and its --realistic path reduced to what a CPU runs in seconds.
DRY_REALISTIC = ["--smoke", "--width", "128", "--layers", "1,1", "--text-width", "64", "--vae-width", "8", "--resolution", "64"]
MIN_SECTION_S = 20.0  # a section is skipped, not started, with less than this left of --budget-s
REFUSAL_LIMIT_S = 60.0  # a variant NCCL is expected to refuse (two ranks on one GPU) gets this long at most


# ------------------------------------------------------------------------------------------- helpers


def bench_args(args: argparse.Namespace, realistic: bool) -> argparse.Namespace:
    """scale_out.py's own options for this check's device and sizes, so its make_config builds the configs."""
    argv = ["--only", "a,b", "--device", args.device, "--repeats", str(args.repeats), "--work", str(args.work), "--layers", args.layers]
    argv += (["--realistic"] + (DRY_REALISTIC if args.dry_run else [])) if realistic else (["--smoke"] if args.dry_run else [])
    return bench.parse_args(argv)


def tiny_config(algorithm: str, args: argparse.Namespace, *extra: str):
    """The tiny preset of ``algorithm`` with a GPU per role, in this check's dtype (scale_out.py's settings: no
    checkpoints, no TensorBoard). On CPU ``run.device_override`` runs those roles there, so the dry run
    takes the same configuration path as the GPU run."""
    device = [f"model.dtype={args.dtype}", "rollout.num_gpus=1", "learner.num_gpus=1"]
    device += ["run.device_override=cpu"] if args.device == "cpu" else []
    return bench.make_config(algorithm, bench_args(args, realistic=False), *device, *extra)


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """``fn()``'s result and its seconds, the device synchronised before and after."""
    bench.sync(device)
    start = time.perf_counter()
    result = fn()
    bench.sync(device)
    return result, time.perf_counter() - start


def counted_flops(fn: Callable[[], object], device: str) -> tuple[int, float]:
    """``fn()`` once under FlopCounterMode (matmuls, convolutions, attention; forward and backward): (FLOPs, seconds)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _, seconds = timed(fn, device)
    return counter.get_total_flops(), seconds


def peak_flops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for word, tf in PEAK_BF16_TFLOPS.items() if word in name), None)


def state_sha256(tensors) -> tuple[str, int]:
    """sha256 of every byte of ``(name, tensor)`` pairs in sorted name order (an independent check of a weight sync), and the bytes."""
    digest, total = hashlib.sha256(), 0
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy()
        digest.update(name.encode())
        digest.update(raw)
        total += raw.nbytes
    return digest.hexdigest(), total


# --------------------------------------------------------------------------------- process isolation


def _result_file(prefix: str, folder) -> Path:
    """A new empty file for a child's JSON result: still empty afterwards means the child died first."""
    fd, name = tempfile.mkstemp(prefix=f"{prefix}-", suffix=".json", dir=folder)
    os.close(fd)
    return Path(name)


def _section_child(fn: Callable, args: argparse.Namespace, result_file: str) -> None:
    os.setsid()  # its own process group: a timeout ends it and every rank process it started, nothing else
    try:
        result = fn(args)
    except BaseException as exc:  # noqa: BLE001 - whatever went wrong is the section's result
        result = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    result["modules"] = sorted({name.split(".")[0] for name in sys.modules})  # what the device must be able to import
    Path(result_file).write_text(json.dumps(result, default=str))


def save_partial(args: argparse.Namespace, figures: dict) -> None:
    """What a section has measured so far: if it then runs out of time, its report keeps these as ``partial``."""
    Path(args.partial_file).write_text(json.dumps(figures, default=str))


def run_isolated(fn: Callable, args: argparse.Namespace, limit_s: float) -> dict:
    """``fn(args)`` in a child process (``--start-method``) given ``limit_s`` seconds; its result dict, or why there is none."""
    if args.device == "cuda" and args.start_method == "fork" and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised in the check's main process: forked sections could not use it")
    result_file = _result_file(fn.__name__, args.work)
    args.partial_file, args.limit_s = f"{result_file}.partial", limit_s  # the child's copy of args carries them
    start = time.monotonic()
    child = mp.get_context(args.start_method).Process(target=_section_child, args=(fn, args, str(result_file)), name=fn.__name__)
    child.start()
    child.join(limit_s)
    if child.is_alive():
        os.killpg(child.pid, signal.SIGKILL)
        child.join()
        result = {"passed": False, "error": f"timed out after {limit_s:.0f} s (its limit; the rest of the check went on)"}
    elif result_file.stat().st_size:
        result = json.loads(result_file.read_text())
    else:
        result = {"passed": False, "error": f"its process died with exit code {child.exitcode} before writing a result"}
    partial = Path(args.partial_file)
    if "error" in result and partial.is_file():
        result["partial"] = json.loads(partial.read_text())
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def _rank_child(fn: Callable, rank: int, world: int, port: int, payload: dict, result_file: str) -> None:
    try:
        result = {"ok": True, **fn(rank, world, port, payload)}
    except BaseException as exc:  # noqa: BLE001
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:1500]}"}
    Path(result_file).write_text(json.dumps(result, default=str))


def run_ranks(fn: Callable, world: int, payload: dict, limit_s: float, start_method: str, work: Path) -> list[dict]:
    """``fn(rank, world, port, payload)`` in ``world`` processes that rendezvous on a free loopback port; each rank's result."""
    from raygrpo.net import free_port

    port, ctx = free_port("127.0.0.1"), mp.get_context(start_method)
    files = [_result_file(f"{fn.__name__}-rank{r}", work) for r in range(world)]
    procs = [ctx.Process(target=_rank_child, args=(fn, r, world, port, payload, str(files[r]))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit_s
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    results = []
    for p, f in zip(procs, files):
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()
            results.append({"ok": False, "error": f"timed out after {limit_s:.0f} s"})
        else:
            results.append(json.loads(f.read_text()) if f.stat().st_size else {"ok": False, "error": f"exit code {p.exitcode}, no result"})
    return results


# ------------------------------------------------------------------------------------------ sections


def environment(args: argparse.Namespace) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__}
    versions = {}
    for name in ("ray", "diffusers", "transformers", "pydantic", "peft", "accelerate", "safetensors", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    failed_imports = {}
    for module in ("ray", "diffusers", "pydantic", "raygrpo.controller"):
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001
            failed_imports[module] = f"{type(exc).__name__}: {exc}"
    cuda_ok = torch.cuda.is_available()
    info |= {"cuda_runtime": torch.version.cuda, "cuda_available": cuda_ok, "versions": versions, "failed_imports": failed_imports}
    if args.device == "cuda" and cuda_ok:
        props, nccl = torch.cuda.get_device_properties(0), torch.cuda.nccl.version()  # a tuple, or an int in older torch
        info |= {
            "gpu": props.name, "capability": f"{props.major}.{props.minor}", "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "nccl": ".".join(map(str, nccl if isinstance(nccl, tuple) else (nccl,))),
            "bf16_supported": torch.cuda.is_bf16_supported(), "peak_bf16_tflops_datasheet": (peak_flops(args) or 0) / 1e12 or None,
        }  # fmt: skip
    n = 8192 if args.device == "cuda" else 256
    a = torch.randn(n, n, device=args.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    seconds = timed(lambda: [a @ a for _ in range(10)], args.device)[1] / 10
    info["bf16_matmul_tflops_measured"] = round(2 * n**3 / seconds / 1e12, 3)
    device_ok = args.device == "cpu" or (cuda_ok and info.get("bf16_supported", False))
    return {"passed": device_ok and not failed_imports, **info}


def first_ratio(args: argparse.Namespace) -> dict:
    from raygrpo.controller import Controller

    out, passed = {}, True
    for algorithm in ("dancegrpo", "dgpo"):
        config = tiny_config(algorithm, args, "run.in_process=true", f"train.steps={args.steps}")
        run_dir = Path(args.work) / f"first-ratio-{algorithm}"
        Controller(config, run_dir, list(config.data.prompts)).run()
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if algorithm == "dancegrpo":
            deviations = [r["learner/first_ratio_max_abs_dev"] for r in rows]
            what = "max |ratio - 1| before each update's first optimizer step, every step"
        else:
            deviations = [rows[0]["learner/ratio_max_abs_dev"]]
            what = "max |exp(l_old - l) - 1| of step 1 (fast EMA == policy before the first optimizer step)"
        exact = all(d == 0.0 for d in deviations)
        passed &= exact
        out[algorithm] = {"exact": exact, "max_abs_dev": deviations, "what": what, "steps": len(rows), "dtype": config.model.dtype}
    return {"passed": passed, **out}


def _fsdp_rank(rank: int, world: int, port: int, payload: dict) -> dict:
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import split_batch
    from raygrpo.rollout.worker import RolloutWorker

    args, backend = payload["args"], payload["backend"]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.device == "cuda":
        torch.cuda.set_device(0)  # both ranks on the one GPU
    address, timeout = f"tcp://127.0.0.1:{port}", timedelta(seconds=90)
    torch.distributed.init_process_group(backend, init_method=address, rank=rank, world_size=world, timeout=timeout)
    try:
        # A one-element all-reduce first: a backend that refuses this layout (NCCL, two ranks on one GPU) fails now,
        # before the models load, and every rank gets the same error rather than one waiting for the other.
        torch.distributed.all_reduce(torch.ones(1, device=args.device))
        config = tiny_config("dancegrpo", args, f"learner.num_ranks={world}")
        worker = RolloutWorker(config)
        learner = Learner(config, rank, world)  # the process group is up: FSDP2-sharded
        steps = []
        for step in range(args.steps):
            if step:  # rollout samples with what the learner exports: every rank gathers the whole tensors and loads them
                with learner.sampling_tensors() as tensors:
                    worker.model.transformer.load_state_dict(dict(tensors))
            batch = bench.train_batch(config, worker)  # the same groups on every rank; each trains its own part
            metrics, seconds = timed(lambda: learner.update(split_batch(batch, world)[rank]), args.device)
            steps.append((metrics, seconds))
        first = steps[0][0]
        return {"sharded": learner.sharded, "backend": torch.distributed.get_backend(), "seconds": [s for _, s in steps],
                "loss": first.loss, "grad_norm": first.grad_norm,
                "first_ratio_max_abs_dev": [m.first_ratio_max_abs_dev for m, _ in steps]}  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def fsdp2(args: argparse.Namespace) -> dict:
    variants = [("nccl", 1), ("nccl", 2), ("gloo", 2)] if args.device == "cuda" else [("gloo", 1), ("gloo", 2)]
    out, ran_two = {}, False
    for backend, world in variants:
        refusal = backend == "nccl" and world > 1  # expected at the probe, seconds after the start: no need to wait long
        limit = min(args.rank_limit_s, REFUSAL_LIMIT_S) if refusal else args.rank_limit_s
        ranks = run_ranks(_fsdp_rank, world, {"args": args, "backend": backend}, limit, args.start_method, Path(args.work))
        name = f"{backend}_{world}_rank{'s' if world > 1 else ''}"
        if all(r["ok"] for r in ranks):
            r = ranks[0]
            exact = all(d == 0.0 for d in r["first_ratio_max_abs_dev"]) and math.isfinite(r["loss"])
            keys = ("backend", "sharded", "seconds", "loss", "grad_norm", "first_ratio_max_abs_dev")
            out[name] = {"ran": True, "exact": exact, **{k: r[k] for k in keys}}
            ran_two |= world == 2 and exact
        else:
            errors = sorted({r["error"] for r in ranks if not r["ok"]})
            out[name] = {"ran": False, "expected_refusal": refusal, "errors": errors}
    one_rank = out[f"{'nccl' if args.device == 'cuda' else 'gloo'}_1_rank"]
    passed = ran_two and one_rank.get("exact", False)
    two = [k for k, v in out.items() if k.endswith("ranks") and v.get("exact")]
    return {"passed": passed, "two_ranks_on_one_device_with": two, **out}


def realistic(args: argparse.Namespace) -> dict:
    sa = bench_args(args, realistic=True)
    sa.model_folder = bench.build_realistic_flux(Path(args.cache) / sa.size.folder_name(), sa.size, args.device)
    peak = peak_flops(args)
    out = {"model_folder": str(sa.model_folder), "size": vars(sa.size), "peak_bf16_tflops": peak and peak / 1e12}
    for algorithm in ("dgpo", "dancegrpo"):
        config = bench.make_config(algorithm, sa)
        out[f"rollout_{algorithm}"], batch = _measure_rollout(config, args, peak)
        bench.release_memory()  # the rollout worker is gone with its function's frame
        save_partial(args, out)
        out[f"learner_{algorithm}"] = _measure_learner(config, batch, args, peak)
        bench.release_memory()
        save_partial(args, out)
        out[f"planner_{algorithm}"] = planner_prediction(config, args, out[f"rollout_{algorithm}"], out[f"learner_{algorithm}"])
        save_partial(args, out)
    figures = [v for k, v in out.items() if k.startswith(("rollout_", "learner_"))]
    passed = all(math.isfinite(f["seconds"]) and f["seconds"] > 0 and f["flops"] > 0 for f in figures)
    return {"passed": passed, **out}


def _measure_rollout(config, args: argparse.Namespace, peak: float | None) -> tuple[dict, list]:
    """``RolloutWorker.generate`` of one group: FLOPs on the warm-up call, then the median of ``--repeats``; and one
    step's TrainGroups sampled by the same worker for the learner."""
    from raygrpo.contracts import PromptGroup
    from raygrpo.rollout.worker import RolloutWorker

    _reset_peak_memory(args.device)
    worker, g, prompt = RolloutWorker(config), config.algorithm.group_size, config.data.prompts[0]

    def generate():
        return worker.generate(PromptGroup(0, 0, prompt, g, seed=0, policy_version=0))

    flops, first = counted_flops(generate, args.device)  # also the warm-up
    seconds = statistics.median(timed(generate, args.device)[1] for _ in range(args.repeats))
    figure = _rate(flops, seconds, peak, images_per_s=g / seconds, seconds_per_image=seconds / g, first_call_s=first,
                   group_size=g, num_steps=config.rollout.num_steps, peak_memory_bytes=_peak_memory(args.device))  # fmt: skip
    return figure, bench.train_batch(config, worker)


def _measure_learner(config, batch: list, args: argparse.Namespace, peak: float | None) -> dict:
    """``Learner.update`` (in process: a one-rank FSDP2 group, bf16 compute on the GPU) on ``batch``, measured as the rollout is."""
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import RankBatch

    _reset_peak_memory(args.device)
    learner = Learner(config)

    def update():
        return learner.update(RankBatch.whole(batch))

    flops, first = counted_flops(update, args.device)
    seconds = statistics.median(timed(update, args.device)[1] for _ in range(args.repeats))
    samples = sum(len(group.members) for group in batch)
    return _rate(flops, seconds, peak, seconds_per_step=seconds, samples=samples, first_call_s=first,
                 peak_memory_bytes=_peak_memory(args.device))  # fmt: skip


def _reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> int | None:
    """The most the GPU held (torch's allocator) since the last reset, to set beside the planner's peak; None on CPU."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _rate(flops: int, seconds: float, peak: float | None, **figures) -> dict:
    """One measured figure with its FLOPs, achieved TFLOP/s and MFU (None without a known peak: CPU without --peak-tflops)."""
    achieved = flops / seconds
    return {"seconds": seconds, "flops": flops, "tflops_achieved": achieved / 1e12, "mfu": achieved / peak if peak else None, **figures}


def planner_prediction(config, args: argparse.Namespace, rollout: dict, learner: dict) -> dict:
    """The planner's FLOPs, peak memory and seconds at ``--plan-mfu`` beside the measured ones.

    The planner's seconds are its FLOPs / (mfu x peak), so ``implied_mfu`` = mfu x predicted / measured seconds
    is the MFU its FLOPs give the measured time: equal to the counted ``mfu`` when both count the same FLOPs
    (``planned_over_counted_flops`` = 1). Its peak memory is for FSDP ranks of ``learner.num_ranks``; the
    learner measured here is the in-process one-rank group."""
    from raygrpo.plan import make_plan

    if args.device == "cuda":
        memory = torch.cuda.get_device_properties(0).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = peak_flops(args)
    try:
        # compare=False: only the checkpointing setting measured here is set beside the planner's; the other one's
        # dry run would double the learner's (about a third of this section's time in --dry-run).
        plan = make_plan(config, mfu=args.plan_mfu, gpu_memory_bytes=memory, compare=False, **({"gpu_flops": peak} if peak else {}))
        roles = {role.role: role for role in plan.roles}
        predicted = {"rollout": plan.rollout_seconds_per_image, "learner": plan.learner_seconds_per_step}
        measured = {"rollout": rollout["seconds_per_image"], "learner": learner["seconds_per_step"]}
        counted = {"rollout": rollout["flops"] / rollout["group_size"], "learner": learner["flops"]}
        return {"available": True, "mfu_assumed": args.plan_mfu, "gpu_flops": plan.gpu_flops, "predicted_seconds": predicted,
                "measured_seconds": measured, "implied_mfu": {k: args.plan_mfu * predicted[k] / measured[k] for k in predicted},
                "planned_over_counted_flops": {k: roles[k].flops / counted[k] for k in counted},
                "planned_peak_bytes": {k: roles[k].peak_bytes for k in counted},
                "measured_peak_bytes": {"rollout": rollout["peak_memory_bytes"], "learner": learner["peak_memory_bytes"]},
                "plan": plan.to_dict()}  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the planner's own failure is a finding, not the section's
        return {"available": True, "error": f"{type(exc).__name__}: {exc}"}


def _broadcast_rank(rank: int, world: int, port: int, payload: dict) -> dict:
    from raygrpo.weight_broadcast import WeightBroadcastGroup

    args, group_device = payload["args"], torch.device(payload["group_device"])
    group = WeightBroadcastGroup("127.0.0.1", port, rank, world, group_device, timeout_s=90)
    # A one-element probe through the group first: a backend that refuses this layout (NCCL, both ranks on one
    # GPU) fails now, before the models load.
    probe = torch.nn.Module()
    probe.register_buffer("probe", torch.full((1,), 7.0, device=args.device) if rank == 0 else torch.zeros(1, device=args.device))
    if rank == 0:
        group.send(probe.state_dict())
    else:
        group.receive_into(probe, ["probe"])
    if float(probe.probe) != 7.0:
        raise RuntimeError(f"the probe broadcast delivered {float(probe.probe)}, not 7.0")
    config = tiny_config("dancegrpo", args, *payload["model"])
    if rank == 0:
        from raygrpo.learner.learner import Learner

        learner = Learner(config)
        with torch.no_grad():  # a version the rollout worker does not hold yet
            for p in learner.parameters:
                p.add_(torch.randn_like(p), alpha=1e-2)
        learner.policy_version = payload["version"]
        with learner.sampling_tensors() as tensors:
            sha, nbytes = state_sha256(tensors)
        learner.weight_group = group
        (_, digest), seconds = timed(learner.send_weights, args.device)
        return {"digest": digest, "sha256": sha, "bytes": nbytes, "seconds": seconds}
    from raygrpo.rollout.worker import RolloutWorker

    worker = RolloutWorker(config)
    network = worker.model.transformer
    before, _ = state_sha256(network.state_dict().items())
    worker.weight_group = group
    report = worker.receive_weights(payload["version"], sorted(network.state_dict()))
    after, _ = state_sha256(network.state_dict().items())
    return {"digest": report.checksum, "sha256": after, "changed": after != before, "seconds": report.seconds}


def weight_broadcast(args: argparse.Namespace) -> dict:
    size = bench_args(args, realistic=True).size
    folder = Path(args.cache) / size.folder_name()
    # The realistic model's two loads, three sha256 passes and the sync take about a minute; with less, the tiny one.
    big = (folder / "model_index.json").is_file() and args.limit_s >= 90
    model = [f"model.pretrained={folder}", f"model.height={size.resolution}", f"model.width={size.resolution}"] if big else []
    variants = [("nccl", "cuda"), ("cpu_fallback_gloo", "cpu")] if args.device == "cuda" else [("gloo", "cpu")]
    out, passed = {"model": str(folder) if big else "tiny-random"}, False
    for name, group_device in variants:
        payload = {"args": args, "group_device": group_device, "model": model, "version": 1}
        limit = min(args.rank_limit_s, REFUSAL_LIMIT_S) if group_device == "cuda" else args.rank_limit_s  # NCCL: refused at the probe
        sender, receiver = run_ranks(_broadcast_rank, 2, payload, limit, args.start_method, Path(args.work))
        if sender["ok"] and receiver["ok"]:
            checks = {"digests_agree": sender["digest"] == receiver["digest"], "every_byte_agrees": sender["sha256"] == receiver["sha256"],
                      "receiver_changed": receiver["changed"]}  # fmt: skip
            out[name] = {"ran": True, "weights_agree": all(checks.values()), **checks, "bytes": sender["bytes"],
                         "seconds": sender["seconds"], "gb_per_s": sender["bytes"] / sender["seconds"] / 1e9,
                         "receiver_seconds": receiver["seconds"]}  # fmt: skip
            passed |= all(checks.values())
        else:
            errors = sorted({r["error"] for r in (sender, receiver) if not r["ok"]})
            out[name] = {"ran": False, "expected_refusal": group_device == "cuda", "errors": errors}
    return {"passed": passed, **out}


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict], float]] = {  # name -> (function, time limit in seconds)
    "environment": (environment, 90),
    "first_ratio": (first_ratio, 180),
    "fsdp2": (fsdp2, 240),
    "realistic": (realistic, 300),
    "weight_broadcast": (weight_broadcast, 180),
}


# ------------------------------------------------------------------------------------------------ main


def run_sections(sections: dict[str, tuple[Callable, float]], args: argparse.Namespace) -> dict:
    """Each section isolated and time-limited, in order; the report is written to ``args.out`` after each one."""
    start = time.monotonic()
    report = {"check": "raygrpo GPU check (issue #14 item 4)", "device": args.device, "dry_run": args.dry_run,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "settings": {k: str(v) for k, v in vars(args).items()},
              "sections": {}}  # fmt: skip
    names = list(sections)
    for k, name in enumerate(names):
        fn, limit = sections[name]
        left = args.budget_s - (time.monotonic() - start)
        reserve = MIN_SECTION_S * (len(names) - k - 1)  # later sections keep at least a start
        limit = min(limit * args.limit_scale, max(left - reserve, MIN_SECTION_S), left)
        if left < MIN_SECTION_S:
            report["sections"][name] = {"passed": False, "skipped": f"only {left:.0f} s of --budget-s {args.budget_s:.0f} left"}
        else:
            print(f"gpu_check: {name} (limit {limit:.0f} s) ...", flush=True)
            report["sections"][name] = run_isolated(fn, args, limit)
        result = report["sections"][name]
        why = result.get("error") or result.get("skipped")
        verdict = f"{'passed' if result['passed'] else 'FAILED'} ({result.get('seconds', 0):.1f} s)"
        print(f"gpu_check: {name}: {verdict}{': ' + why if why else ''}", flush=True)
        report["total"] = {"seconds": round(time.monotonic() - start, 1), "passed": all(r["passed"] for r in report["sections"].values())}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--dry-run", action="store_true", help="every section on CPU at the smallest sizes (implies --device cpu)")
    p.add_argument("--dtype", default=None, help="model.dtype (default: bfloat16 on cuda; float32 on cpu: bf16 is the GPU run's)")
    p.add_argument("--steps", type=int, default=3, help="first_ratio, fsdp2: updates (2 or more: step 2 samples synced weights)")
    p.add_argument("--repeats", type=int, default=1, help="realistic: timed calls after the FLOP-counting warm-up (median)")
    p.add_argument("--layers", default="2,4", help="realistic: double,single FLUX blocks (1,2 halves the section's time)")
    p.add_argument("--budget-s", type=float, default=450, help="the whole check's wall-clock seconds (gpu_check.sh: 480 less the install)")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every section's time limit")
    p.add_argument("--rank-limit-s", type=float, default=120, help="fsdp2, weight_broadcast: seconds per multi-process variant")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections to run")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: the datasheet's, by GPU name)")
    p.add_argument("--plan-mfu", type=float, default=0.4, help="the MFU the planner's prediction assumes")
    p.add_argument("--start-method", choices=["fork", "spawn"], default="fork", help="how sections and ranks start (spawn: slower)")
    p.add_argument("--cache", type=Path, default=None, help="folder for the built models (default: $RAYGRPO_CACHE or ~/.cache/raygrpo)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check.json")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.steps, args.budget_s = "cpu", min(args.steps, 2), min(args.budget_s, 300)
        # On the CPU, MKL's matrix products may take paths that depend on the operands' memory alignment (seen on an
        # AVX-512 machine): a sharded learner's gathered parameters then round a last bit differently from rollout's,
        # and fsdp2's 2-rank run is 1 ulp off. Strict conditional reproducibility makes MKL's results independent of
        # alignment (read at MKL's first call, in the section processes forked after this).
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    unknown = sorted(set(args.only.split(",")) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.cache = args.cache or Path(os.environ.get("RAYGRPO_CACHE") or Path.home() / ".cache" / "raygrpo")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.partial_file, args.limit_s = None, None  # set per section by run_isolated
    import diffusers
    import transformers

    for library in (diffusers, transformers):  # loading bars and notices would drown the section lines
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    # Import once here what every section uses: forked sections then start in milliseconds, not seconds.
    import raygrpo.controller  # noqa: F401
    import raygrpo.learner.learner  # noqa: F401

    if args.device == "cuda" and args.start_method == "fork" and torch.cuda.is_initialized():
        print("gpu_check: an import initialised CUDA in this process; sections start by spawn instead of fork", flush=True)
        args.start_method = "spawn"

    with tempfile.TemporaryDirectory(prefix="raygrpo-gpu-check-") as work:
        args.work = work
        chosen = {name: SECTIONS[name] for name in args.only.split(",")}
        report = run_sections(chosen, args)
    print(f"gpu_check: {'passed' if report['total']['passed'] else 'FAILED'} in {report['total']['seconds']:.0f} s; written: {args.out}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["total"]["passed"] else 1)
