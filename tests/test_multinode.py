"""Nodes that die and join mid-run.

In process: the rollout scheduler's pool against workers whose nodes a test moves (a worker without a node
leaves the pool and gets no work; one that comes back gets the current weights first; a group generated on a
node that died is generated again). On a simulated cluster (scripts/multinode_sim.py: Ray nodes on loopback
declaring GPUs they do not have, tiny models on CPU through ``run.device_override``): flux.yaml's layout in
miniature, a rollout-only node killed, then the learner's node, and the run resumed from what it left.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from raygrpo.actor_group import LocalGroup
from raygrpo.checkpoint import find_resume_point
from raygrpo.config import load_config
from raygrpo.contracts import GroupMedia, PromptGroup, RolloutInfo, Scores
from raygrpo.controller import Controller
from raygrpo.data.prompts import load_prompts
from raygrpo.placement import RoleResources
from raygrpo.ray_metrics import NullTelemetry
from raygrpo.rollout.scheduler import RolloutScheduler

from .conftest import ROOT, load_script


class Worker:
    """A rollout worker that generates at once and holds the version it was last sent (0 when it starts)."""

    def __init__(self, index: int):
        self.index, self.version = index, 0

    def status(self):
        return self.version, f"worker-{self.index}"

    def generate(self, group: PromptGroup):
        images = np.full((group.group_size, 2, 2, 3), self.index, np.uint8)
        return f"rollout-{group.group_id}", GroupMedia(group, images), RolloutInfo(group.group_id, self.version, 0.0, 1, 0.0)


class Reward:
    def score(self, media: GroupMedia):
        n = len(media.images)
        return Scores(media.group.group_id, "r", np.arange(n, dtype=np.float32), np.ones(n, bool)), 0.0


class NodeGroup(LocalGroup):
    """Workers on nodes the test moves: a new node id is a node that died and a restart elsewhere; None, no node
    with room (such a worker does not answer, as a Ray actor without a node)."""

    def __init__(self, count: int):
        super().__init__(Worker, RoleResources("rollout", count, 1, 1), [(i,) for i in range(count)])
        self.nodes: list[str | None] = ["node-1"] * count

    def bundle_nodes(self):
        return list(self.nodes)

    def wait_alive(self, index: int, timeout_s: float = 0.0) -> bool:
        return self.nodes[index] is not None


class WeightSync:
    def __init__(self, rollout: NodeGroup):
        self.rollout, self.pushed = rollout, []

    def push(self, workers, version: int) -> None:
        for i in workers:
            self.rollout.actors[i].version = version
            self.pushed.append((i, version))


def pool_scheduler(workers: int = 3) -> tuple[RolloutScheduler, NodeGroup, WeightSync]:
    config = load_config(
        ROOT / "cluster" / "tiny.yaml", ["rewards=[{name: r, kind: brightness}]", "algorithm.group_size=2", f"algorithm.groups_per_step={workers}"]
    )
    rollout = NodeGroup(workers)
    sync = WeightSync(rollout)
    rewards = {"r": LocalGroup(Reward, RoleResources("reward:r", 1, 1, 0), [()])}
    return RolloutScheduler(config, list(config.data.prompts), None, rollout, rewards, sync, NullTelemetry()), rollout, sync


def test_a_worker_without_a_node_leaves_the_pool_and_comes_back_with_the_current_weights():
    scheduler, rollout, sync = pool_scheduler()
    rollout.nodes[1] = None  # its node died and no node has room for it
    scheduler.submit_through(1, version=0)
    assert scheduler.down == {1} and scheduler.pool_size == 2
    assert [work.worker for work in scheduler.queue[1]] == [0, 2, 0]  # the round robin skips it
    parts = scheduler.wait_generated(1, version=0)
    assert [g.group.group_id for g in scheduler.wait_scored(parts, version=0)] == [0, 1, 2]
    for i in (0, 2):  # what the weight sync after update 1 brought the pool to
        rollout.actors[i].version = 1
    rollout.nodes[1] = "node-4"  # a node with room joined; Ray restarted the worker there, at version 0
    assert scheduler.refresh_pool(version=1) == set()
    assert sync.pushed == [(1, 1)]  # the current weights first, then work
    scheduler.submit_through(2, version=1)
    assert sorted(work.worker for work in scheduler.queue[2]) == [0, 1, 2]


def test_a_group_generated_on_a_node_that_died_is_generated_again_once_and_keeps_its_id():
    """Its rollout and media lived in the dead node's object store, though its info had reached the controller."""
    scheduler, rollout, sync = pool_scheduler()
    scheduler.submit_through(1, version=0)
    parts = scheduler.wait_generated(1, version=0)
    rollout.nodes[2] = "node-2"  # worker 2's node died after it generated group 2; it was restarted on another
    groups = scheduler.wait_scored(parts, version=0)
    assert [g.group.group_id for g in groups] == [0, 1, 2] and scheduler.reissued == 1
    assert [work.node for work in parts] == ["node-1", "node-1", "node-2"]  # generated again where the worker is now
    assert [g.group.seed for g in groups] == [w.group.seed for w in parts]  # the same group: same seed


