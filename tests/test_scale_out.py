"""The controller's scheduling: bounded staleness and spread groups (in process), and against real Ray actors
lost work reissued exactly once after actor deaths, and the collective weight sync."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from raygrpo.config import load_config
from raygrpo.controller import Controller

from .conftest import ROOT


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    """This test process as a Ray driver of the session cluster (the controller runs in process); yields the metrics URL."""
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    yield ray_cluster.metrics
    ray.shutdown()


def tiny_config(tmp_path, *overrides):
    return load_config(
        ROOT / "cluster" / "tiny.yaml",
        [
            f"run.output_root={tmp_path}", "algorithm.group_size=4", "algorithm.groups_per_step=2",
            "algorithm.grad_accum_samples=8", "rollout.num_steps=4", "train.sample_grid_groups=1", *overrides,
        ],
    )  # fmt: skip


def run_controller(controller: Controller) -> list[dict]:
    controller.run()
    return controller.metrics.records


def test_max_staleness_one_overlaps_generation_with_training(tmp_path):
    """Steps t+1's groups are generated with the weights before update t: staleness 0 at step 1, then exactly 1."""
    config = tiny_config(tmp_path, "train.steps=4", "train.max_staleness=1", "run.in_process=true")
    controller = Controller(config, tmp_path / "run", list(config.data.prompts))
    records = run_controller(controller)
    assert [r["staleness/max"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert [r["policy_version"] for r in records] == [1, 2, 3, 4]
    assert sorted(controller.trained_group_ids) == list(range(8))  # every group trained once
    # A sample from older weights has a ratio away from 1 before the first optimizer step; on-policy it is exactly 1.
    assert records[0]["learner/first_ratio_max_abs_dev"] == 0.0
    assert max(r["learner/first_ratio_max_abs_dev"] for r in records[1:]) > 0.0
    for role in ("idle/rollout", "idle/reward/jpeg", "idle/learner"):
        assert all(0.0 <= r[role] <= 1.0 for r in records)


class KillingController(Controller):
    """Kills rollout worker 0 and the reward replica right after step 2's groups are submitted; with
    ``metrics_url`` set, reads Ray's metrics endpoint after the last step, while the run is still live."""

    metrics_url: str | None = None
    metrics_checked = False

    def _start(self) -> None:
        super()._start()
        submit, write_report = self.scheduler.submit_through, self.outputs.write_report

        def submit_then_kill(step: int, version: int) -> None:
            # Worker 0 dies just before the submissions: its group goes to it while Ray restarts it (lost, or
            # refused by the restarted worker that has no weights yet); killed after them, a fast worker could
            # finish the group first, and nothing would be lost. The replica dies with scorings queued on it.
            if step == 2:
                ray.kill(self.rollout.actors[0], no_restart=False)
            submit(step, version)
            if step == 2:
                ray.kill(self.rewards["jpeg"].actors[0], no_restart=False)

        def check_metrics_then_report() -> None:
            if self.metrics_url:
                _check_ray_metrics(self.metrics_url)
                self.metrics_checked = True
            write_report()

        self.scheduler.submit_through = submit_then_kill
        self.outputs.write_report = check_metrics_then_report


@pytest.mark.slow
@pytest.mark.parametrize(("max_staleness", "weight_sync"), [(0, "collective"), (1, "object_store")])
def test_killed_rollout_and_reward_actors_restart_and_no_group_is_lost_or_trained_twice(ray_driver, tmp_path, max_staleness, weight_sync):
    """Worker 0 dies just before step 2's submissions, the reward replica right after them (with max_staleness 1: step 3's groups).

    On-policy, weights go by rollout.weight_sync=collective on CPU (gloo): every version is broadcast from learner
    rank 0 and fingerprint-checked; the killed worker gets its weights through the object store and the broadcast
    group is rebuilt for step 3. (One run for both: each run starts its actors, the slow part on 2 cores; the
    object-store sync of a restarted worker is the max_staleness 1 case.) Three steps: one after the kills."""
    config = tiny_config(
        tmp_path, "train.steps=3", "rollout.num_workers=2", "rollout.max_restarts=1", "rewards.0.max_restarts=1",
        f"train.max_staleness={max_staleness}", f"rollout.weight_sync={weight_sync}",
    )  # fmt: skip
    controller = KillingController(config, tmp_path / "run", list(config.data.prompts))
    controller.metrics_url = ray_driver if max_staleness else None
    records = run_controller(controller)
    assert controller.metrics_checked == bool(max_staleness)
    assert sorted(controller.trained_group_ids) == list(range(6)), "every requested group is trained exactly once"
    assert [r["groups/trained"] for r in records] == [2.0] * 3
    # Worker 0 held one of the two groups submitted just before the kill: step 2's on-policy, step 3's with
    # max_staleness 1 (step 2's were submitted a step earlier and may be done: finished work is never redone).
    assert records[1 + max_staleness]["groups/reissued"] >= 1
    assert controller.scheduler.rescored >= 1  # the reward replica died with scorings in flight
    assert [r["policy_version"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["reward/jpeg/mean"]) for r in records)
    sync = controller.weight_sync
    assert sync.collective == (weight_sync == "collective")
    if not max_staleness:
        # The restarted worker got the current weights, and the broadcast the learner's: strictly on-policy samples
        # keep the first ratio at exactly 1.
        assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records), "rollout sampled with exactly the learner's weights"
        assert sync.names and not sync.group_stale  # rebuilt after the restart, used for step 3
    else:
        assert all(r["staleness/max"] <= 1 for r in records)


def _check_ray_metrics(metrics_url: str) -> None:
    """The run's ray.util.metrics as Ray's Prometheus endpoint on the head serves them (exported every 2 s here;
    the gauges are re-set every few seconds, so they are there however long ago the last step set them)."""
    import time

    import httpx

    wanted = [
        "ray_raygrpo_queue_depth", "ray_raygrpo_staleness", "ray_raygrpo_idle_fraction", "ray_raygrpo_weight_sync_seconds",
        "ray_raygrpo_reward_latency_seconds_bucket", "ray_raygrpo_actor_restarts_total",
    ]  # fmt: skip
    deadline, seen = time.monotonic() + 30, {}
    while time.monotonic() < deadline:
        lines = [line for line in httpx.get(metrics_url, timeout=10).text.splitlines() if line.startswith("ray_raygrpo_")]
        seen = {name: [line for line in lines if line.startswith(name + "{")] for name in wanted}
        if all(seen.values()):
            break
        time.sleep(0.2)  # exported every 2 s: a finer poll sees them up to a second sooner
    assert all(seen.values()), {name: bool(found) for name, found in seen.items()}
    assert any('role="rollout"' in line for line in seen["ray_raygrpo_actor_restarts_total"])  # the killed worker
    assert any('role="reward/jpeg"' in line for line in seen["ray_raygrpo_idle_fraction"])


def test_spread_groups_split_members_over_workers_and_normalise_over_the_whole_group(tmp_path):
    """Flow-GRPO style: each group's 4 members come from 2 workers; the learner trains whole, merged groups."""
    config = tiny_config(
        tmp_path, "train.steps=2", "rollout.num_workers=2", "rollout.spread_groups=true", "logging.sample_every=1", "run.in_process=true"
    )
    controller = Controller(config, tmp_path / "run", list(config.data.prompts))
    records = run_controller(controller)
    assert [r["groups/trained"] for r in records] == [2.0, 2.0]
    assert sorted(controller.trained_group_ids) == list(range(4))
    # On-policy and merged in member order: every trained sample's recomputed log-prob matches its own part's.
    assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records)
    assert all(r["learner/samples"] == 8.0 for r in records)  # 2 groups x 4 members, nothing lost in the merge
    gallery = sorted((tmp_path / "run" / "samples").glob("step-*/index.json"))
    assert len(gallery) == 2


def test_parts_of_a_spread_group_merge_into_exactly_the_group_one_worker_samples(tmp_path):
    """Deterministic ODE rollouts (DGPO): members 0-1 and 2-3 sampled as two parts equal the whole group's."""
    from dataclasses import replace

    from raygrpo.contracts import PromptGroup, merge_rollouts
    from raygrpo.rollout.worker import RolloutWorker

    config = load_config(ROOT / "cluster" / "tiny_dgpo.yaml", ["algorithm.group_size=4"])
    worker = RolloutWorker(config)
    group = PromptGroup(3, 0, "a red car", 4, seed=11, policy_version=0)
    whole, media, _ = worker.generate(group)
    parts = [worker.generate(replace(group, group_size=2, member_offset=offset))[0] for offset in (2, 0)]
    merged = merge_rollouts(parts)
    assert merged.group.group_size == 4 and merged.group.member_offset == 0
    # Same noise, same ODE; only float rounding differs (the preset samples 4 per forward, the parts 2).
    np.testing.assert_allclose(merged.final_latents, whole.final_latents, rtol=0, atol=1e-5)
    assert len({m.tobytes() for m in whole.final_latents}) == 4  # DGPO: a fresh noise per member
