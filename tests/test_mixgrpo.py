"""MixGRPO and MixGRPO-Flash: the sliding window's schedule, Flash's grid, what rollout records inside and outside the
window (against hand-written Euler and DPM-Solver++ loops), the learner's terms, and the config's errors."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from raygrpo.algorithms.advantages import group_advantages
from raygrpo.algorithms.mixgrpo import FlashGrid, SlidingWindow
from raygrpo.config import ConfigError, load_config
from raygrpo.contracts import ConditioningBatch, PromptGroup, TrainGroup, as_tensor
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch
from raygrpo.rollout.worker import RolloutWorker
from raygrpo.sampling import step_transition
from raygrpo.weights import load_weights

from .conftest import ROOT

G, T, W = 4, 8, 3  # group, steps, window (tiny_mixgrpo.yaml's steps and window)


def make_config(*overrides: str):
    base = [f"algorithm.group_size={G}", "model.max_sequence_length=16", f"algorithm.grad_accum_samples={G}", "algorithm.shift_interval=2"]
    return load_config(ROOT / "cluster" / "tiny_mixgrpo.yaml", [*base, *overrides])


def group(version: int, seed: int = 3, group_id: int = 0) -> PromptGroup:
    return PromptGroup(group_id, 0, "a lighthouse at dawn", G, seed=seed, policy_version=version)


def window(strategy="progressive", size=4, tau=25, stride=1, wrap=True, seed=0) -> SlidingWindow:
    return SlidingWindow(size, strategy, tau, stride, wrap, seed)


def test_progressive_window_moves_every_shift_interval_and_wraps_or_stops():
    """T = 25, w = 4: the last whole window inside the trainable steps 0..23 starts at 20."""
    starts = lambda w, versions: [w.start(v, 25) for v in versions]  # noqa: E731
    assert starts(window(), [0, 24, 25, 49, 50, 500, 524, 525, 550]) == [0, 0, 1, 1, 2, 20, 20, 0, 1]  # roll back after 20
    assert starts(window(wrap=False), [0, 25, 500, 525, 10_000]) == [0, 1, 20, 20, 20]  # Algorithm 1: min(l + s, T - 1 - w)
    # stride 3: starts 0, 3, ..., 18 (7 of them), then back to 0; or held at 20 without wrapping
    assert starts(window(stride=3, tau=10), [0, 10, 60, 69, 70]) == [0, 3, 18, 18, 0]
    assert starts(window(stride=3, tau=10, wrap=False), [60, 70, 80]) == [18, 20, 20]
    assert starts(window("frozen"), [0, 25, 10_000]) == [0, 0, 0]
    # bounds follow the group's policy version only (not its seed or id)
    assert window().bounds(group(50, seed=1), 25) == window().bounds(group(50, seed=9, group_id=7), 25) == (2, 6)
    with pytest.raises(ValueError, match="window of 4 steps does not fit in the 3 trainable steps"):
        window().start(0, 4)


def test_random_window_is_one_start_per_training_step_and_seed():
    w = window("random", seed=5)
    draws = [w.start(v, 25) for v in range(400)]
    assert set(draws) == set(range(21))  # every whole window 0..20 turns up, no other
    assert draws == [w.start(v, 25) for v in range(400)]  # deterministic in (seed, version)
    assert draws != [window("random", seed=6).start(v, 25) for v in range(400)]
    assert w.bounds(group(7, seed=1), 25) == w.bounds(group(7, seed=2), 25)  # every group of a step shares it


def test_flash_grid_compresses_the_steps_after_the_window():
    """Released ``post`` strategy: n = int((T - stop + 1) r) points, uniform in unshifted time from t_stop to 0."""
    shift = lambda t: 3 * t / (1 + 2 * t)  # noqa: E731
    base = torch.tensor([shift(1 - i / 25) for i in range(26)], dtype=torch.float32)
    grid = FlashGrid(0.4, 3.0).sigmas(base, (0, 4))
    # int(22 * 0.4) = 8 points from t = 0.84 (sigma_4) to 0: 7 DPM steps instead of 21 Euler steps
    expected_tail = [shift(0.84 - 0.12 * k) for k in range(1, 8)]
    assert len(grid) == 5 + 7 and torch.equal(grid[:5], base[:5])
    torch.testing.assert_close(grid[5:], torch.tensor(expected_tail, dtype=torch.float32), atol=1e-6, rtol=0)
    assert grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    # a window ending at step 24 keeps one step after it (the released max(., 1) point would leave no step to 0)
    late = FlashGrid(0.4, 3.0).sigmas(base, (20, 24))
    assert torch.equal(late, torch.cat([base[:25], torch.zeros(1)]))


def _dpm_2m(x, x0_prev, sigmas, i, v):
    """One DPM-Solver++(2M) step in the flow parameterisation (alpha = 1 - sigma, lambda = log(alpha / sigma)), by
    hand: first order on the last step and into sigma 0, else the midpoint correction with the previous data prediction."""
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    lam = lambda q: math.log((1 - q) / q)  # noqa: E731
    x0 = x - s * v
    data = x0
    if s_next > 0 and i < len(sigmas) - 2:
        h, h_prev = lam(s_next) - lam(s), lam(s) - lam(float(sigmas[i - 1]))
        data = x0 + h / (2 * h_prev) * (x0 - x0_prev)
    exp_minus_h = (s_next / (1 - s_next)) / (s / (1 - s)) if s_next > 0 else 0.0
    return s_next / s * x - (1 - s_next) * (exp_minus_h - 1) * data, x0


@pytest.fixture(scope="module")
def worker_and_learner():
    torch.set_num_threads(1)
    config = make_config()
    worker, learner = RolloutWorker(config), Learner(config)
    load_weights(worker.model.transformer, learner.export_weights())
    return worker, learner


@pytest.mark.parametrize("flash", [False, True])
def test_rollout_records_the_window_and_takes_ode_steps_outside(worker_and_learner, flash):
    """Version 4, tau 2: the window is steps 2..4. Before it one Euler path for the whole group; the window's W + 1
    latents and W log-probs recorded; after it Euler (MixGRPO) or DPM-Solver++(2M) on the compressed tail (Flash,
    at compression 0.75 so that its first step is a second-order one)."""
    worker, _ = worker_and_learner
    spec, version = worker.spec, worker.policy_version
    if flash:
        worker.spec = dataclasses.replace(spec, post_window=FlashGrid(0.75, 3.0))
    worker.policy_version = 4
    try:
        rollout, _, _ = worker.generate(group(4))
    finally:
        worker.spec, worker.policy_version = spec, version
    assert rollout.window == (2, 5)
    assert rollout.trajectory.shape[:2] == (G, W + 1) and rollout.log_probs.shape == (G, W)
    base = worker.model.sigma_grid("flow_sde", T, 3.0)
    sigmas = as_tensor(rollout.sigmas)
    # Flash: int((8 - 5 + 1) * 0.75) = 3 points from sigma_5: two DPM steps after the window; else the 8-step grid
    assert len(sigmas) == (8 if flash else T + 1) and torch.equal(sigmas[:6], base[:6])
    cond = ConditioningBatch.of(rollout.conditioning, G)
    with torch.no_grad():
        x = worker.model.initial_noise(torch.Generator().manual_seed(3), 1).float()
        for i in range(2):
            x = x + (sigmas[i + 1] - sigmas[i]) * worker.model.velocity(x, sigmas[i].expand(1), cond.rows(slice(0, 1))).float()
        torch.testing.assert_close(as_tensor(rollout.trajectory[:, 0]), x.expand(G, *x.shape[1:]), atol=1e-6, rtol=0)
        for k in range(W):  # the window: Flow-SDE (a = 0.7) densities of the recorded transitions
            xk = as_tensor(rollout.trajectory[:, k])
            step = step_transition("flow_sde", 0.7, xk, worker.model.velocity(xk, sigmas[2 + k].expand(G), cond), sigmas, 2 + k)
            torch.testing.assert_close(step.log_prob(as_tensor(rollout.trajectory[:, k + 1])), as_tensor(rollout.log_probs[:, k]))
        assert not np.array_equal(rollout.trajectory[0, -1], rollout.trajectory[1, -1])
        x_prev = as_tensor(rollout.trajectory[:, -2])
        x0_prev = x_prev - sigmas[4] * worker.model.velocity(x_prev, sigmas[4].expand(G), cond)
        x = as_tensor(rollout.trajectory[:, -1])
        for i in range(5, len(sigmas) - 1):
            v = worker.model.velocity(x, sigmas[i].expand(G), cond).float()
            x0 = x - sigmas[i] * v
            x, x0_prev = _dpm_2m(x, x0_prev, sigmas, i, v) if flash else (x + (sigmas[i + 1] - sigmas[i]) * v, x0)
    torch.testing.assert_close(as_tensor(rollout.final_latents), x0, atol=1e-5, rtol=1e-5)  # the last step's x0, decoded


def test_learner_trains_every_window_step_and_the_first_ratio_is_exactly_one(worker_and_learner, monkeypatch):
    worker, learner = worker_and_learner
    worker.spec = dataclasses.replace(worker.spec, post_window=FlashGrid(0.4, 3.0))  # Flash: a grid of its own
    try:
        rollout, _, _ = worker.generate(group(worker.policy_version, seed=11))
    finally:
        worker.spec = dataclasses.replace(worker.spec, post_window=None)
    start, stop = rollout.window
    assert len(rollout.sigmas) < T + 1  # the group's own compressed grid
    seen, velocity = [], learner.model.velocity
    monkeypatch.setattr(learner.model, "velocity", lambda x, s, *a, **k: seen.append(float(s[0])) or velocity(x, s, *a, **k))
    advantages = group_advantages(np.array([[0.1, 0.4, 0.2, 0.3]]), 5.0).astype(np.float32)
    train = TrainGroup(rollout, 0, advantages, np.ones(1, np.float32), np.arange(G))
    metrics = learner.update(RankBatch.whole([train]))
    # each member, one term per window step in order, at the window's noise levels (micro-batch 1: one member a forward)
    assert seen == [float(s) for s in rollout.sigmas[start:stop]] * G
    assert metrics.first_ratio_max_abs_dev == 0.0 and metrics.extras["approx_kl"] == 0.0
    assert metrics.extras["window_start"] == start and metrics.samples == G and metrics.optimizer_steps == 1


def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ConfigError, match=r"window_size=8 does not fit in the 7 trainable steps of rollout.num_steps=8"):
        make_config("algorithm.window_size=8")
    with pytest.raises(ConfigError, match="MixGRPO trains every step of its window: remove timestep_fraction"):
        make_config("algorithm.timestep_fraction=0.6")
    with pytest.raises(ConfigError, match="algorithm.flash_compression"):
        make_config("algorithm.flash_compression=0")
    with pytest.raises(ConfigError, match="spread_groups: MixGRPO's window follows the policy version"):
        make_config("rollout.spread_groups=true")
    with pytest.raises(ConfigError, match="algorithm.window_strategy"):
        make_config("algorithm.window_strategy=decay")
    config = make_config("algorithm.window_size=7")  # the largest window: every trainable step
    assert config.trained_timesteps == 7


@pytest.mark.slow
def test_tiny_preset_runs_in_process_with_a_moving_flash_window(tmp_path):
    """Three steps of cluster/tiny_mixgrpo.yaml as Flash with the window moving every step: exact first ratios,
    (W + 1) latents per sample, and the window start the metrics log follows the policy version."""
    from raygrpo.controller import Controller

    config = load_config(
        ROOT / "cluster" / "tiny_mixgrpo.yaml",
        ["run.in_process=true", f"run.output_root={tmp_path}", "train.steps=3", "algorithm.shift_interval=1",
         "algorithm.flash=true", "algorithm.group_size=4", "algorithm.grad_accum_samples=8", "logging.tensorboard=false"],
    )  # fmt: skip
    run_dir = tmp_path / "run"
    Controller(config, run_dir, list(config.data.prompts)).run()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["learner/window_start"] for r in rows] == [0, 1, 2]
    assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in rows)
    latent = 16 * 16 * 4  # one packed [16, 16] float32 latent (64x64 pixels)
    # the window's W + 1 latents and the final one, plus W log-probs and a quarter of the group's conditioning (4,224 B)
    assert (W + 2) * latent < rows[0]["rollout/bytes_per_sample"] < (W + 2) * latent + 1200 < (T + 2) * latent
    assert json.loads((run_dir / "run_state.json").read_text())["status"] == "finished"
