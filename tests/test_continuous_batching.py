"""Continuous batching of ODE rollouts (raygrpo/rollout/continuous.py, issue #17 item 3): every group's samples are
the plain worker's, whenever it was admitted and whatever it shared its forwards with."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from raygrpo.algorithms.advantages import StepBatch
from raygrpo.config import AutoscaleConfig, ConfigError, load_config
from raygrpo.contracts import Conditioning, ConditioningBatch, PromptGroup, ScoredGroup, Scores
from raygrpo.metrics import PhaseTimer, StepOutcome, step_record
from raygrpo.rollout.autoscale import AutoscalePolicy, PoolSample, worker_slots
from raygrpo.rollout.continuous import ContinuousRolloutWorker, OdeBatcher, TurnLock, VersionGate, actor_concurrency
from raygrpo.rollout.worker import RolloutWorker
from raygrpo.sampling import make_ode_solver, sigma_grid

from .conftest import ROOT

G = 4
SOLVERS = ("euler", "dpmpp_2m")
# The tiny FLUX in float32: a member's final latents move by ~5e-7 when its batch holds other rows (GEMM blocking).
BATCH_TOLERANCE = 1e-5


# ----- the loop's bookkeeping, exactly, on a row-wise stand-in for the network -----


class RowWiseModel:
    """``velocity`` of each row from that row alone (its latents, noise level and prompt), so batch composition
    cannot change a bit: any difference from the one-group loop is the batching loop's own mistake."""

    def __init__(self, fail_on: float | None = None):
        self.fail_on = fail_on

    def velocity(self, x: torch.Tensor, sigmas: torch.Tensor, cond: ConditioningBatch) -> torch.Tensor:
        tag = cond.prompt_embeds[:, 0, 0]  # [B], one value per prompt
        if self.fail_on is not None and bool((tag == self.fail_on).any()):
            raise RuntimeError("out of memory (simulated)")
        return x * (0.5 + sigmas)[:, None, None] - tag[:, None, None]  # [B, S, D]


def job_inputs(tag: float, size: int, num_steps: int, solver: str, seed: int):
    noise = torch.randn((size, 3, 2), generator=torch.Generator().manual_seed(seed))  # [G, S, D]
    return noise, sigma_grid(solver, num_steps, 3.0), Conditioning(np.full((2, 5), tag, np.float32))


def one_group_loop(model, noise, sigmas, cond, solver: str) -> torch.Tensor:
    """The plain worker's loop (RolloutWorker._sample_ode) for one group in one batch."""
    ode, x = make_ode_solver(solver, sigmas), noise.clone()
    for i in range(len(sigmas) - 1):
        x = ode.step(x, model.velocity(x, sigmas[i].expand(len(x)), ConditioningBatch.of(cond, len(x))), i)
    return x


@pytest.mark.parametrize("solver", SOLVERS)
def test_members_admitted_at_different_steps_follow_their_own_grid_and_history_exactly(solver):
    model = RowWiseModel()
    batcher = OdeBatcher(model, solver, max_batch=5, device="cpu")
    inputs = {"a": job_inputs(1.0, 3, 6, solver, 0), "b": job_inputs(2.0, 4, 6, solver, 1), "c": job_inputs(3.0, 1, 4, solver, 2)}
    jobs = {"a": batcher.submit(*inputs["a"])}
    finished_at: dict[str, int] = {}
    for boundary in range(20):
        if boundary == 2:
            jobs["b"] = batcher.submit(*inputs["b"])  # 2 of its 4 members fit now, the rest once a finishes
        if boundary == 3:
            jobs["c"] = batcher.submit(*inputs["c"])  # a shorter grid: 4 steps
        done = batcher.step()
        finished_at.update({name: boundary for name, job in jobs.items() if job in done})
        if boundary == 2:
            assert batcher.in_flight == 5  # a's 3 + b's first 2: the batch filled mid-flight
    # a: boundaries 0-5; b: 2 members at 2-7 and, once a is done, 2 more at 6-11; c (after b, first come first
    # served) takes the last free row at 6 and runs its 4 steps to 9.
    assert finished_at == {"a": 5, "b": 11, "c": 9}
    for name, (noise, sigmas, cond) in inputs.items():
        expected = one_group_loop(model, noise, sigmas, cond, solver)
        assert torch.equal(jobs[name].final, expected), name
    assert batcher.rows == 3 * 6 + 4 * 6 + 1 * 4 and batcher.forwards == 12


