"""The resource plan against a cluster's nodes, before any actor starts (no Ray needed)."""

import pytest

from raygrpo.placement import PlanError, RoleResources, check_plan_fits, plan_totals, unplaceable_bundles


def nodes(count: int, cpus: float, gpus: float) -> list[dict]:
    return [{"CPU": cpus, "GPU": gpus, "address": f"10.0.0.{i}"} for i in range(count)]


def test_enough_gpus_in_total_but_not_on_one_node_fails_with_the_nodes_listed():
    plan = [RoleResources("rollout", 4, 2, 1), RoleResources("learner", 2, 4, 2)]  # 8 GPUs, learner ranks want 2 each
    cluster = nodes(8, 16, 1)
    have = {"CPU": 128, "GPU": 8}
    assert plan_totals(plan)["GPU"] == 8
    assert unplaceable_bundles(plan, cluster) == ["learner"]
    with pytest.raises(PlanError) as raised:
        check_plan_fits(plan, have, cluster)
    message = str(raised.value)
    assert "not on single nodes for every actor of learner" in message and "node 10.0.0.7: CPU 16, GPU 1" in message
    check_plan_fits(plan, have)  # the totals alone would have let it through


def test_a_plan_that_packs_fits_including_fractional_gpus():
    plan = [
        RoleResources("rollout", 6, 4, 1),
        RoleResources("reward:hps", 2, 1, 0.5),  # two replicas share one GPU
        RoleResources("learner", 1, 8, 1),
    ]
    cluster = nodes(1, 64, 8)
    assert unplaceable_bundles(plan, cluster) == []
    check_plan_fits(plan, {"CPU": 64, "GPU": 8}, cluster)
    # one GPU more than the node has (7 whole + 2 halves + 1 = 9): some role is reported
    assert unplaceable_bundles(plan + [RoleResources("reward:clip", 1, 1, 1)], cluster)


def test_cpu_only_plans_place_on_cpu_nodes():
    plan = [RoleResources("rollout", 2, 1, 0), RoleResources("reward:jpeg", 1, 0, 0), RoleResources("learner", 2, 1, 0)]
    assert unplaceable_bundles(plan, nodes(1, 4.01, 0)) == []
    # an actor asking for no CPU still reserves a sliver of one in its placement group: 4 CPUs are not enough
    assert unplaceable_bundles(plan, nodes(1, 4, 0)) == ["reward:jpeg"]
    assert plan_totals(plan)["CPU"] == pytest.approx(4.01)
