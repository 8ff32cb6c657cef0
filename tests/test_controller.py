"""The controller's parts without Ray or models: the batch from scored groups (missing scores, advantages,
best-of-N, fatal reward answers), the rollout scheduler's bookkeeping, aborts, and stopping by signal."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from raygrpo.actor_group import LocalGroup, get
from raygrpo.algorithms.advantages import build_batch
from raygrpo.config import ConfigError, load_config
from raygrpo.contracts import GroupMedia, PromptGroup, RolloutInfo, ScoredGroup, Scores
from raygrpo.controller import Controller, _StopSignal
from raygrpo.errors import RunAborted, RunStopped
from raygrpo.placement import RoleResources
from raygrpo.ray_metrics import NullTelemetry
from raygrpo.rollout.scheduler import RolloutScheduler

from .conftest import ROOT

REWARDS = "rewards=[{name: a, kind: brightness, weight: 0.7}, {name: b, kind: jpeg_compressibility, weight: 1.4}]"


def make_config(*overrides):
    return load_config(ROOT / "cluster" / "tiny.yaml", ["algorithm.group_size=4", "algorithm.groups_per_step=3", REWARDS, *overrides])


def scored(group_id: int, a: list[float], b: list[float], invalid_b: int | None = None, **b_fields) -> ScoredGroup:
    valid_b, errors = np.ones(4, bool), [None] * 4
    if invalid_b is not None:
        valid_b[invalid_b], errors[invalid_b] = False, "timeout"
    group = PromptGroup(group_id, group_id, f"prompt {group_id}", 4, seed=group_id, policy_version=0)
    scores = {
        "a": Scores(group_id, "a", np.array(a, np.float32), np.ones(4, bool)),
        "b": Scores(group_id, "b", np.array(b, np.float32), valid_b, errors, **b_fields),
    }
    return ScoredGroup(group, f"ref{group_id}", None, [RolloutInfo(group_id, 0, 0.0, 0, 0.0)], scores, {"a": 0.0, "b": 0.0})


def three_groups():
    return [scored(0, [1, 2, 3, 4], [4, 3, 2, 1]), scored(1, [1, 2, 3, 4], [4, 3, 2, 1], invalid_b=2), scored(2, [5, 5, 5, 5], [1, 1, 1, 1])]


def rng():
    return np.random.default_rng(0)


def test_a_group_with_a_missing_score_is_dropped_and_counted():
    batch = build_batch(three_groups(), make_config(), rng())
    assert [t.group_id for t in batch.groups] == [0, 2]
    stats = batch.stats
    assert (stats["rewards/a/missing"], stats["rewards/b/missing"], stats["groups/dropped"], stats["groups/trained"]) == (0, 1, 1, 2)
    assert batch.groups[0].advantages.shape == (2, 4) and np.allclose(batch.groups[0].reward_weights, [0.7, 1.4])
    assert batch.groups[0].rollout == "ref0" and np.all(batch.groups[1].advantages == 0)
    assert list(batch.groups[0].members) == [0, 1, 2, 3]
    assert batch.rewards.shape == (8, 2) and stats["groups/zero_std"] == 1  # group 2's rewards are all equal
    # groups 0 and 2 are trained: 0's rewards a and b are mirror images, 2's are equal (all advantages 0)
    assert stats["advantage/a/max"] == stats["advantage/b/max"] > 0
    assert stats["advantage/a/min"] == stats["advantage/b/min"] < 0 and stats["advantage/a/mean"] == pytest.approx(0.0, abs=1e-6)
    assert batch.errors == {"b": {"timeout": 1}}


def test_group_min_gives_a_missing_sample_its_groups_lowest_score_never_a_reward():
    """For a negative reward a 0 would be the best score (the old on_failure: zero): group_min never rewards failure."""
    groups = [scored(1, [1, 2, 3, 4], [-4, -3, -2, -1], invalid_b=3)]
    batch = build_batch(groups, make_config("scoring.on_failure=group_min"), rng())
    assert batch.stats["rewards/b/missing"] == 1 and batch.stats["groups/dropped"] == 0
    assert batch.rewards[:, 1].tolist() == [-4, -3, -2, -4]  # member 3 failed: it takes the group's minimum
    assert batch.groups[0].advantages[1, 3] == batch.groups[0].advantages[1].min() < 0
    # a reward with no valid score in the group leaves nothing to take the minimum of: the group is dropped
    nothing = scored(2, [1, 2, 3, 4], [0, 0, 0, 0])
    nothing.scores["b"] = Scores(2, "b", np.full(4, np.nan, np.float32), np.zeros(4, bool), ["down"] * 4)
    assert build_batch([nothing], make_config("scoring.on_failure=group_min"), rng()).stats["groups/dropped"] == 1


def test_on_failure_zero_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="zero was removed.*group_min"):
        make_config("scoring.on_failure=zero")


def test_on_failure_abort_stops_with_the_reason():
    with pytest.raises(RunAborted, match="timeout.*on_failure=abort"):
        build_batch(three_groups(), make_config("scoring.on_failure=abort"), rng())


def test_a_fatal_reward_answer_aborts_at_once_and_retries_are_counted():
    retried = [scored(0, [1, 2, 3, 4], [4, 3, 2, 1], retries=3, failures=1), scored(1, [1, 2, 3, 4], [4, 3, 2, 1], retries=1)]
    stats = build_batch(retried, make_config(), rng()).stats
    assert (stats["rewards/b/retries"], stats["rewards/b/errors"], stats["rewards/a/retries"]) == (4, 1, 0)
    fatal = [scored(0, [1, 2, 3, 4], [4, 3, 2, 1], fatal="reward 'b': http://127.0.0.1:1 answered 401: check the token in $TOKEN")]
    with pytest.raises(RunAborted, match="reward 'b': .*401"):
        build_batch(fatal, make_config(), rng())


def test_weighted_sum_normalises_the_combined_raw_reward_once():
    (train_group,) = build_batch(three_groups()[:1], make_config("scoring.combine=weighted_sum"), rng()).groups
    combined = 0.7 * np.array([1, 2, 3, 4]) + 1.4 * np.array([4, 3, 2, 1])
    expected = (combined - combined.mean()) / (combined.std(ddof=1) + 1e-8)
    assert train_group.advantages.shape == (1, 4) and train_group.reward_weights.tolist() == [1.0]
    np.testing.assert_allclose(train_group.advantages[0], expected, rtol=1e-5)
    stats = build_batch(three_groups()[:1], make_config("scoring.combine=weighted_sum"), rng()).stats
    assert sorted(k for k in stats if k.startswith("advantage/")) == [f"advantage/total/{s}" for s in ("max", "mean", "min", "std")]
    assert stats["advantage/total/max"] == pytest.approx(expected.max(), rel=1e-5)


def test_global_std_divides_every_group_by_the_steps_std():
    groups = three_groups()
    config = make_config("algorithm={name: dgpo, group_size: 4, groups_per_step: 3, global_std: true}")
    first, _ = build_batch([groups[0], groups[2]], config, rng()).groups
    every_a = np.array([1, 2, 3, 4, 5, 5, 5, 5], dtype=float)
    np.testing.assert_allclose(first.advantages[0], (np.array([1, 2, 3, 4]) - 2.5) / (every_a.std() + 1e-4), rtol=1e-5)


def test_best_of_n_trains_only_the_chosen_members():
    (train_group,) = build_batch([scored(0, [1, 2, 3, 9], [1, 2, 3, 9])], make_config("algorithm.best_of_n=2"), rng()).groups
    assert sorted(train_group.members.tolist()) == [0, 3]


# ----- the rollout scheduler's bookkeeping (stand-in workers: the scheduler only routes their refs) -----


class EchoWorker:
    """A rollout worker that 'generates' a group instantly: its media are the group's member indices."""

    def __init__(self, index: int):
        self.index = index

    def status(self):
        return 0, f"worker-{self.index}"

    def generate(self, group: PromptGroup):
        members = np.arange(group.member_offset, group.member_offset + group.group_size)
        images = np.repeat(members.astype(np.uint8)[:, None, None, None], 3, axis=3)
        return f"rollout-{group.group_id}-{group.member_offset}", GroupMedia(group, images), RolloutInfo(group.group_id, 0, 0.0, 1, 0.0)