def test_no_worker_left_in_the_pool_aborts_the_run_with_what_to_do():
    from raygrpo.errors import RunAborted

    scheduler, rollout, _ = pool_scheduler(workers=2)
    rollout.nodes = [None, None]
    with pytest.raises(RunAborted, match="no rollout worker is left.*add nodes"):
        scheduler.submit_through(1, version=0)


LAYOUT = [  # flux.yaml in miniature: one-GPU rollout workers over two nodes, a reward on half a GPU, one learner rank on a node
    "--set", "rollout.num_workers=3", "--set", "algorithm.groups_per_step=3", "--set", "learner.num_ranks=1", "--set", "learner.num_gpus=2",
    "--set", "algorithm.grad_accum_samples=12", "--set", "rewards=[{name: jpeg, kind: jpeg_compressibility, num_gpus: 0.5}]",
]  # fmt: skip


@pytest.mark.slow
def test_lost_nodes_on_a_simulated_cluster_shrink_the_pool_then_stop_the_run_resumably(tmp_path, monkeypatch):
    """3 nodes x 2 GPUs: the learner (placed first) on one, two rollout workers on the next, the third and the
    reward on the last. Right after step 1's groups are submitted the node with the two workers dies: no node has
    room for them, the pool shrinks to one and their groups are generated again. Right after step 2's the
    learner's node dies: the run aborts naming the dead rank and the checkpoint of step 1, which the same
    configuration then resumes from to the end (in process here), every group trained exactly once."""
    out = tmp_path / "report.json"
    args = [
        "--nodes", "3", "--gpus-per-node", "2", "--steps", "3", "--kill-rollout-node", "1", "--kill-learner-node", "2",
        "--output-root", str(tmp_path / "runs"), "--out", str(out), *LAYOUT,
    ]  # fmt: skip
    # The script's main() in this process, the driver of the simulated cluster (no interpreter importing torch,
    # diffusers and transformers again); the cluster's own folder goes to RAY_TMPDIR and its Ray metrics are off
    # (scripts/multinode_sim.py says why): the script restores both.
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    sim = load_script(ROOT / "scripts" / "multinode_sim.py", "multinode_sim")
    assert sim.main(args) == 0
    report = json.loads(out.read_text())
    run = report["run"]
    # Placement as planned: every actor on a GPU node, the learner's whole; the rollout workers packed, 2 + 1.
    start = run["placement_start"]
    assert all(node and node != "head" for nodes in start.values() for node in nodes)
    assert start["learner"][0] not in start["rollout"] + start["reward:jpeg"]
    assert sorted(Counter(start["rollout"]).values()) == [1, 2]
    killed, lost_learner = run["events"]
    assert killed["action"] == "kill_rollout_node" and list(killed["actors_on_it"]) == ["rollout"]
    assert len(killed["actors_on_it"]["rollout"]) == 2
    # The lost groups were generated again (none lost, none twice); the pool is the workers that still have a node.
    step1 = run["steps"][0]
    assert step1["groups_trained"] == 3 and step1["groups_reissued"] >= 1 and run["reissued"] >= 1
    # No node has room for the two lost workers (half a GPU is free): they wait without one, the pool is the third.
    assert killed["node"] not in step1["rollout_nodes"] and step1["rollout_nodes"].count(None) == 2
    assert step1["rollout_pool"] == 1
    assert run["every_group_once"] and run["trained_groups"] == 3 and run["trained_twice"] == []
    # The learner's node: aborted with the dead rank, and the checkpoint of the last whole step to resume from.
    assert lost_learner["action"] == "kill_learner_node" and lost_learner["actors_on_it"] == {"learner": [0]}
    assert run["outcome"] == "aborted"
    assert "learner rank(s) [0] of 1 died" in run["message"] and "the same command resumes from" in run["message"]
    assert run["run_state"]["status"] == "aborted" and run["run_state"]["resume_from"] == "checkpoints/step-000001"
    assert report["resumable"]["step"] == 1

    run_dir = Path(run["run_dir"])
    config = load_config(run_dir / "config.yaml", ["run.in_process=true", "run.resume=auto"])
    resume = find_resume_point(config)
    assert resume is not None and resume.step == 1 and resume.run_dir == run_dir.resolve()
    controller = Controller(config, resume.run_dir, load_prompts(config.data), resume=resume)
    controller.run()
    assert sorted(controller.trained_group_ids) == list(range(9))  # step 1's from the checkpoint, steps 2-3 here
    assert [r["step"] for r in controller.metrics.records] == [1, 2, 3]
