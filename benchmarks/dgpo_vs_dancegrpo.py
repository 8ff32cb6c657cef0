"""DGPO vs DanceGRPO on the tiny task: time and generated samples to reach the same reward.

Runs ``python -m raygrpo.run`` (the real system: Ray actors, object store, controller) for both
tiny presets with several seeds on one local Ray cluster started here on loopback, then reads each
run's metrics.jsonl. A run "reaches" the target at the first step whose 3-step running mean of the
reward is at least ``--target``; time is the sum of its steps' wall-clock seconds (start-up
excluded, the same for both), samples are the images generated up to that step.

    python benchmarks/dgpo_vs_dancegrpo.py --seeds 0 1 2 --target -3.0

Writes ``--out`` (default outputs/benchmarks/dgpo_vs_dancegrpo.json, untracked) and prints a table;
``make figures`` runs it and puts the numbers the README quotes into docs/figures.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from raygrpo.local_cluster import start_local_cluster

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"dancegrpo": "cluster/tiny.yaml", "dgpo": "cluster/tiny_dgpo.yaml"}


def run_once(algorithm: str, seed: int, steps: int, out: Path, env: dict) -> Path:
    command = [sys.executable, "-m", "raygrpo.run", PRESETS[algorithm], f"run.seed={seed}", f"train.steps={steps}", f"run.output_root={out}"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{algorithm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return Path(re.search(r"^outputs: (.+)$", proc.stdout, re.MULTILINE).group(1))


def reach(run_dir: Path, target: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = np.array([r["reward/total/mean"] for r in records])
    running = np.convolve(rewards, np.ones(3) / 3, mode="valid")  # running[i] averages steps i..i+2
    seconds = np.cumsum([r["time/step"] for r in records])
    samples = np.cumsum([r["samples/generated"] for r in records])
    hit = np.nonzero(running >= target)[0]
    step = int(hit[0]) + 2 if len(hit) else None  # index of the last step in the first window that reaches it
    return {
        "reached": step is not None,
        "step": None if step is None else step + 1,
        "seconds": None if step is None else float(seconds[step]),
        "samples": None if step is None else int(samples[step]),
        "seconds_per_step": float(np.mean([r["time/step"] for r in records])),
        "bytes_per_sample": float(records[0]["rollout/bytes_per_sample"]),
        "first_reward": float(rewards[:3].mean()),
        "last_reward": float(rewards[-3:].mean()),
        "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=-3.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-dgpo-vs-dancegrpo", help="the runs' output root")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "dgpo_vs_dancegrpo.json",
                        help="the results file (outside tracked files unless you say so)")  # fmt: skip
    args = parser.parse_args()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cluster = start_local_cluster(num_cpus=4, env=env, dashboard=False)  # stops only itself, never other Ray instances
    env["RAY_ADDRESS"] = cluster.address
    results: dict[str, list[dict]] = {name: [] for name in PRESETS}
    try:
        for seed in args.seeds:
            for name in PRESETS:  # interleaved, so both see the same machine load
                started = time.time()
                results[name].append({"seed": seed, **reach(run_once(name, seed, args.steps, args.work, env), args.target)})
                print(f"{name:10s} seed {seed}: {results[name][-1]} ({time.time() - started:.0f} s)", flush=True)
    finally:
        cluster.stop()
    summary = {}
    for name, runs in results.items():
        ok = [r for r in runs if r["reached"]]
        summary[name] = {
            "reached": f"{len(ok)}/{len(runs)}",
            "median_seconds": float(np.median([r["seconds"] for r in ok])) if ok else None,
            "median_samples": float(np.median([r["samples"] for r in ok])) if ok else None,
            "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in runs])),
            "bytes_per_sample": float(np.mean([r["bytes_per_sample"] for r in runs])),
        }
    d, g = summary["dancegrpo"], summary["dgpo"]
    ratios = {}
    if d["median_seconds"] and g["median_seconds"]:
        ratios = {"time_dancegrpo_over_dgpo": d["median_seconds"] / g["median_seconds"],
                  "samples_dancegrpo_over_dgpo": d["median_samples"] / g["median_samples"]}  # fmt: skip
    ratios["bytes_per_sample_dancegrpo_over_dgpo"] = d["bytes_per_sample"] / g["bytes_per_sample"]
    report = {"target": args.target, "seeds": args.seeds, "steps": args.steps, "summary": summary, "ratios": ratios, "runs": results}
    path = args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
