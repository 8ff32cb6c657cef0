"""The controller's bookkeeping without Ray: group planning, advantages, dropped groups, best-of-N."""

from pathlib import Path

import numpy as np
import pytest

from raygrpo.config import load_config
from raygrpo.contracts import PromptGroup, Scores
from raygrpo.controller import Controller, Generated

from .conftest import ROOT

REWARDS = "rewards=[{name: a, kind: brightness, weight: 0.7}, {name: b, kind: jpeg_compressibility, weight: 1.4}]"


def make_controller(tmp_path, *overrides):
    config = load_config(ROOT / "cluster" / "tiny.yaml", ["algorithm.group_size=4", "algorithm.groups_per_step=3", REWARDS, *overrides])
    return Controller(config, tmp_path, list(config.data.prompts)), config


def scores_for(group: PromptGroup, a: list[float], b: list[float], invalid_b: int | None = None):
    valid_b = np.ones(4, bool)
    errors = [None] * 4
    if invalid_b is not None:
        valid_b[invalid_b], errors[invalid_b] = False, "timeout"
    return {
        "a": (Scores(group.group_id, "a", np.array(a, np.float32), np.ones(4, bool)), 0.0),
        "b": (Scores(group.group_id, "b", np.array(b, np.float32), valid_b, errors), 0.0),
    }


def test_groups_get_unique_ids_distinct_seeds_and_the_current_version(tmp_path):
    controller, config = make_controller(tmp_path)
    first, second = controller._next_groups(1), controller._next_groups(2)
    groups = first + second
    assert [g.group_id for g in groups] == list(range(6))
    assert len({g.seed for g in groups}) == 6 and all(g.policy_version == 0 and g.group_size == 4 for g in groups)
    assert all(g.prompt == config.data.prompts[g.prompt_id] for g in groups)
    # one epoch visits each prompt once before any repeats
    ids = [g.prompt_id for g in groups] + [g.prompt_id for g in controller._next_groups(3)[:2]]
    assert sorted(ids) == list(range(8))


def three_groups(controller):
    groups = controller._next_groups(1)
    in_flight = [Generated(g, 1, 0, rollout=f"ref{g.group_id}", media=None, info=None) for g in groups]
    scores = {
        groups[0].group_id: scores_for(groups[0], [1, 2, 3, 4], [4, 3, 2, 1]),
        groups[1].group_id: scores_for(groups[1], [1, 2, 3, 4], [4, 3, 2, 1], invalid_b=2),
        groups[2].group_id: scores_for(groups[2], [5, 5, 5, 5], [1, 1, 1, 1]),
    }
    return groups, in_flight, scores


def test_a_group_with_a_missing_score_is_dropped_and_counted(tmp_path):
    controller, _ = make_controller(tmp_path)
    groups, in_flight, scores = three_groups(controller)
    kept, stats = controller._collect_rewards(in_flight, scores)
    batch = controller._advantages(kept)
    assert [t.group_id for t in batch] == [groups[0].group_id, groups[2].group_id]
    assert stats == {"rewards/a/missing": 0.0, "rewards/b/missing": 1.0, "groups/dropped": 1.0}
    assert batch[0].advantages.shape == (2, 4) and np.allclose(batch[0].reward_weights, [0.7, 1.4])
    assert batch[0].rollout == "ref0" and np.all(batch[1].advantages == 0)
    assert list(batch[0].members) == [0, 1, 2, 3]
    stats = controller._advantage_statistics(batch)
    # groups 0 and 2 are trained: 0's rewards a and b are mirror images, 2's are equal (all advantages 0)
    assert stats["advantage/a/max"] == stats["advantage/b/max"] > 0
    assert stats["advantage/a/min"] == stats["advantage/b/min"] < 0 and stats["advantage/a/mean"] == pytest.approx(0.0, abs=1e-6)


def test_on_failure_zero_trains_the_group_with_a_zero_and_counts_it(tmp_path):
    controller, _ = make_controller(tmp_path, "scoring.on_failure=zero")
    groups, in_flight, scores = three_groups(controller)
    kept, stats = controller._collect_rewards(in_flight, scores)
    assert len(kept) == 3 and stats["rewards/b/missing"] == 1.0 and stats["groups/dropped"] == 0.0
    assert kept[1][1][1].tolist() == [4, 3, 0, 1]  # reward b of group 1: the missing member scored 0


def test_on_failure_abort_stops_with_the_reason(tmp_path):
    from raygrpo.controller import RunAborted

    controller, _ = make_controller(tmp_path, "scoring.on_failure=abort")
    groups, in_flight, scores = three_groups(controller)
    with pytest.raises(RunAborted, match="timeout.*on_failure=abort"):
        controller._collect_rewards(in_flight, scores)


