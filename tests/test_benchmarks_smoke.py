"""benchmarks/scale_out.py at its smallest sizes: every part runs and writes every figure, finite and positive."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from raygrpo.config import load_config

from .conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "scale_out.py"
IN_PROCESS = {"a_rollout_ode_dgpo", "a_rollout_sde_dancegrpo", "b_learner_dancegrpo", "b_learner_dgpo"}


def load_script():
    spec = importlib.util.spec_from_file_location("scale_out", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_out"] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


def run_script(tmp_path, *args: str, timeout: int = 300) -> dict:
    out = tmp_path / "scale_out.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--repeats", "1", "--out", str(out), "--work", str(tmp_path / "work"), *args]
    proc = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def assert_figures(report: dict, expected: set[str]) -> None:
    assert set(report["figures"]) == expected
    for name, fig in report["figures"].items():
        for key in ("value", "baseline", "ratio"):
            assert math.isfinite(fig[key]) and fig[key] > 0, (name, key, fig[key])
        assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline"]), name
        assert fig["unit"] and fig["baseline_what"], name
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1


def test_in_process_parts_write_every_figure(tmp_path):
    report = run_script(tmp_path, "--only", "a,b")
    assert_figures(report, IN_PROCESS)
    figures = report["figures"]
    assert figures["a_rollout_sde_dancegrpo"]["micro_batch"] == 1  # the DanceGRPO preset's batch-invariant sampling
    assert figures["a_rollout_ode_dgpo"]["micro_batch"] == figures["a_rollout_ode_dgpo"]["group_size"] == 2
    # DanceGRPO trains each sample alone at floor((3 - 1) * 0.6) = 1 transition; DGPO whole groups at 2 noise levels
    assert figures["b_learner_dancegrpo"]["batch_per_forward"] == 1
    assert figures["b_learner_dancegrpo"]["forwards_with_grad"] == figures["b_learner_dancegrpo"]["samples"] == 4
    assert figures["b_learner_dgpo"]["forwards_with_grad"] == 2 * 2 and figures["b_learner_dgpo"]["batch_per_forward"] == 2


@pytest.mark.slow
def test_realistic_path_runs_reduced_on_cpu(tmp_path, monkeypatch):
    """The --realistic model (FLUX.1 layout: 128-wide heads, 64 input channels, 16 latent channels) at a reduced width."""
    monkeypatch.setenv("RAYGRPO_CACHE", str(tmp_path / "cache"))
    args = ["--realistic", "--only", "a,b", "--width", "128", "--layers", "1,1", "--text-width", "64", "--vae-width", "8"]
    report = run_script(tmp_path, *args, "--resolution", "64")
    assert_figures(report, IN_PROCESS)
    config = json.loads((tmp_path / "cache" / "bench-flux-w128-d1-s1-t64-v8" / "transformer" / "config.json").read_text())
    assert (config["attention_head_dim"], config["in_channels"], config["axes_dims_rope"]) == (128, 64, [16, 56, 56])


@pytest.mark.slow
def test_ray_parts_write_the_staleness_and_weight_sync_figures(tmp_path, ray_cluster):
    """Parts c and d in one script run (one driver, one set of actor imports)."""
    report = run_script(tmp_path, "--only", "c,d", "--ray-address", ray_cluster.address)
    assert_figures(
        report, {"c_end_to_end_staleness0", "c_end_to_end_staleness1", "c_staleness1_vs_staleness0", "d_weight_sync", "d_weight_sync_large"}
    )
    figures = report["figures"]
    assert figures["c_end_to_end_staleness0"]["staleness_max"] == 0.0  # strictly on-policy
    assert figures["c_end_to_end_staleness1"]["staleness_max"] == 1.0  # generation overlapped the previous update
    assert figures["c_end_to_end_staleness0"]["steps_measured"] == 2  # 3 steps, the first skipped
    assert figures["c_end_to_end_staleness1"]["steps_measured"] == 1  # and the last: nothing left to overlap with
    assert figures["d_weight_sync"]["workers"] == 2 and figures["d_weight_sync"]["bytes"] > 0
    assert figures["d_weight_sync_large"]["bytes"] > 10 * figures["d_weight_sync"]["bytes"]  # the 256-wide FLUX of --smoke
    for name in ("d_weight_sync", "d_weight_sync_large"):  # the floor (put, get, one copy_) and the raw transfer beside it
        sync = figures[name]
        assert sync["raw_transfer"] > 0 and sync["ratio_vs_raw_transfer"] == pytest.approx(sync["value"] / sync["raw_transfer"])


def test_serial_sum_and_option_errors():
    bench = load_script()
    config = load_config(ROOT / "cluster" / "tiny.yaml", ["rollout.num_workers=2", "rewards.0.replicas=2"])
    record = {"time/rollout_worker_sum": 4.0, "time/reward/jpeg": 1.0, "time/learner": 0.5, "time/sync": 0.25}
    assert bench.serial_seconds(record, config) == pytest.approx(4.0 / 2 + 1.0 / 2 + 0.5 + 0.25)
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "a,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--realistic", "--only", "a,c"])
    args = bench.parse_args(["--only", "b", "--layers", "3,5", "--width", "1024"])
    assert args.parts == ["b"] and (args.size.double_blocks, args.size.single_blocks, args.size.width) == (3, 5, 1024)
    assert bench.Realistic().pooled_width == 768  # FLUX.1's CLIP-L width from T5-XXL's 4096