class CountingReward:
    def score(self, media: GroupMedia):
        values = media.images[:, 0, 0, 0].astype(np.float32)
        return Scores(media.group.group_id, "r", values, np.ones(len(values), bool)), 0.0


def make_scheduler(*overrides, workers: int = 1) -> RolloutScheduler:
    config = make_config("rewards=[{name: r, kind: brightness}]", *overrides)
    rollout = LocalGroup(EchoWorker, RoleResources("rollout", workers, 1, 0), [(i,) for i in range(workers)])
    rewards = {"r": LocalGroup(CountingReward, RoleResources("reward:r", 1, 1, 0), [()])}
    return RolloutScheduler(config, list(config.data.prompts), None, rollout, rewards, weight_sync=None, telemetry=NullTelemetry())


def test_groups_get_unique_ids_distinct_seeds_the_current_version_and_visit_every_prompt():
    scheduler = make_scheduler()
    groups = scheduler._next_groups(1, version=0) + scheduler._next_groups(2, version=5)
    assert [g.group_id for g in groups] == list(range(6))
    assert len({g.seed for g in groups}) == 6 and [g.policy_version for g in groups] == [0, 0, 0, 5, 5, 5]
    prompts = list(make_config().data.prompts)
    assert all(g.prompt == prompts[g.prompt_id] for g in groups)
    # one epoch visits each prompt once before any repeats
    ids = [g.prompt_id for g in groups] + [g.prompt_id for g in scheduler._next_groups(3, 0)[:2]]
    assert sorted(ids) == list(range(8))


