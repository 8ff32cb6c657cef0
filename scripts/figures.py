"""Every figure the README quotes, measured again by one command: ``make figures``.

    .venv/bin/python scripts/figures.py                 # demo runs, eval, both benchmarks (~13 min on 2 quiet cores)
    .venv/bin/python scripts/figures.py --only demo     # just the demo runs and the eval table (~2 min)
    .venv/bin/python scripts/figures.py --only algorithms   # just benchmarks/algorithms.py's table (~12-16 min)
    .venv/bin/python scripts/figures.py --only scale_out    # just benchmarks/scale_out.py's table (~1-3 min)

Runs the commands a user runs (``python -m raygrpo.run`` on a local Ray instance, ``python -m raygrpo.eval``,
``benchmarks/*.py``) in a scratch folder, writes what they printed and measured to ``docs/figures.json``,
and rewrites the README's figure blocks (between ``<!-- figures:NAME -->`` and ``<!-- /figures -->``)
from that file. ``tests/test_figures.py`` checks that the README blocks are exactly what the file says,
and the tiny-run tests check the file against what the code prints now.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures.json"
README = ROOT / "README.md"
# Every algorithm of benchmarks/algorithms.py, all with the same seeds and steps.
ALGORITHMS_ARGS = ("--seeds", "0", "1", "2", "--steps", "30", "--target", "-3.0")
BLOCK = re.compile(r"(<!-- figures:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.DOTALL)


def _run(command: list[str], env: dict[str, str]) -> tuple[str, float]:
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, time.monotonic() - start


def demo(preset: str, work: Path, env: dict[str, str]) -> dict:
    """``python -m raygrpo.run <preset>`` as ``make demo`` runs it (a local Ray instance): what it prints, its curve, its time."""
    stdout, seconds = _run([sys.executable, "-m", "raygrpo.run", preset, f"run.output_root={work}"], env)
    run_dir = Path(re.search(r"^outputs: (.+)$", stdout, re.MULTILINE).group(1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    totals = [r["reward/total/mean"] for r in records]
    best = max(range(len(totals)), key=totals.__getitem__)
    return {
        "preset": preset,
        "printed": stdout.strip().splitlines()[-2],  # "reward (weighted total, ...): first step A -> last step B"
        "first": totals[0],
        "last": totals[-1],
        "best": totals[best],
        "best_step": best + 1,
        "steps": len(totals),
        "wall_seconds": round(seconds, 1),
        "bytes_per_sample": records[0]["rollout/bytes_per_sample"],
        "run_dir": str(run_dir),
    }


def evaluation(run_dir: str, work: Path, env: dict[str, str]) -> dict:
    out = work / "eval"
    _, seconds = _run([sys.executable, "-m", "raygrpo.eval", f"{run_dir}/config.yaml", "--checkpoint", f"{run_dir}/checkpoint-final",
                       "--prompts", "cluster/prompts/example.txt", "--best-of-n", "4", "--out", str(out)], env)  # fmt: skip
    document = json.loads((out / "eval.json").read_text())
    return {"table": document["table"].strip(), "prompts": len(document["prompts"]), "wall_seconds": round(seconds, 1)}


def benchmark(script: str, work: Path, env: dict[str, str], *args: str) -> dict:
    out = work / f"{Path(script).stem}.json"
    _, seconds = _run([sys.executable, script, "--out", str(out), *args], env)
    return {**json.loads(out.read_text()), "wall_seconds": round(seconds, 1)}


# ----- the README blocks, rendered from docs/figures.json -----


def render(name: str, figures: dict) -> str:
    return {"demo": _render_demo, "eval": _render_eval, "algorithms": _render_algorithms, "scale_out": _render_scale_out}[name](figures)


def numerics_host() -> dict:
    """What, besides the code and the versions, decides a CPU run's floating-point results: the CPU and the instruction
    set torch's kernels (ATen, MKL) dispatch to. AVX-512, AVX2 and older paths round differently: the first step's
    reward moves in its 4th decimal, and 30 steps of training on top of that can end 0.3 apart (the tiny DanceGRPO
    demo on one AVX-512 machine: last step -2.7884 with its own kernels, -2.6978 held to AVX2 with
    ``ATEN_CPU_CAPABILITY``/``MKL_ENABLE_INSTRUCTIONS``, -2.4780 with ``MKL_CBWR=COMPATIBLE`` and ATen's default
    kernels; -2.9376 on the machine of 2026-12-03)."""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)}
    flags = set(fields.get("flags", "").split())
    return {
        "cpu": fields.get("model name", platform.processor()),
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni"}),
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "torch": torch.__version__,
    }


def _render_demo(f: dict) -> str:
    d, g = f["demo"]["dancegrpo"], f["demo"]["dgpo"]
    host = f.get("demo_host")
    cpu = f" ({host['cpu']}, torch's {host['kernels']} kernels)" if host else ""
    return (
        f"On the {f['machine']}{cpu} it takes {d['wall_seconds']:.0f} s, start-up included; the reward (kB of JPEG, negative: images\n"
        f"become smoother) goes from {d['first']:.4f} to {d['last']:.4f} in {d['steps']} steps (best {d['best']:.4f}, at step {d['best_step']}).\n"
        f"It prints the folder it wrote:\n\n```\n{d['printed']}\noutputs: /path/to/raygrpo/outputs/tiny-YYYYmmdd-HHMMSS\n```\n\n"
        f"The same task with DGPO (`cluster/tiny_dgpo.yaml`): {g['wall_seconds']:.0f} s, reward {g['first']:.4f} → {g['last']:.4f}\n"
        f"(best {g['best']:.4f}); {g['bytes_per_sample']:,.0f} bytes per sample reach the learner against DanceGRPO's {d['bytes_per_sample']:,.0f}.\n"
        f"A CPU with another instruction set rounds differently: the first step's reward agrees to about 1e-3, and the\n"
        f"training from there follows a slightly different path (`make figures` measures it on yours).\n"
    )


def _render_eval(f: dict) -> str:
    e = f["eval"]
    return (
        f"On the checkpoint of the demo run above, on {e['prompts']} held-out prompts, 8 Euler steps ({e['wall_seconds']:.0f} s on the\n"
        f"{f['machine']}):\n\n{e['table']}\n"
    )


def _render_algorithms(f: dict) -> str:
    r = f["algorithms"]  # benchmarks/algorithms.py's report: it renders its own table, printed and quoted alike
    head = (
        f"Measured {r['date']} on the {f['machine']}, target {r['target']}, seeds {r['seeds']}, {r['steps']} steps per run, "
        f"{r['parallel']} run at a time ({r['wall_seconds']:.0f} s in all; load average {r['machine']['loadavg_before'][0]:.1f} "
        f"before, {r['machine']['loadavg_after'][0]:.1f} after):\n\n"
    )
    return head + r["table"]


SCALE_OUT_ROWS = [
    ("a_rollout_ode_dgpo", "rollout worker, ODE / DGPO preset, images/s", "`FluxPipeline` loop"),
    ("a_rollout_sde_dancegrpo", "rollout worker, SDE + log-probs / DanceGRPO preset, images/s", "bare SDE loop"),
    ("b_learner_dancegrpo", "learner step, DanceGRPO, s", "forward/backward, gradient clipping, AdamW"),
    ("b_learner_dgpo", "learner step, DGPO, s", "DGPO in plain PyTorch (reference and base forwards included)"),
    ("c_end_to_end_staleness0", "end to end, 2 rollout workers, `max_staleness` 0, samples/s", "serial sum of stages"),
    ("c_end_to_end_staleness1", "end to end, `max_staleness` 1, samples/s", "serial sum of stages"),
    ("c_staleness1_vs_staleness0", "end to end, `max_staleness` 1 vs 0, samples/s", "`max_staleness` 0"),
    ("d_weight_sync", "weight sync to 2 workers, tiny FLUX, s", "floor: `ray.put`/`get` + one `copy_` into the parameters"),
    ("d_weight_sync_large", "weight sync to 2 workers, 145 MB FLUX, s", "floor: `ray.put`/`get` + one `copy_` into the parameters"),
]


def _render_scale_out(f: dict) -> str:
    s = f["scale_out"]["figures"]
    rows = [
        "| stage (tiny FLUX, CPU) | raygrpo | bare baseline | ratio (median; range over the repeats) | ratio in CPU seconds |",
        "|---|---|---|---|---|",
    ]
    for key, what, baseline in SCALE_OUT_ROWS:
        if key not in s:
            continue
        fig = s[key]
        ratios = [v / b for v, b in zip(fig.get("values", []), fig.get("baseline_values", [])) if b]
        spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else ""
        # CPU seconds of the process (parts a and b, in process): less moved than wall time by other work on the machine
        cpu = f"{fig['cpu_ratio']:.2f} ({min(fig['cpu_ratios']):.2f}–{max(fig['cpu_ratios']):.2f})" if "cpu_ratio" in fig else "–"
        rows.append(f"| {what} | {fig['value']:.4g} | {baseline}: {fig['baseline']:.4g} | {fig['ratio']:.2f}{spread} | {cpu} |")
    date = f["scale_out"].get("machine", {}).get("date_utc", f["date"])[:10]  # its own run's (`--only demo` keeps it)
    head = f"Measured {date} on the {f['machine']} ({f['scale_out']['wall_seconds']:.0f} s):\n\n"
    return head + "\n".join(rows) + "\n"


def rewrite_readme(figures: dict, readme: Path = README) -> None:
    text = readme.read_text()
    names = {m.group("name") for m in BLOCK.finditer(text)}
    missing = {"demo", "eval", "algorithms", "scale_out"} - names
    if missing:
        raise SystemExit(f"README.md lacks the figure blocks {sorted(missing)} (<!-- figures:NAME --> ... <!-- /figures -->)")
    readme.write_text(BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), figures) + m.group(4), text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", choices=["demo", "benchmarks", "algorithms", "scale_out"], help="regenerate only these figures (the others stay as they are)"
    )
    parser.add_argument("--render", action="store_true", help="only rewrite the README blocks from docs/figures.json")
    args = parser.parse_args()
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    if not args.render:
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("RAY_ADDRESS", None)
        cores = os.cpu_count() or 1
        figures.update({"date": time.strftime("%Y-%m-%d"), "machine": f"{cores}-core {platform.machine()} CPU machine without a GPU"})
        with tempfile.TemporaryDirectory(prefix="raygrpo-figures-") as scratch:
            work = Path(scratch)
            if args.only in (None, "demo"):
                figures["demo"] = {name: demo(preset, work, env) for name, preset in (("dancegrpo", "cluster/tiny.yaml"), ("dgpo", "cluster/tiny_dgpo.yaml"))}
                figures["demo_host"] = numerics_host()  # tests/test_run_in_process.py compares the numbers exactly on such a host
                figures["eval"] = evaluation(figures["demo"]["dancegrpo"]["run_dir"], work, env)
                for run in figures["demo"].values():
                    run.pop("run_dir")
                print(f"demo: {figures['demo']['dancegrpo']['printed']}", flush=True)
            if args.only in (None, "benchmarks", "algorithms"):
                figures["algorithms"] = benchmark("benchmarks/algorithms.py", work, env, "--work", str(work / "algorithms"), *ALGORITHMS_ARGS)
                for run in (r for runs in figures["algorithms"]["runs"].values() for r in runs):
                    run.pop("run_dir", None)
            if args.only in (None, "benchmarks", "scale_out"):
                figures["scale_out"] = benchmark("benchmarks/scale_out.py", work, env, "--work", str(work / "scale"))
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text(json.dumps(figures, indent=1) + "\n")
    rewrite_readme(figures)
    print("written: " + ("" if args.render else f"{FIGURES.relative_to(ROOT)}, ") + "README.md figure blocks")


if __name__ == "__main__":
    main()
