"""benchmarks/scale_out.py at its smallest sizes: every part runs and writes every figure, finite and positive;
benchmarks/algorithms.py: its reach/summary arithmetic, its preset checks, and two algorithms end to end.

Every part runs ``main`` in this process (no interpreter, torch and diffusers start-up per run); the Ray parts
(c, d) with this process as the driver of the session's cluster, as tests/test_scale_out.py drives its controllers."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from raygrpo.config import load_config

from .conftest import ROOT
from .conftest import load_script as load_named_script

SCRIPT = ROOT / "benchmarks" / "scale_out.py"
IN_PROCESS = {"a_rollout_ode_dgpo", "a_rollout_sde_dancegrpo", "b_learner_dancegrpo", "b_learner_dgpo"}


def load_script():
    return load_named_script(SCRIPT, "scale_out")


def smoke_args(tmp_path, *args: str) -> list[str]:
    return ["--smoke", "--repeats", "1", "--out", str(tmp_path / "scale_out.json"), "--work", str(tmp_path / "work"), *args]


@pytest.fixture
def run_main(tmp_path):
    """``run_main(*args)``: the script's ``main`` with ``--smoke`` in this process, its report read back from ``--out``.
    Afterwards the process-wide settings it changes are put back (torch threads and RNG, diffusers' and
    transformers' logging), so later tests see this session as it was."""
    import diffusers
    import transformers

    libraries = [diffusers.utils.logging, transformers.utils.logging]
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    bench = load_script()

    def run(*args: str) -> dict:
        bench.main(smoke_args(tmp_path, *args))
        return json.loads((tmp_path / "scale_out.json").read_text())

    yield run
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    for lib, (verbosity, progress_bar) in zip(libraries, saved):
        lib.set_verbosity(verbosity)
        (lib.enable_progress_bar if progress_bar else lib.disable_progress_bar)()


def assert_figures(report: dict, expected: set[str]) -> None:
    assert set(report["figures"]) == expected
    for name, fig in report["figures"].items():
        for key in ("value", "baseline", "ratio"):
            assert math.isfinite(fig[key]) and fig[key] > 0, (name, key, fig[key])
        assert fig["ratio"] == pytest.approx(fig["value"] / fig["baseline"]), name
        if name != "c_staleness1_vs_staleness0":  # two runs' steps, not pairs
            pairs = [v / b for v, b in zip(fig["values"], fig["baseline_values"])]
            assert fig["paired_ratio"] == pytest.approx(statistics.median(pairs)), name
        else:
            assert "paired_ratio" not in fig
        assert fig["unit"] and fig["baseline_what"], name
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1


def test_in_process_parts_write_every_figure(run_main):
    report = run_main("--only", "a,b")
    assert_figures(report, IN_PROCESS)
    figures = report["figures"]
    assert figures["a_rollout_sde_dancegrpo"]["micro_batch"] == 1  # the DanceGRPO preset's batch-invariant sampling
    assert figures["a_rollout_ode_dgpo"]["micro_batch"] == figures["a_rollout_ode_dgpo"]["group_size"] == 2
    # DanceGRPO trains each sample alone at floor((3 - 1) * 0.6) = 1 transition; DGPO whole groups at 2 noise levels
    assert figures["b_learner_dancegrpo"]["batch_per_forward"] == 1
    assert figures["b_learner_dancegrpo"]["forwards_with_grad"] == figures["b_learner_dancegrpo"]["samples"] == 4
    assert figures["b_learner_dgpo"]["forwards_with_grad"] == 2 * 2 and figures["b_learner_dgpo"]["batch_per_forward"] == 2
    for name in ("b_learner_dancegrpo", "b_learner_dgpo"):  # both sides' work besides the network, timed with stand-ins
        own = figures[name]["own_work_s"]
        assert 0 < own["raygrpo"] < figures[name]["value"] and 0 < own["baseline"] < figures[name]["baseline"], (name, own)
        assert own["excess_of_step"] == pytest.approx((own["raygrpo"] - own["baseline"]) / min(figures[name]["baseline_values"]))
        for side, split in figures[name]["time_split_s"].items():  # both sides timed piece by piece, alternating
            assert split["forward calls"] >= figures[name]["forwards_with_grad"] and split["optimizer calls"] >= 1, (name, side, split)
            assert 0 < split["forward"] + split["backward"] + split["optimizer"] < split["total"], (name, side, split)


def test_stand_in_networks_replace_the_forward_for_the_block_only():
    bench = load_script()
    network = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    before = network(x)
    with bench.stand_in_networks([network], "cpu"):
        out = network(hidden_states=x, return_dict=False)[0]  # the stand-in: one multiply by a trained scalar of 1
        assert torch.equal(out, x)
        out.sum().backward()  # a backward runs through it
    assert "forward" not in vars(network) and torch.equal(network(x), before)  # the class's forward is back


@pytest.mark.slow
def test_realistic_path_runs_reduced_on_cpu(tmp_path, monkeypatch, run_main):
    """The --realistic model (FLUX.1 layout: 128-wide heads, 64 input channels, 16 latent channels) at a reduced width,
    DanceGRPO's preset only (``--presets``: DGPO's parts are the tiny run's code at other sizes)."""
    monkeypatch.setenv("RAYGRPO_CACHE", str(tmp_path / "cache"))
    args = ["--realistic", "--only", "a,b", "--presets", "dancegrpo", "--width", "128", "--layers", "1,1", "--text-width", "64"]
    report = run_main(*args, "--vae-width", "8", "--resolution", "64")
    assert_figures(report, {"a_rollout_sde_dancegrpo", "b_learner_dancegrpo"})
    config = json.loads((tmp_path / "cache" / "bench-flux-w128-d1-s1-t64-v8" / "transformer" / "config.json").read_text())
    assert (config["attention_head_dim"], config["in_channels"], config["axes_dims_rope"]) == (128, 64, [16, 56, 56])


@pytest.mark.slow
def test_ray_parts_write_the_staleness_and_weight_sync_figures(ray_cluster, run_main):
    """Parts c and d in one ``main`` run, this process the driver of the session's cluster; (d)'s second model is
    built in the first one's actors."""
    report = run_main("--only", "c,d", "--ray-address", ray_cluster.address)
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
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "dancegrpo,flow_grpo"])  # parts a and b know two presets
    assert bench.parse_args([]).presets == ["dancegrpo", "dgpo"]
    args = bench.parse_args(["--only", "b", "--layers", "3,5", "--width", "1024"])
    assert args.parts == ["b"] and (args.size.double_blocks, args.size.single_blocks, args.size.width) == (3, 5, 1024)
    assert bench.Realistic().pooled_width == 768  # FLUX.1's CLIP-L width from T5-XXL's 4096


