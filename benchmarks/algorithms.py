"""Every algorithm on the tiny task: generated samples and time each needs to reach the same reward.

    python benchmarks/algorithms.py --seeds 0 1 2 --target -3.0            # every algorithm of ALGORITHMS
    python benchmarks/algorithms.py --algorithms dancegrpo dgpo --steps 20
    python benchmarks/algorithms.py --algorithms dancegrpo dgpo --steps 3 --set run.in_process=true   # no Ray (tests)

Each algorithm runs its tiny preset (the tiny FLUX of cluster/tiny.yaml, the JPEG compressibility reward,
minus the JPEG size in kB) through the real system, ``python -m raygrpo.run PRESET run.seed=S train.steps=N``,
once per seed. Every run joins ONE Ray cluster started here on loopback (or ``--ray-address``), and the
runs go one after another, seeds interleaved across algorithms so that all see the same machine load. Not
concurrently: on 2 cores two runs at once share the cores and each step's time then measures the
neighbour as much as the algorithm (measured: benchmarks/README.md). Each run's metrics.jsonl gives:

* reached: the first step ``s`` whose running mean of ``reward/total/mean`` over steps ``s-2..s``
  (``WINDOW`` = 3) is at least ``--target``; a run shorter than the window reaches nothing.
* steps, samples, seconds to the target: ``s``, the images generated in steps ``1..s``
  (``samples/generated``), and the sum of those steps' ``time/step`` (start-up and the run's end excluded,
  the same for all). Reported as the median and the range (min-max) over the seeds that reached it.
* seconds per step (mean over all steps), bytes per sample that reach the learner
  (``rollout/bytes_per_sample``), first and last reward (means of the first and last ``WINDOW`` steps).

``--set KEY=VALUE`` adds config overrides to every run (checked with the presets). With ``run.in_process=true``
the runs use no Ray and no cluster starts: the test's smoke run, which needs no actor start-ups; the README's
figures run on Ray, as a user's runs do.

A preset that is missing, or whose rewards are not exactly the one JPEG reward at weight 1 (so that
``reward/total/mean`` is the same quantity for every algorithm), stops the benchmark before anything runs.
Writes ``--out`` (default outputs/benchmarks/algorithms.json, untracked) with every run, the summary and
the markdown table it prints; ``make figures`` (scripts/figures.py) runs it and puts the table into the README.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from raygrpo.config import Config, ConfigError, load_config
from raygrpo.local_cluster import start_local_cluster
from raygrpo.placement import plan_totals, resource_plan

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS: dict[str, str] = {
    "dancegrpo": "cluster/tiny.yaml",
    "dgpo": "cluster/tiny_dgpo.yaml",
    "flow_grpo": "cluster/tiny_flow_grpo.yaml",
    "flow_grpo_fast": "cluster/tiny_flow_grpo_fast.yaml",
    "mixgrpo": "cluster/tiny_mixgrpo.yaml",
    "diffusionnft": "cluster/tiny_diffusionnft.yaml",
}
REWARD_KIND = "jpeg_compressibility"
WINDOW = 3  # steps in the running mean that must reach the target (one step's mean over 16 images is noisy)


@dataclass(frozen=True)
class RunResult:
    """One seed of one algorithm. The ``*_to_target`` fields are None when the target was not reached."""

    algorithm: str
    seed: int
    reached: bool
    steps_to_target: int | None
    samples_to_target: int | None
    seconds_to_target: float | None
    seconds_per_step: float
    samples_per_step: float
    bytes_per_sample: float
    first_reward: float
    last_reward: float
    steps: int
    wall_seconds: float  # the whole subprocess, start-up and the run's end included
    run_dir: str


def check_presets(names: list[str], root: Path = ROOT, overrides: list[str] = ()) -> dict[str, Config]:
    """Each name's preset config with ``overrides`` (``--set``); SystemExit naming every missing, invalid or incomparable preset."""
    problems, configs = [], {}
    for name in names:
        preset = ALGORITHMS[name]
        try:
            config = load_config(root / preset, list(overrides))
        except ConfigError as exc:
            fix = "fix --set, or " if overrides else ""
            problems.append(f"{name}: {exc}; {fix}leave it out with --algorithms (the others: {', '.join(n for n in names if n != name)})")
            continue
        rewards = [(r.kind, r.weight) for r in config.rewards]
        if rewards != [(REWARD_KIND, 1.0)]:
            problems.append(
                f"{name}: {preset} scores with {rewards} (kind, weight); the benchmark compares every algorithm on the one "
                f"reward [({REWARD_KIND!r}, 1.0)]: give the preset that reward alone"
            )
        configs[name] = config
    if problems:
        raise SystemExit("benchmarks/algorithms.py: cannot compare these presets:\n" + "\n".join(f"  - {p}" for p in problems))
    return configs


