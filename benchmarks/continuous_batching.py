"""Continuous batching across denoising steps (issue #17, item 3): images/s of a rollout worker that admits new
groups at step boundaries, against the plain worker that samples one group per call, measured in the same run.

    python benchmarks/continuous_batching.py                     # tiny FLUX on CPU, DGPO preset, 1-3 minutes on 2 cores
    python benchmarks/continuous_batching.py --repeats 5 --batches 8,16,32
    python benchmarks/continuous_batching.py --realistic --device cuda      # FLUX.1 widths at 512x512 (scale_out.py's model)

Workload: ``--groups`` groups of ``--group-size`` (4) members, DGPO's rollout (DPM-Solver++(2M), ``--steps`` 10,
decode included), each group with its own prompt and seed, arriving continuously:

* ``burst``: every group queued at once (what the scheduler does: a step's groups, and with max_staleness >= 1 the
  next steps' too, are sent together);
* ``stream``: group k arrives at ``k * interval``, with the interval a quarter of the plain worker's seconds per group
  (measured in the warm-up): the queue never runs dry, and groups join the running batch at any step.

Sides, alternating repeat by repeat after a warm-up (same machine load for all):

* baseline: ``RolloutWorker.generate`` one group after the other (what a plain Ray actor does: one call at a time,
  each forward holding that group's members only);
* ``ContinuousRolloutWorker.generate`` with ``rollout.micro_batch_size`` = each of ``--batches`` (the most rows per
  forward), every group in a thread of its own from a pool of ``actor_concurrency`` threads (what Ray's threaded actor does).

Figures: images/s (all groups' members over the wall time from the first arrival to the last group returned), the
ratio to the baseline (median over ``--repeats``, with its range: the machine is shared), and the mean rows per
forward the batching loop reached. Results go to outputs/benchmarks/continuous_batching.json (untracked; --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(p) for p in (ROOT, ROOT / "benchmarks") if str(p) not in sys.path]
# First: it sets the offline, loopback-only environment before torch and diffusers load.
import scale_out as bench  # noqa: E402  benchmarks/scale_out.py: configs, the realistic model, alternation, machine info

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from raygrpo.contracts import PromptGroup  # noqa: E402
from raygrpo.rollout.continuous import ContinuousRolloutWorker, actor_concurrency  # noqa: E402
from raygrpo.rollout.worker import RolloutWorker  # noqa: E402

logger = logging.getLogger("continuous_batching")
ARRIVALS = ("burst", "stream")
STREAM_SPEEDUP = 4.0  # stream: groups arrive this many times faster than the plain worker serves them


def make_groups(count: int, size: int, repeat: int, prompts: list[str]) -> list[PromptGroup]:
    """``count`` groups with their own prompts and seeds (new seeds every repeat: no repeat reuses another's noise)."""
    return [PromptGroup(k, k % len(prompts), prompts[k % len(prompts)], size, seed=1000 * repeat + k, policy_version=0) for k in range(count)]


def arrive(groups: list[PromptGroup], interval: float, handle: Callable[[PromptGroup], None]) -> None:
    """``handle(group)`` for each group at its arrival time (``k * interval`` from now; 0: all at once)."""
    start = time.perf_counter()
    for k, group in enumerate(groups):
        delay = start + k * interval - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        handle(group)


def plain_side(worker: RolloutWorker, groups: list[PromptGroup], interval: float) -> None:
    """One group at a time, in arrival order, as they arrive (a queue in front of an ordered actor)."""
    queue: list[PromptGroup] = []
    arrived = threading.Condition()

    def enqueue(group: PromptGroup) -> None:
        with arrived:
            queue.append(group)
            arrived.notify()

    producer = threading.Thread(target=arrive, args=(groups, interval, enqueue), daemon=True)
    producer.start()
    for _ in groups:
        with arrived:
            arrived.wait_for(lambda: queue)
            group = queue.pop(0)
        worker.generate(group)
    producer.join()


def continuous_side(worker: ContinuousRolloutWorker, groups: list[PromptGroup], interval: float) -> None:
    """Every group in a thread of its own as it arrives, at most ``actor_concurrency`` at once (Ray's thread pool)."""
    with ThreadPoolExecutor(max_workers=actor_concurrency(worker.config)) as pool:
        futures = []
        arrive(groups, interval, lambda group: futures.append(pool.submit(worker.generate, group)))
        for future in wait(futures).done:
            future.result()  # a failed group fails the benchmark


def run(args: argparse.Namespace) -> dict:
    trunc = min(6, args.steps - 1)  # DGPO's training settings only have to be valid for this many rollout steps
    common = [f"algorithm.group_size={args.group_size}", f"rollout.num_steps={args.steps}", f"algorithm.trunc_steps={trunc}"]
    common.append(f"algorithm.num_train_timesteps={min(4, trunc + 1)}")
    if args.smoke:
        common += ["model.max_sequence_length=8"]
    plain = RolloutWorker(bench.make_config("dgpo", args, *common, f"rollout.micro_batch_size={args.group_size}"))
    batched = {
        b: ContinuousRolloutWorker(bench.make_config("dgpo", args, *common, "rollout.continuous_batching=true", f"rollout.micro_batch_size={b}"))
        for b in args.batch_sizes
    }
    torch.set_num_threads(args.threads)  # every side alike (the workers set their own from rollout.num_cpus)
    prompts = list(plain.config.data.prompts or ["a photo of a cat"])
    # Seconds per group of the plain worker, for the stream's arrival interval (also warms every prompt's encoding).
    start = time.perf_counter()
    plain_side(plain, make_groups(args.groups, args.group_size, 0, prompts), 0.0)
    per_group = (time.perf_counter() - start) / args.groups
    report = {}
    for arrival in args.arrivals:
        interval = per_group / STREAM_SPEEDUP if arrival == "stream" else 0.0
        sides = [lambda r, i=interval: plain_side(plain, make_groups(args.groups, args.group_size, r, prompts), i)]
        sides += [
            lambda r, w=w, i=interval: continuous_side(w, make_groups(args.groups, args.group_size, r, prompts), i) for w in batched.values()
        ]
        counters = {b: (w.batcher.forwards, w.batcher.rows) for b, w in batched.items()}
        cpu = [[] for _ in sides]  # this process's CPU seconds per call: less sensitive than wall time to other load
        timed = [cpu_timed(side, cpu[k]) for k, side in enumerate(sides)]
        seconds = bench.alternate(*timed[:2], args.repeats, args.device, *timed[2:])  # per side, in the order of `sides`
        images = args.groups * args.group_size
        rates = [[images / s for s in side] for side in seconds]  # [sides][repeats]: the plain worker first
        cpu_rates = [[images / s for s in calls[1:]] for calls in cpu]  # the warm-up call dropped
        for k, (b, worker) in enumerate(batched.items(), start=1):
            forwards, rows = worker.batcher.forwards - counters[b][0], worker.batcher.rows - counters[b][1]
            ratios = [value / base for value, base in zip(rates[k], rates[0])]
            cpu_ratios = [value / base for value, base in zip(cpu_rates[k], cpu_rates[0])]
            report[f"{arrival}_batch{b}"] = bench.figure(
                f"ContinuousRolloutWorker, at most {b} rows per forward, {arrival} arrivals", "images/s", rates[k], rates[0],
                f"RolloutWorker, one group at a time (forwards of {min(args.group_size, b)} rows)",
                ratio_min=min(ratios), ratio_max=max(ratios), ratios=ratios, mean_rows_per_forward=rows / max(forwards, 1),
                cpu_ratio=statistics.median(cpu_ratios), cpu_ratio_min=min(cpu_ratios), cpu_ratio_max=max(cpu_ratios),
                groups=args.groups, group_size=args.group_size, num_steps=args.steps, arrival_interval_s=interval,
            )  # fmt: skip
            logger.info("%s_batch%d: %s", arrival, b, summary(report[f"{arrival}_batch{b}"]))
    return report


def cpu_timed(side: Callable[[int], None], record: list[float]) -> Callable[[int], None]:
    """``side``, appending the CPU seconds this process spends in each call to ``record`` (every thread counted)."""

    def call(repeat: int) -> None:
        start = time.process_time()
        side(repeat)
        record.append(time.process_time() - start)

    return call


def summary(f: dict) -> str:
    return (
        f"{f['value']:.4g} vs {f['baseline']:.4g} images/s: ratio {f['ratio']:.2f} (range {f['ratio_min']:.2f}-{f['ratio_max']:.2f}), "
        f"per CPU-second ratio {f['cpu_ratio']:.2f} ({f['cpu_ratio_min']:.2f}-{f['cpu_ratio_max']:.2f}), {f['mean_rows_per_forward']:.1f} rows per forward"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=32, help="groups per measured run")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--batches", default="8,16", help="comma-separated rollout.micro_batch_size values of the continuous side")
    p.add_argument("--steps", type=int, default=10, help="rollout.num_steps (DGPO: 10 DPM-Solver++ steps)")
    p.add_argument("--arrival", default="burst,stream", help=f"comma-separated arrival patterns: {','.join(ARRIVALS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side after one warm-up (median and range reported)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, every side")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--realistic", action="store_true", help="scale_out.py's FLUX.1-width model (2 + 4 blocks) instead of the tiny one")
    p.add_argument("--resolution", type=int, default=bench.Realistic.resolution, help="--realistic: image size")
    p.add_argument("--smoke", action="store_true", help="smallest sizes (tests)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "continuous_batching.json")
    p.add_argument("--work", type=Path, default=None, help="folder for built models and run outputs (default: a temporary one)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batches.split(",") if b.strip()]
    args.arrivals = [a.strip() for a in args.arrival.split(",") if a.strip()]
    if set(args.arrivals) - set(ARRIVALS):
        p.error(f"--arrival: unknown patterns {sorted(set(args.arrivals) - set(ARRIVALS))}; choose from {','.join(ARRIVALS)}")
    if args.steps < 2 or args.group_size < 1 or args.groups < 1 or not args.batch_sizes:
        p.error("--steps must be >= 2, --group-size and --groups >= 1, --batches non-empty")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    args.micro_batch = None  # scale_out.make_config's own option: each side sets its micro-batch itself
    args.size = bench.Realistic(resolution=args.resolution)
    return args


def main(argv: list[str] | None = None) -> dict:
    bench.quiet_logging()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="raygrpo-continuous-") as tmp:
        args.work = args.work or Path(tmp)
        if args.realistic:
            cache = Path(os.environ.get("RAYGRPO_CACHE") or Path.home() / ".cache" / "raygrpo")
            args.model_folder = bench.build_realistic_flux(cache / args.size.folder_name(), args.size, args.device)
        report = {"machine": bench.machine(args.device), "settings": {k: str(v) for k, v in vars(args).items()}}
        report["figures"] = run(args)
    report["machine"]["loadavg_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print("| figure | images/s | plain worker | ratio (median) | range | per CPU-second ratio (range) | rows per forward |")
    print("|---|---|---|---|---|---|---|")
    for name, f in report["figures"].items():
        print(
            f"| {name} | {f['value']:.4g} | {f['baseline']:.4g} | {f['ratio']:.2f} | {f['ratio_min']:.2f}-{f['ratio_max']:.2f} "
            f"| {f['cpu_ratio']:.2f} ({f['cpu_ratio_min']:.2f}-{f['cpu_ratio_max']:.2f}) | {f['mean_rows_per_forward']:.1f} |"
        )
    print(f"written: {args.out}")
    return report


if __name__ == "__main__":
    main()