# ----- benchmarks/algorithms.py -----

ALGORITHMS_SCRIPT = ROOT / "benchmarks" / "algorithms.py"


def metrics(rewards: list[float], seconds: list[float]) -> list[dict]:
    return [
        {"reward/total/mean": r, "time/step": t, "samples/generated": 16.0, "rollout/bytes_per_sample": 100.0 + i}
        for i, (r, t) in enumerate(zip(rewards, seconds))
    ]


def test_algorithms_reach_is_the_first_window_whose_mean_reaches_the_target():
    bench = load_named_script(ALGORITHMS_SCRIPT, "bench_algorithms")
    assert bench.WINDOW == 3
    # running means over steps 1-3, 2-4, 3-5: -3.2, -2.9667, -3.1333: the window of steps 2-4 is the first to reach -3.0
    hit = bench.reach(metrics([-3.6, -3.0, -3.0, -2.9, -3.5], [1.0, 2.0, 3.0, 4.0, 5.0]), target=-3.0)
    assert (hit["reached"], hit["steps_to_target"], hit["samples_to_target"], hit["seconds_to_target"]) == (True, 4, 64, 10.0)
    assert hit["seconds_per_step"] == 3.0 and hit["samples_per_step"] == 16.0 and hit["bytes_per_sample"] == 102.0
    assert hit["first_reward"] == pytest.approx(-3.2) and hit["last_reward"] == pytest.approx(-9.4 / 3)
    miss = bench.reach(metrics([-3.6, -2.0, -3.9, -3.6], [1.0] * 4), target=-3.0)  # single steps above it, no window
    assert not miss["reached"] and miss["steps_to_target"] is miss["samples_to_target"] is miss["seconds_to_target"] is None
    short = bench.reach(metrics([-1.0, -1.0], [1.0, 1.0]), target=-3.0)  # fewer steps than the window reach nothing
    assert not short["reached"] and short["steps"] == 2