def run_once(name: str, preset: str, seed: int, args: argparse.Namespace, env: dict[str, str]) -> RunResult:
    """One ``python -m raygrpo.run`` joining the cluster in ``env["RAY_ADDRESS"]``; RuntimeError with its stderr if it fails."""
    # No galleries, no TensorBoard: the benchmark times training; PNGs written every 10 steps would land in some steps' times.
    # resume=never: an unfinished run left in --work by an interrupted benchmark is never continued.
    overrides = [f"run.seed={seed}", f"train.steps={args.steps}", f"run.output_root={args.work / name}", "run.resume=never"]
    overrides += ["logging.sample_every=0", "logging.tensorboard=false", *args.set]
    command = [sys.executable, "-m", "raygrpo.run", preset, *overrides]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    found = re.search(r"^outputs: (.+)$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}): {' '.join(command)}\n{proc.stderr[-3000:]}")
    run_dir = Path(found.group(1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return RunResult(algorithm=name, seed=seed, wall_seconds=wall, run_dir=str(run_dir), **reach(records, args.target))


def reach(records: list[dict], target: float) -> dict:
    """The per-run figures of the module docstring from a run's metrics records (one per step, in order)."""
    rewards = np.array([r["reward/total/mean"] for r in records])  # [steps]
    seconds = np.cumsum([r["time/step"] for r in records])  # [steps]
    samples = np.cumsum([r["samples/generated"] for r in records])  # [steps]
    hit = np.array([], dtype=int)
    if len(rewards) >= WINDOW:
        running = np.convolve(rewards, np.ones(WINDOW) / WINDOW, mode="valid")  # running[i] averages steps i..i+WINDOW-1
        hit = np.nonzero(running >= target)[0]
    last = int(hit[0]) + WINDOW - 1 if len(hit) else None  # index of the window's last step
    return {
        "reached": last is not None,
        "steps_to_target": None if last is None else last + 1,
        "samples_to_target": None if last is None else int(samples[last]),
        "seconds_to_target": None if last is None else float(seconds[last]),
        "seconds_per_step": float(seconds[-1] / len(records)),
        "samples_per_step": float(samples[-1] / len(records)),
        "bytes_per_sample": float(np.mean([r["rollout/bytes_per_sample"] for r in records])),
        "first_reward": float(rewards[:WINDOW].mean()),
        "last_reward": float(rewards[-WINDOW:].mean()),
        "steps": len(records),
    }


def summarise(runs: list[RunResult]) -> dict:
    """One algorithm's seeds: reached k/n; median, min and max of the figures to target over the seeds that reached it."""
    ok = [r for r in runs if r.reached]
    summary: dict = {"reached": len(ok), "seeds": len(runs)}
    for key in ("steps_to_target", "samples_to_target", "seconds_to_target"):
        values = [getattr(r, key) for r in ok]
        summary[key] = {"median": float(np.median(values)), "min": min(values), "max": max(values)} if ok else None
    for key in ("seconds_per_step", "samples_per_step", "bytes_per_sample", "first_reward", "last_reward"):
        summary[key] = float(np.mean([getattr(r, key) for r in runs]))
    return summary


def table(summary: dict[str, dict], presets: dict[str, str]) -> str:
    """The markdown table the benchmark prints and the README quotes (scripts/figures.py)."""

    def spread(figure: dict | None, fmt: str) -> str:
        if figure is None:
            return "not reached"
        return f"{figure['median']:{fmt}} ({figure['min']:{fmt}}–{figure['max']:{fmt}})"

    rows = [
        "| algorithm (preset) | reached | steps to target | samples to target | seconds to target | s per step | "
        "samples per step | bytes per sample | reward, first → last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        rows.append(
            f"| {name} (`{Path(presets[name]).name}`) | {s['reached']}/{s['seeds']} | {spread(s['steps_to_target'], '.0f')} | "
            f"{spread(s['samples_to_target'], '.0f')} | {spread(s['seconds_to_target'], '.2f')} | {s['seconds_per_step']:.2f} | "
            f"{s['samples_per_step']:.0f} | {s['bytes_per_sample']:,.0f} | {s['first_reward']:.3f} → {s['last_reward']:.3f} |"
        )
    return "\n".join(rows) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS), help="default: all")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=-3.0, help="reward the running mean must reach (JPEG kB, negative)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (train.steps; the presets' own 30), the same for all")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-algorithms", help="the runs' output root")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "algorithms.json",
                        help="the results file (outside tracked files unless you say so)")  # fmt: skip
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once (default 1: on a 2-core machine concurrent runs inflate each other's step times)")  # fmt: skip
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one on loopback")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run (run.in_process=true: no Ray, no cluster)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.parallel < 1 or args.steps < 1:
        parser.error(f"--parallel ({args.parallel}) and --steps ({args.steps}) must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configs = check_presets(list(dict.fromkeys(args.algorithms)), overrides=args.set)  # before the cluster starts
    presets = {name: ALGORITHMS[name] for name in configs}
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    load_before = list(os.getloadavg())
    cluster = None
    on_ray = not all(c.run.in_process for c in configs.values())  # --set run.in_process=true: no Ray, no cluster
    if on_ray and not args.ray_address:  # logical CPUs for --parallel runs of the largest plan; stops only itself, not other Rays
        cpus = math.ceil(args.parallel * max(plan_totals(resource_plan(c))["CPU"] for c in configs.values()))
        cluster = start_local_cluster(num_cpus=max(cpus, 2), env=env, dashboard=False)
    if on_ray:
        env["RAY_ADDRESS"] = args.ray_address or cluster.address
    # Seeds interleaved across algorithms: every algorithm sees the same drift in machine load.
    order = [(name, seed) for seed in args.seeds for name in presets]
    runs: dict[str, list[RunResult]] = {name: [] for name in presets}
    pool = ThreadPoolExecutor(max_workers=args.parallel)  # threads only wait on the subprocesses
    try:
        futures = [pool.submit(run_once, name, presets[name], seed, args, env) for name, seed in order]
        for (name, seed), future in zip(order, futures):
            r = future.result()  # a failed run stops the benchmark: the runs not started yet are cancelled
            runs[name].append(r)
            write_report(args, presets, runs, load_before, complete=False)  # what finished survives a later failure
            reached = f"step {r.steps_to_target}, {r.seconds_to_target:.2f} s" if r.reached else "not reached"
            print(f"{name:15s} seed {seed}: {reached}; {r.seconds_per_step:.2f} s/step ({r.wall_seconds:.0f} s in all)", flush=True)
    finally:
        pool.shutdown(cancel_futures=True)
        if cluster is not None:
            cluster.stop()
    report = write_report(args, presets, runs, load_before, complete=True)
    print(f"\ntarget {args.target}, seeds {args.seeds}, {args.steps} steps each:\n\n{report['table']}\nwritten: {args.out}")


def write_report(args: argparse.Namespace, presets: dict[str, str], runs: dict[str, list[RunResult]], load_before: list[float],
                 complete: bool) -> dict:  # fmt: skip
    """``--out``: settings, machine, summary, table and every run; ``complete`` false while runs are still to come."""
    summary = {name: summarise(results) for name, results in runs.items() if results}
    report = {
        "complete": complete,
        "target": args.target,
        "seeds": args.seeds,
        "steps": args.steps,
        "window": WINDOW,
        "presets": presets,
        "parallel": args.parallel,
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu_count": os.cpu_count(), "arch": platform.machine(), "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())},
        "summary": summary,
        "table": table(summary, presets),
        "runs": {name: [asdict(r) for r in results] for name, results in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return report

if __name__ == "__main__":
    main()
