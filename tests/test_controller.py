"""The controller's bookkeeping without Ray: group planning, advantages, dropped groups, best-of-N."""

import numpy as np

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


def test_a_group_with_a_missing_score_is_dropped_and_counted(tmp_path):
    controller, _ = make_controller(tmp_path)
    groups = controller._next_groups(1)
    in_flight = [Generated(g, rollout=f"ref{g.group_id}", media=None, info=None) for g in groups]
    scores = {
        groups[0].group_id: scores_for(groups[0], [1, 2, 3, 4], [4, 3, 2, 1]),
        groups[1].group_id: scores_for(groups[1], [1, 2, 3, 4], [4, 3, 2, 1], invalid_b=2),
        groups[2].group_id: scores_for(groups[2], [5, 5, 5, 5], [1, 1, 1, 1]),
    }
    batch, rewards, stats = controller._advantages(in_flight, scores)
    assert [t.group_id for t in batch] == [groups[0].group_id, groups[2].group_id]
    assert stats == {"groups/dropped": 1.0, "groups/zero_std": 1.0, "groups/trained": 2.0}
    assert rewards.shape == (8, 2)
    assert batch[0].advantages.shape == (2, 4) and np.allclose(batch[0].reward_weights, [0.7, 1.4])
    assert batch[0].rollout == "ref0" and np.all(batch[1].advantages == 0)
    assert list(batch[0].members) == [0, 1, 2, 3]


def test_best_of_n_trains_only_the_chosen_members(tmp_path):
    controller, _ = make_controller(tmp_path, "algorithm.best_of_n=2")
    group = controller._next_groups(1)[0]
    batch, _, _ = controller._advantages([Generated(group, "r", None, None)], {group.group_id: scores_for(group, [1, 2, 3, 9], [1, 2, 3, 9])})
    assert sorted(batch[0].members.tolist()) == [0, 3]