def test_algorithms_summary_takes_median_and_range_over_the_seeds_that_reached():
    bench = load_named_script(ALGORITHMS_SCRIPT, "bench_algorithms")
    run = {"samples_per_step": 16.0, "bytes_per_sample": 10.0, "first_reward": -3.8, "steps": 10, "wall_seconds": 9.0, "run_dir": ""}
    runs = [
        bench.RunResult("x", 0, True, 4, 64, 2.0, 0.5, last_reward=-2.9, **run),
        bench.RunResult("x", 1, True, 8, 128, 6.0, 0.7, last_reward=-2.7, **run),
        bench.RunResult("x", 2, False, None, None, None, 0.9, last_reward=-3.1, **run),
    ]
    summary = bench.summarise(runs)
    assert (summary["reached"], summary["seeds"]) == (2, 3)
    assert summary["steps_to_target"] == {"median": 6.0, "min": 4, "max": 8}
    assert summary["seconds_to_target"] == {"median": 4.0, "min": 2.0, "max": 6.0}
    assert summary["seconds_per_step"] == pytest.approx(0.7) and summary["last_reward"] == pytest.approx(-2.9)
    row = bench.table({"x": summary, "y": bench.summarise(runs[2:])}, {"x": "cluster/tiny.yaml", "y": "cluster/tiny_dgpo.yaml"})
    assert "| x (`tiny.yaml`) | 2/3 | 6 (4–8) | 96 (64–128) | 4.00 (2.00–6.00) | 0.70 |" in row
    assert "| y (`tiny_dgpo.yaml`) | 0/1 | not reached | not reached | not reached | 0.90 |" in row


def test_algorithms_refuses_a_missing_preset_or_another_reward(monkeypatch):
    bench = load_named_script(ALGORITHMS_SCRIPT, "bench_algorithms")
    monkeypatch.setitem(bench.ALGORITHMS, "dgpo", "cluster/tiny_missing.yaml")
    monkeypatch.setitem(bench.ALGORITHMS, "dancegrpo", "cluster/tiny_two_rewards.yaml")
    with pytest.raises(SystemExit) as exc:
        bench.check_presets(["dancegrpo", "dgpo"])
    message = str(exc.value)
    assert "dgpo: config file" in message and "cluster/tiny_missing.yaml" in message and "--algorithms" in message
    assert "dancegrpo: cluster/tiny_two_rewards.yaml scores with [('jpeg_compressibility', 1.0), ('http', 0.5)]" in message
    with pytest.raises(SystemExit) as exc:  # --set overrides are checked with the presets, before any run
        bench.check_presets(["flow_grpo"], overrides=["train.stepz=3"])
    assert "train.stepz: unknown key" in str(exc.value) and "fix --set" in str(exc.value)
    with pytest.raises(SystemExit):
        bench.parse_args(["--algorithms", "dancegrpo", "no_such_algorithm"])
    assert bench.parse_args([]).algorithms == list(bench.ALGORITHMS)  # every algorithm unless told otherwise


@pytest.mark.slow
def test_algorithms_benchmark_runs_two_algorithms_end_to_end(tmp_path, capsys):
    """Two presets, one seed, 3 steps each (one running-mean window), each a real ``python -m raygrpo.run``, in
    process (``--set run.in_process=true``: no cluster, no actor start-ups; the runs' Ray path is
    tests/test_run_e2e.py's), both at once (``--parallel 2``: the two interpreters' start-ups share the 2 cores);
    an always-reached target, so every figure to target is present. The benchmark's own ``main`` runs here."""
    bench = load_named_script(ALGORITHMS_SCRIPT, "bench_algorithms")
    out = tmp_path / "algorithms.json"
    bench.main(["--algorithms", "dancegrpo", "dgpo", "--seeds", "0", "--steps", "3", "--parallel", "2", "--target", "-100",
                "--out", str(out), "--work", str(tmp_path / "work"), "--set", "run.in_process=true"])  # fmt: skip
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["summary"]) == ["dancegrpo", "dgpo"] and report["table"] in stdout
    for name, (run,) in report["runs"].items():
        assert (run["reached"], run["steps_to_target"], run["samples_to_target"]) == (True, 3, 48), name  # 2 groups of 8 a step
        assert 0 < run["seconds_to_target"] < run["wall_seconds"] and run["first_reward"] < 0, name
    # DGPO ships final latents only, DanceGRPO the whole trajectory and its log-probs
    assert report["summary"]["dgpo"]["bytes_per_sample"] < report["summary"]["dancegrpo"]["bytes_per_sample"] / 3
