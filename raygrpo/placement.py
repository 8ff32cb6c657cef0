"""The resource plan: what each role asks of the cluster, checked against it before any actor starts
(each role then gets one placement group of its own: :class:`raygrpo.actor_group.ActorGroup`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from raygrpo.config import Config

logger = logging.getLogger(__name__)


class PlanError(RuntimeError):
    """The resource plan cannot be met; the message has a need-vs-have table."""


@dataclass(frozen=True)
class RoleResources:
    role: str  # "rollout", "learner", "reward:<name>"
    count: int
    num_cpus: float  # per actor
    num_gpus: float  # per actor

    @property
    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v > 0} or {"CPU": 0.01}


def resource_plan(config: Config) -> list[RoleResources]:
    plan = [RoleResources("rollout", config.rollout.num_workers, config.rollout.num_cpus, config.rollout.num_gpus)]
    plan += [RoleResources(f"reward:{r.name}", r.replicas, r.num_cpus, r.num_gpus) for r in config.rewards]
    plan.append(RoleResources("learner", config.learner.num_ranks, config.learner.num_cpus, config.learner.num_gpus))
    return plan


def plan_totals(plan: list[RoleResources]) -> dict[str, float]:
    """What the placement groups reserve (an actor asking for nothing still reserves a sliver of CPU)."""
    return {res: sum(r.count * r.bundle.get(res, 0.0) for r in plan) for res in ("CPU", "GPU")}


def plan_table(plan: list[RoleResources], have: dict[str, float]) -> str:
    rows = [f"  {'role':<24}{'actors':>7}{'CPU each':>10}{'GPU each':>10}"]
    rows += [f"  {r.role:<24}{r.count:>7}{r.num_cpus:>10g}{r.num_gpus:>10g}" for r in plan]
    need = plan_totals(plan)
    rows.append(f"  {'need':<31}{need['CPU']:>10g}{need['GPU']:>10g}")
    rows.append(f"  {'have':<31}{have.get('CPU', 0):>10g}{have.get('GPU', 0):>10g}")
    return "\n".join(rows)


def node_resources() -> list[dict]:
    """The total CPU and GPU of every alive node of the connected Ray cluster, and its ``address``."""
    return [
        {res: float(node["Resources"].get(res, 0.0)) for res in ("CPU", "GPU")} | {"address": node.get("NodeManagerAddress", "?")}
        for node in ray.nodes()
        if node.get("Alive")
    ]


def unplaceable_bundles(plan: list[RoleResources], nodes: list[dict]) -> list[str]:
    """Roles whose actors do not fit on the nodes: first-fit of every bundle, largest first, onto the nodes'
    totals. Each actor's bundle must fit on one node, so a cluster can have enough GPUs in all and still
    fail (8 one-GPU nodes cannot hold a 2-GPU actor). Ray places the roles' placement groups one by one,
    so this is a necessary condition checked before anything starts, not a guarantee."""
    free = [dict(node) for node in nodes]
    bundles = sorted(
        ((r.role, r.bundle) for r in plan for _ in range(r.count)),
        key=lambda item: (item[1].get("GPU", 0.0), item[1].get("CPU", 0.0)),
        reverse=True,
    )
    failed = []
    for role, bundle in bundles:
        for node in free:
            if all(node.get(res, 0.0) + 1e-9 >= amount for res, amount in bundle.items()):
                for res, amount in bundle.items():
                    node[res] -= amount
                break
        else:
            failed.append(role)
    return sorted(set(failed), key=failed.index)


def check_plan_fits(plan: list[RoleResources], have: dict[str, float], nodes: list[dict] | None = None) -> None:
    """Fail with a need-vs-have table when the cluster cannot hold the plan: in total, or (``nodes``) node by node."""
    need = plan_totals(plan)
    short = [res for res in ("CPU", "GPU") if need[res] > have.get(res, 0) + 1e-9]
    if short:
        raise PlanError(
            f"the run needs more {' and '.join(short)} than the cluster has:\n{plan_table(plan, have)}\n"
            "Lower rollout.num_workers / the per-actor num_cpus and num_gpus, or add nodes."
        )
    failed = unplaceable_bundles(plan, nodes) if nodes is not None else []
    if failed:
        per_node = "\n".join(f"  node {n.get('address', i)}: CPU {n.get('CPU', 0):g}, GPU {n.get('GPU', 0):g}" for i, n in enumerate(nodes))
        raise PlanError(
            f"the cluster has enough CPU and GPU in total, but not on single nodes for every actor of {', '.join(failed)} "
            f"(each actor's CPUs and GPUs must sit on one node):\n{plan_table(plan, have)}\n{per_node}\n"
            "Give those actors fewer GPUs/CPUs each, or add larger nodes."
        )