def test_weighted_sum_normalises_the_combined_raw_reward_once(tmp_path):
    controller, _ = make_controller(tmp_path, "scoring.combine=weighted_sum")
    groups, in_flight, scores = three_groups(controller)
    kept, _ = controller._collect_rewards(in_flight[:1], scores)
    (train_group,) = controller._advantages(kept)
    combined = 0.7 * np.array([1, 2, 3, 4]) + 1.4 * np.array([4, 3, 2, 1])
    expected = (combined - combined.mean()) / (combined.std(ddof=1) + 1e-8)
    assert train_group.advantages.shape == (1, 4) and train_group.reward_weights.tolist() == [1.0]
    np.testing.assert_allclose(train_group.advantages[0], expected, rtol=1e-5)
    stats = controller._advantage_statistics([train_group])  # one advantage row: the weighted total's
    assert sorted(stats) == [f"advantage/total/{s}" for s in ("max", "mean", "min", "std")]
    assert stats["advantage/total/max"] == pytest.approx(expected.max(), rel=1e-5)


def test_global_std_divides_every_group_by_the_steps_std(tmp_path):
    controller, _ = make_controller(tmp_path, "algorithm={name: dgpo, group_size: 4, groups_per_step: 3, global_std: true}")
    groups, in_flight, scores = three_groups(controller)
    kept, _ = controller._collect_rewards(in_flight[:1] + in_flight[2:], scores)
    first, _ = controller._advantages(kept)
    every_a = np.array([1, 2, 3, 4, 5, 5, 5, 5], dtype=float)
    np.testing.assert_allclose(first.advantages[0], (np.array([1, 2, 3, 4]) - 2.5) / (every_a.std() + 1e-4), rtol=1e-5)


def test_best_of_n_trains_only_the_chosen_members(tmp_path):
    controller, _ = make_controller(tmp_path, "algorithm.best_of_n=2")
    group = controller._next_groups(1)[0]
    kept, _ = controller._collect_rewards([Generated(group, 1, 0, "r", None, None)], {group.group_id: scores_for(group, [1, 2, 3, 9], [1, 2, 3, 9])})
    (train_group,) = controller._advantages(kept)
    assert sorted(train_group.members.tolist()) == [0, 3]


def test_spread_splits_a_group_into_even_parts_with_offsets(tmp_path):
    controller, _ = make_controller(tmp_path, "rollout.spread_groups=true", "algorithm.group_size=5")

    class Pool:
        actors = [object(), object()]

    controller.rollout_pool = Pool()
    (group,) = controller._next_groups(1)[:1]
    parts = controller._split(group)
    assert [(p.member_offset, p.group_size) for p in parts] == [(0, 2), (2, 3)]
    assert all(p.group_id == group.group_id and p.seed == group.seed for p in parts)


def test_merging_parts_joins_scores_in_member_order(tmp_path):
    from raygrpo.contracts import merge_scores

    a = Scores(7, "r", np.array([1.0, 2.0], np.float32), np.array([True, False]), [None, "timeout"])
    b = Scores(7, "r", np.array([3.0], np.float32), np.array([True]))
    merged = merge_scores([a, b])
    assert merged.values.tolist() == [1.0, 2.0, 3.0] and merged.valid.tolist() == [True, False, True]
    assert merged.errors == [None, "timeout", None]


def test_each_abort_keeps_its_weights_in_a_folder_of_its_own_and_says_so_in_run_state(tmp_path):
    import json

    from raygrpo.controller import RunAborted
    from raygrpo.metrics import MetricsLog

    controller, _ = make_controller(tmp_path)

    class Learner:  # what the controller asks of the learner group here: the evaluation weights into a folder
        saves = 0

        def save(self, folder: str) -> str:
            Learner.saves += 1
            (Path(folder) / "weights.txt").write_text(f"save {Learner.saves}")
            return folder

    controller.learner, controller.metrics = Learner(), MetricsLog(tmp_path / "metrics.jsonl")
    for step in (3, 5):  # a run aborted at step 3, resumed, aborted again at step 5
        with pytest.raises(RunAborted, match=rf"no reward left; steps 1..{step - 1} are in .*metrics.jsonl, weights in"):
            controller._abort(RunAborted("no reward left"), step)
    assert (tmp_path / "checkpoint-aborted" / "weights.txt").read_text() == "save 1"
    assert (tmp_path / "checkpoint-aborted-2" / "weights.txt").read_text() == "save 2"
    state = json.loads((tmp_path / "run_state.json").read_text())
    assert (state["status"], state["step"], state["checkpoint"], state["reason"]) == ("aborted", 4, "checkpoint-aborted-2", "no reward left")