def test_a_step_s_time_goes_to_the_jobs_in_it_by_rows():
    """Busy seconds, not latencies: two jobs sharing every forward split each step's time 3:2 by their rows, and
    together they account for no more than the steps took."""
    batcher = OdeBatcher(RowWiseModel(), "euler", max_batch=5, device="cpu")
    a, b = batcher.submit(*job_inputs(1.0, 3, 6, "euler", 0)), batcher.submit(*job_inputs(2.0, 2, 6, "euler", 1))
    stepped = 0.0
    while not (a.done.is_set() and b.done.is_set()):
        start = time.perf_counter()
        batcher.step()
        stepped += time.perf_counter() - start
    assert a.busy / b.busy == pytest.approx(3 / 2, rel=1e-9)
    assert 0 < a.busy + b.busy <= stepped


def test_a_failed_forward_fails_the_groups_in_it_and_the_loop_goes_on():
    batcher = OdeBatcher(RowWiseModel(fail_on=2.0), "dpmpp_2m", max_batch=8, device="cpu")
    good = job_inputs(1.0, 2, 3, "dpmpp_2m", 0)
    with pytest.raises(RuntimeError, match="out of memory"):
        batcher.sample(*job_inputs(2.0, 2, 3, "dpmpp_2m", 1))
    assert torch.equal(batcher.sample(*good).final, one_group_loop(RowWiseModel(), *good, "dpmpp_2m"))
    with pytest.raises(ValueError, match="ODE solvers"):
        OdeBatcher(RowWiseModel(), "dance_sde", max_batch=8, device="cpu")


def test_conditioning_of_different_prompts_stacks_per_row():
    a, b = (ConditioningBatch.of(Conditioning(np.full((2, 3), k, np.float32), np.full(4, k, np.float32)), n) for k, n in ((1, 2), (2, 3)))
    both = ConditioningBatch.concat([a, b])
    assert both.prompt_embeds[:, 0, 0].tolist() == [1, 1, 2, 2, 2] and both.pooled_prompt_embeds.shape == (5, 4)
    assert ConditioningBatch.concat([a]) is a
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ConditioningBatch.concat([a, ConditioningBatch.of(Conditioning(np.ones((2, 3), np.float32)), 1)])


# ----- weights change only between groups -----