def test_spread_groups_split_into_even_parts_and_come_back_whole_in_member_order():
    scheduler = make_scheduler("rollout.spread_groups=true", "rollout.num_workers=2", "algorithm.group_size=5", "algorithm.groups_per_step=1", workers=2)
    scheduler.submit_through(1, version=0)
    parts = scheduler.wait_generated(1, version=0)
    assert [(p.group.member_offset, p.group.group_size, p.worker) for p in parts] == [(0, 2, 0), (2, 3, 1)]
    (whole,) = scheduler.wait_scored(parts, version=0)
    assert whole.group.group_size == 5 and whole.group.member_offset == 0
    assert get(whole.rollout) == ["rollout-0-0", "rollout-0-2"] and whole.scores["r"].values.tolist() == [0, 1, 2, 3, 4]


def test_the_data_position_before_a_step_is_what_a_checkpoint_resumes_from():
    scheduler = make_scheduler("train.max_staleness=1")
    scheduler.submit_through(1, version=0)  # steps 1 and 2 drawn
    assert sorted(scheduler.queue) == [1, 2] and scheduler.queue_depth == 6
    position = scheduler.position_after(1)  # before step 2's groups were drawn
    assert position.next_group_id == 3
    again = make_scheduler("train.max_staleness=1")
    again.restore(position)
    assert [g.prompt_id for g in again._next_groups(2, 1)] == [g.group.prompt_id for g in scheduler.queue[2]]


# ----- aborts and stops -----


def test_each_abort_keeps_its_weights_in_a_folder_of_its_own_and_says_so_in_run_state(tmp_path):
    from raygrpo.metrics import MetricsLog

    config = make_config()
    controller = Controller(config, tmp_path, list(config.data.prompts))

    class Learner:  # what the controller asks of the learner group here: the evaluation weights into a folder
        saves = 0

        def save(self, folder: str) -> str:
            Learner.saves += 1
            (Path(folder) / "weights.txt").write_text(f"save {Learner.saves}")
            return folder

    controller.learner, controller.metrics = Learner(), MetricsLog(tmp_path / "metrics.jsonl")
    with pytest.raises(RunAborted, match=r"no reward left; no step finished; weights in"):
        controller._abort(RunAborted("no reward left"))  # never "steps 1..0": nothing is there to point at
    controller.finished_step = 4
    with pytest.raises(RunAborted, match=r"no reward left; steps 1..4 are in .*metrics.jsonl; weights in"):
        controller._abort(RunAborted("no reward left"))
    assert (tmp_path / "checkpoint-aborted" / "weights.txt").read_text() == "save 1"
    assert (tmp_path / "checkpoint-aborted-2" / "weights.txt").read_text() == "save 2"
    state = json.loads((tmp_path / "run_state.json").read_text())
    assert (state["status"], state["step"], state["checkpoint"], state["reason"]) == ("aborted", 4, "checkpoint-aborted-2", "no reward left")


def test_a_signal_stops_waits_at_once_and_other_work_after_it_finishes():
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the suite runs as a background job
    stop = _StopSignal()
    with stop.installed():
        with pytest.raises(RunStopped, match="stopped by SIGTERM"), stop.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)  # while waiting for rollouts: at once
        stop.requested = None
        os.kill(os.getpid(), signal.SIGINT)  # during an update: remembered, not raised
        assert stop.requested is not None and stop.requested.signal_number == signal.SIGINT
        with pytest.raises(RunStopped, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)  # a second one: at once
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_local_refs_carry_values_and_errors_like_ray_refs():
    group = LocalGroup(EchoWorker, RoleResources("rollout", 2, 1, 0), [(0,), (1,)])
    assert group.foreach("status") == [(0, "worker-0"), (0, "worker-1")]
    bad = group.call(0, "generate", "not a group")
    with pytest.raises(AttributeError):
        get(bad)