def _in_thread(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_a_weight_load_waits_for_running_groups_and_newer_groups_wait_for_it():
    gate, held, events = VersionGate(newer_version_wait_s=5.0), [0], []
    release = threading.Event()

    def old_group():
        with gate.group(0, lambda: held[0]):
            release.wait(5)
            events.append("old group done")

    def load():
        with gate.weights():
            events.append("load")
            held[0] = 1

    def new_group():
        with gate.group(1, lambda: held[0]):
            events.append(f"new group at version {held[0]}")

    threads = [_in_thread(old_group)]
    time.sleep(0.05)
    threads += [_in_thread(load), _in_thread(new_group)]
    time.sleep(0.1)
    assert events == []  # the load waits for the running group, the newer group for the load
    release.set()
    for thread in threads:
        thread.join(5)
    assert events == ["old group done", "load", "new group at version 1"]


def test_turns_are_granted_in_the_order_they_were_asked_for():
    """The batching loop takes a turn per step: a group waiting to decode must get the next one, not the loop again."""
    turns, order = TurnLock(), []
    turns.acquire()
    threads = []
    for name in ("decode group 1", "encode group 2", "next step"):
        threads.append(_in_thread(lambda name=name: (turns.acquire(), order.append(name), turns.release())))
        time.sleep(0.03)  # asked for in this order
    turns.release()
    for thread in threads:
        thread.join(5)
    assert order == ["decode group 1", "encode group 2", "next step"]


def test_a_group_asking_for_a_version_no_load_brings_goes_on_after_the_wait():
    gate = VersionGate(newer_version_wait_s=0.05)
    start = time.monotonic()
    with gate.group(3, lambda: 0):  # a restarted worker at version 0: the worker's StaleWorkerError follows
        waited = time.monotonic() - start
    assert 0.04 <= waited < 2


# ----- the real tiny FLUX: the same samples as the plain worker -----


def flux_config(solver: str, *overrides: str):
    base = [f"algorithm.group_size={G}", "model.max_sequence_length=16", f"algorithm.sampler={solver}", "rollout.num_steps=6", "algorithm.trunc_steps=4"]
    return load_config(ROOT / "cluster" / "tiny_dgpo.yaml", [*base, *overrides])


@pytest.fixture(scope="module")
def workers():
    """Per solver: the plain worker (micro-batch G) and a continuous one (batch 2G), on the same tiny FLUX."""
    torch.set_num_threads(1)
    return {
        s: (RolloutWorker(flux_config(s, f"rollout.micro_batch_size={G}")), ContinuousRolloutWorker(flux_config(s, *continuous(2 * G))))
        for s in SOLVERS
    }


def continuous(batch: int) -> list[str]:
    return ["rollout.continuous_batching=true", f"rollout.micro_batch_size={batch}"]


_PLAIN: dict[tuple, np.ndarray] = {}


def plain_final(plain: RolloutWorker, group: PromptGroup) -> np.ndarray:
    """The plain worker's final latents of ``group``'s prompt and seed (sampled once per worker, prompt and seed)."""
    key = (id(plain), group.prompt, group.seed, group.group_size)
    if key not in _PLAIN:
        _PLAIN[key] = plain.generate(dataclasses.replace(group, policy_version=plain.policy_version))[0].final_latents
    return _PLAIN[key]


GROUPS = [PromptGroup(k, k, prompt, G, seed=10 + k, policy_version=0) for k, prompt in enumerate(["a cat", "a red car on a hill", "a lighthouse"])]


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_group_alone_is_the_plain_workers_bit_for_bit(workers, solver):
    plain, batched = workers[solver]
    rollout, media, info = batched.generate(GROUPS[0])
    expected, expected_media, _ = plain.generate(GROUPS[0])
    assert np.array_equal(rollout.final_latents, expected.final_latents)
    assert np.array_equal(media.images, expected_media.images) and info.group_id == 0 and rollout.trajectory is None


def generate_at_once(worker: ContinuousRolloutWorker, groups: list[PromptGroup]) -> dict[int, tuple]:
    """``worker.generate`` of every group, each in a thread of its own started at once (as a threaded actor runs them)."""
    results: dict[int, tuple] = {}
    threads = [_in_thread(lambda g=g: results.__setitem__(g.group_id, worker.generate(g))) for g in groups]
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize("solver", SOLVERS)
def test_groups_sent_at_once_share_forwards_and_each_returns_its_own_samples(workers, solver):
    plain, batched = workers[solver]
    forwards = batched.batcher.forwards
    results = generate_at_once(batched, GROUPS)
    steps = flux_config(solver).rollout.num_steps
    assert batched.batcher.forwards - forwards < len(GROUPS) * steps  # batched: fewer forwards than one group at a time
    for group in GROUPS:
        rollout, media, info = results[group.group_id]
        assert rollout.group == group and media.group == group and info.group_id == group.group_id
        np.testing.assert_allclose(rollout.final_latents, plain_final(plain, group), rtol=0, atol=BATCH_TOLERANCE)


def test_prompts_are_encoded_one_group_at_a_time(workers, monkeypatch):
    """Fast tokenizers share their padding state between threads: two groups encoding at once were seen to get a T5
    encoding of 7 tokens instead of 16. The worker's threads take turns for everything but the denoising."""
    batched = workers["euler"][1]
    encode, encoding, most = batched.model.encode_prompt, [0], [0]

    def counting(*args):
        encoding[0] += 1
        most[0] = max(most[0], encoding[0])
        time.sleep(0.02)  # wide enough for another thread to come in
        try:
            return encode(*args)
        finally:
            encoding[0] -= 1

    monkeypatch.setattr(batched.model, "encode_prompt", counting)
    groups = [dataclasses.replace(g, group_id=10 + g.group_id, prompt=f"{g.prompt}, at night") for g in GROUPS]
    assert sorted(generate_at_once(batched, groups)) == [10, 11, 12] and most[0] == 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_groups_admitted_mid_flight_match_the_plain_worker(workers, solver):
    """Driven step by step on the real network: the second group joins at step 2, the third at step 4 (3 of its
    members fit; the fourth when the first group is done)."""
    plain, batched = workers[solver]
    model, config = batched.model, batched.config
    batcher = OdeBatcher(model, solver, max_batch=2 * G + 3, device="cpu")
    sigmas = model.sigma_grid(solver, config.rollout.num_steps, config.rollout.shift)
    jobs = []
    with torch.no_grad():
        for boundary in range(4 * config.rollout.num_steps):
            if boundary in (0, 2, 4):
                group = GROUPS[boundary // 2]
                noise = model.initial_noise(torch.Generator().manual_seed(group.seed), G)  # as generate draws it
                jobs.append(batcher.submit(noise, sigmas, model.encode_prompt(group.prompt)))
            batcher.step()
    for group, job in zip(GROUPS, jobs):
        assert job.done.is_set()
        np.testing.assert_allclose(job.final.numpy(), plain_final(plain, group), rtol=0, atol=BATCH_TOLERANCE)


def test_overlapping_groups_report_busy_seconds_within_wall_time_so_a_starved_pool_reads_idle_and_shrinks(workers):
    """Two continuous workers, two groups each, all four at once: a worker's busy seconds add up to at most its wall
    time (latencies overlap and add up to more), and a step in which the pool was starved the rest of the time (the
    learner's turn, strictly on-policy) reads idle, so the autoscale policy shrinks the pool. Latencies used to stand
    in for busy time: four groups in flight all the time read as 0 idle, and two groups per worker as groups waiting."""
    pool = [workers["euler"][1], workers["dpmpp_2m"][1]]
    groups = [dataclasses.replace(g, group_id=20 + k) for k, g in enumerate([*GROUPS, GROUPS[0]][:4])]
    results: dict[int, tuple] = {}
    start = time.perf_counter()
    threads = [_in_thread(lambda g=g, w=pool[k % 2]: results.__setitem__(g.group_id, w.generate(g))) for k, g in enumerate(groups)]
    for thread in threads:
        thread.join(60)
    wall = time.perf_counter() - start
    infos = {k: [results[g.group_id][2] for g in groups[k::2]] for k in range(2)}
    for mine in infos.values():
        busy = sum(i.busy_seconds for i in mine)
        assert 0.3 * wall < busy <= wall  # working most of the time, never more than all of it
        assert all(i.busy_seconds < i.seconds for i in mine) and sum(i.seconds for i in mine) > busy

    config = pool[0].config
    timer = PhaseTimer()
    timer.start -= 3 * wall  # the step began 2 wall-times earlier: the workers had nothing to do until the groups came
    scored = [
        ScoredGroup(g, None, None, [i], {"jpeg": Scores(g.group_id, "jpeg", np.zeros(G, np.float32), np.ones(G, bool))}, {"jpeg": 0.0})
        for g, i in zip(groups, [infos[0][0], infos[1][0], infos[0][1], infos[1][1]])
    ]
    batch = StepBatch([], np.zeros((0, 1), np.float32), {})
    outcome = StepOutcome(1, 0, scored, batch, np.zeros(0), None, 0.0, len(groups), 0, 0, timer, {"rollout": 2, "reward/jpeg": 1})
    record = step_record(outcome, config)
    assert record["time/rollout_worker_sum"] <= 2 * wall < sum(i.seconds for mine in infos.values() for i in mine)
    assert record["idle/rollout"] >= 0.6 and record["time/rollout_latency_max"] >= record["time/rollout_latency_mean"] > 0
    record["time/generate"] = wall
    slots = worker_slots(config)  # micro-batch 8 rows, groups of 4: two groups run at once per worker
    scale = AutoscaleConfig(min=1, max=3, window=2, grow_wait=0.2, shrink_idle=0.6)
    history = [PoolSample.of(record, pool_size=2)] * 2
    assert slots == 2 and AutoscalePolicy(scale, slots).decide(history, 2).target == 1
    # Read as one group per worker, two of the four "waited" while generation held a third of the step: it would grow.
    assert AutoscalePolicy(scale).decide(history, 2).target == 3


def test_groups_sharing_a_continuous_worker_s_forwards_do_not_read_as_waiting():
    scale = AutoscaleConfig(min=1, max=4, window=1, grow_wait=0.3)
    generation_bound = [PoolSample(pool_size=2, queue_depth=4, idle=0.1, wait=0.6)]
    assert AutoscalePolicy(scale, slots=2).decide(generation_bound, 2).target == 2  # 4 groups, 2 x 2 run at once
    assert AutoscalePolicy(scale, slots=2).decide([dataclasses.replace(generation_bound[0], queue_depth=5)], 2).target == 3
    assert AutoscalePolicy(scale, slots=1).decide(generation_bound, 2).target == 3  # the plain worker: 2 waited
    assert worker_slots(flux_config("euler", *continuous(10))) == 2 and worker_slots(flux_config("euler")) == 1
    spread = flux_config("euler", *continuous(4), "rollout.spread_groups=true", "rollout.num_workers=2")
    assert worker_slots(spread) == 2  # parts of 2 members


def test_continuous_batching_is_for_ode_rollouts_only():
    with pytest.raises(ConfigError, match="rollout.continuous_batching"):
        load_config(ROOT / "cluster" / "tiny.yaml", ["rollout.continuous_batching=true"])
    assert actor_concurrency(flux_config("euler", *continuous(8))) == 12 and actor_concurrency(flux_config("euler")) == 1


# ----- through Ray: a threaded actor, num_returns=3 -----


@pytest.mark.slow
def test_a_threaded_rollout_actor_batches_the_groups_it_is_sent(ray_cluster, workers):
    import ray

    from raygrpo.actor_group import ActorGroup
    from raygrpo.placement import RoleResources
    from raygrpo.weights import export_weights

    plain, _ = workers["dpmpp_2m"]
    config = flux_config("dpmpp_2m", *continuous(2 * G), "rollout.num_cpus=0.5")
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    group = None
    try:
        group = ActorGroup(ContinuousRolloutWorker, RoleResources("rollout", 1, 0.5, 0), [(config,)], max_concurrency=actor_concurrency(config))
        ray.get(group.ready(), timeout=300)
        # Version 0's groups, then version 1 (the same tensors) and a group asking for it, all sent at once: the load
        # waits for the running groups, the newer group for the load (Ray starts them in no guaranteed order).
        refs = [group.call(0, "generate", g, num_returns=3) for g in GROUPS]
        sync = group.call(0, "set_weights", export_weights(plain.model.transformer, 1))
        newer = dataclasses.replace(GROUPS[0], group_id=9, policy_version=1)
        refs.append(group.call(0, "generate", newer, num_returns=3))
        assert ray.get(sync, timeout=300).policy_version == 1
        for g, (rollout, media, info) in zip([*GROUPS, newer], refs):
            rollout, media, info = ray.get([rollout, media, info], timeout=300)
            assert rollout.group == media.group == g and info.group_id == g.group_id and rollout.policy_version == g.policy_version
            np.testing.assert_allclose(rollout.final_latents, plain_final(plain, g), rtol=0, atol=BATCH_TOLERANCE)
        forwards = ray.get(group.actors[0].__ray_call__.remote(lambda worker: worker.batcher.forwards))
        assert forwards < (len(GROUPS) + 1) * config.rollout.num_steps  # the calls ran at once and shared forwards
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_a_dgpo_run_with_continuous_batching_trains_in_process(tmp_path):
    import json

    from .conftest import run_main

    overrides = ["run.in_process=true", "rollout.continuous_batching=true", "train.steps=2", "algorithm.group_size=4", "rollout.num_steps=4"]
    proc = run_main("cluster/tiny_dgpo.yaml", *overrides, "algorithm.trunc_steps=3", f"run.output_root={tmp_path}", "train.checkpoint_every=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [1, 2] and all(r["groups/trained"] == 2 for r in steps)


@pytest.mark.slow
def test_the_benchmark_runs_at_its_smallest_sizes(tmp_path):
    import math

    from .conftest import load_script

    bench = load_script(ROOT / "benchmarks" / "continuous_batching.py", "continuous_batching")
    argv = ["--smoke", "--groups", "2", "--repeats", "1", "--batches", "4", "--out", str(tmp_path / "out.json"), "--work", str(tmp_path)]
    figures = bench.main(argv)["figures"]
    assert set(figures) == {"burst_batch4", "stream_batch4"}
    assert all(math.isfinite(f[k]) and f[k] > 0 for f in figures.values() for k in ("value", "baseline", "ratio", "cpu_ratio"))
