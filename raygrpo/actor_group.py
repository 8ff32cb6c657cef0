"""Groups of workers behind one small API: Ray actors (:class:`ActorGroup`) or plain objects in this
process (:class:`LocalGroup`, ``run.in_process: true``). The controller, the rollout scheduler, the
weight sync and the learner group only ever talk to a group, so the same step runs on a cluster and
under a debugger::

    group = make_group(config, RolloutWorker, resources, [(config,)] * n)   # n workers
    ref = group.call(i, "generate", prompt_group, num_returns=3)           # one call, returns at once
    results = group.foreach("status")                                      # every worker, waited for
    results = group.map("update", shards)                                  # worker i gets shards[i]
    value = get(ref)                                                       # Ray or local refs alike

A call on a :class:`LocalGroup` runs at once, in order, and returns a :class:`LocalRef` holding its
value (or the exception it raised, re-raised by :func:`get`). Ray runs each actor's calls in the
order they were sent too, so a driver that submits in the same order sees the same results either
way: the in-process run of a seed is the Ray run of that seed, number for number (tests check it).
Arguments that are refs are resolved before the call in both, as Ray resolves top-level ObjectRefs.

Health: an actor that dies is restarted by Ray up to ``max_restarts`` times; its calls in flight fail
with ``RayActorError`` and the caller decides what to send again (:mod:`raygrpo.rollout.scheduler`).
:meth:`ActorGroup.wait_alive` waits for a restart to finish. When a whole node dies, Ray moves its
bundles to nodes with room; a bundle no node has room for waits, unplaced, and :meth:`ActorGroup.bundle_nodes`
reports it so (None): its actor cannot come back until a node joins. Objects in this process never die.

Layout: by default a group is one placement group (PACK) placed whole before any actor starts: the learner's
ranks and a fixed rollout pool start together or not at all. An ``elastic`` group (the rollout pool with
``rollout.autoscale``) gives every actor a placement group of its own, so :meth:`ActorGroup.add_workers` can
start workers whose bundles wait for a node (Ray's autoscaler adds one) without holding the others, and
:meth:`ActorGroup.remove_worker` hands one worker's resources back. A removed worker's slot stays (empty), so
indices never shift under work in flight. A :class:`LocalGroup` resizes the same way, with objects here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from raygrpo.placement import PlanError, RoleResources, plan_table

logger = logging.getLogger(__name__)

RESTART_TIMEOUT_S = 600.0  # how long to wait for Ray to bring a dead actor back (model loading included)
LOCAL_NODE = "local"  # the node of every worker of a LocalGroup (this process)


class LocalRef:
    """The outcome of a call on a :class:`LocalGroup`: its value, or the exception it raised."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self._value, self._error = value, error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


def get(refs: Any, timeout: float | None = None) -> Any:
    """The value of a ref, or the values of a list of refs (Ray ObjectRefs or LocalRefs, not mixed)."""
    if isinstance(refs, LocalRef):
        return refs.result()
    if isinstance(refs, list) and all(isinstance(r, LocalRef) for r in refs):
        return [r.result() for r in refs]
    import ray

    return ray.get(refs, timeout=timeout)


def _resolve(value: Any) -> Any:
    return value.result() if isinstance(value, LocalRef) else value


class _Group:
    """What both kinds of group build on :meth:`call`: one method on every worker, or one item per worker."""

    resources: RoleResources
    actors: list

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, index: int, method: str, *args: Any, num_returns: int = 1) -> Any:
        raise NotImplementedError

    def foreach(self, method: str, *args: Any) -> list:
        """``method(*args)`` on every worker at once; their results in worker order (the first failure raises)."""
        return get([self.call(i, method, *args) for i in range(len(self))])

    def map(self, method: str, items: Sequence) -> list:
        """``workers[i].method(items[i])`` for every worker at once; their results in worker order."""
        if len(items) != len(self):
            raise ValueError(f"{self.resources.role}: {len(items)} items for {len(self)} workers")
        return get([self.call(i, method, item) for i, item in enumerate(items)])

    def add_workers(self, args: Sequence[tuple]) -> list[int]:
        """Start one more worker per argument tuple, without waiting for it; the new workers' indices."""
        raise NotImplementedError

    def remove_worker(self, index: int) -> None:
        """Stop worker ``index`` and free what it holds; its slot stays empty (indices do not shift)."""
        raise NotImplementedError

    def started(self, index: int) -> bool:
        """Whether worker ``index`` (added by :meth:`add_workers`) has finished starting; raises its start-up error."""
        raise NotImplementedError


class LocalGroup(_Group):
    """``count`` instances of ``actor_cls`` in this process; the API of :class:`ActorGroup`."""

    def __init__(self, actor_cls: type, resources: RoleResources, args: Sequence[tuple]):
        if len(args) != resources.count:
            raise ValueError(f"{resources.role}: {len(args)} argument tuples for {resources.count} workers")
        self.resources, self.actor_cls = resources, actor_cls
        self.actors = [actor_cls(*a) for a in args]

    def call(self, index: int, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Run ``actors[index].method(*args)`` now; a LocalRef (``num_returns`` > 1: a tuple of them)."""
        try:
            value = getattr(self.actors[index], method)(*(_resolve(a) for a in args))
        except Exception as exc:  # noqa: BLE001 - re-raised where the caller gets the ref, as Ray does
            error = LocalRef(error=exc)
            return error if num_returns == 1 else tuple(error for _ in range(num_returns))
        if num_returns == 1:
            return LocalRef(value)
        return tuple(LocalRef(v) for v in value)

    def ready(self) -> list:
        return []  # built in __init__

    def add_workers(self, args: Sequence[tuple]) -> list[int]:
        first = len(self.actors)
        self.actors += [self.actor_cls(*a) for a in args]  # built at once: in process nothing waits for a node
        return list(range(first, len(self.actors)))

    def remove_worker(self, index: int) -> None:
        self.actors[index] = None

    def started(self, index: int) -> bool:
        return True

    def wait_alive(self, index: int, timeout_s: float = RESTART_TIMEOUT_S) -> bool:
        return self.actors[index] is not None

    def bundle_nodes(self) -> list[str | None]:
        return [LOCAL_NODE if actor is not None else None for actor in self.actors]

    def dead(self, timeout_s: float = 30.0) -> list[int]:
        return []

    def shutdown(self) -> None:
        self.actors = []  # garbage: what a worker owns (a judge's vLLM server) is released with it


class ActorGroup(_Group):
    """``resources.count`` Ray actors of ``actor_cls``, packed onto as few nodes as possible in one placement
    group of their own, or (``elastic``) each in a placement group of its own; actor ``i`` is built with ``args[i]``.

    Construction returns once the placement group(s) are placed and the actors are scheduled; wait on
    :meth:`ready` (every group's refs at once, so their model loading overlaps). ``max_restarts``: how
    often Ray restarts a dead actor. ``out_of_order``: run each call as soon as its arguments are ready
    (reward replicas: a group still generating must not hold up one that is done), one at a time all the same.
    ``max_concurrency`` > 1: that many calls run at once, each in a thread (raygrpo/rollout/continuous.py).
    """

    def __init__(
        self,
        actor_cls: type,
        resources: RoleResources,
        args: Sequence[tuple] | Callable[[ActorGroup], Sequence[tuple]],
        *,
        max_restarts: int = 0,
        out_of_order: bool = False,
        elastic: bool = False,
        max_concurrency: int = 1,
    ):
        """``args``: one tuple per actor, or a function of the placed (still empty) group that makes them
        (the learner group asks its first bundle's node for a rendezvous address first)."""
        import ray

        self.resources, self.elastic = resources, elastic
        self._remote_cls = ray.remote(actor_cls)
        # A restarted actor comes back in the same bundle; the caller re-sends weights and work.
        self._options = {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus, "max_restarts": max_restarts}
        self._options["allow_out_of_order_execution"] = out_of_order
        if max_concurrency > 1:  # a threaded actor (continuous-batching rollout): calls run at once, in threads,
            # in no guaranteed order (Ray refuses an ordered threaded actor); the actor orders what must be ordered itself
            self._options.update(max_concurrency=max_concurrency, allow_out_of_order_execution=True)
        if elastic:
            self.slots = [(self._placement_group(1, i), 0) for i in range(resources.count)]
        else:
            group = self._placement_group(resources.count)
            self.slots = [(group, i) for i in range(resources.count)]
        try:
            ray.get([pg.ready() for pg in self._placement_groups()], timeout=60)
        except ray.exceptions.GetTimeoutError:
            self._remove_placement_groups()
            how = f"{resources.count} x one placement group of {resources.bundle}" if elastic else f"{resources.count} x {resources.bundle}"
            raise PlanError(
                f"placement group for {resources.role} ({how}) was not placed within 60 s: "
                "the cluster's free resources are fragmented or held by other jobs (have = free now):\n"
                + plan_table([resources], ray.available_resources())
            ) from None
        if callable(args):
            args = args(self)
        if len(args) != resources.count:
            self._remove_placement_groups()
            raise ValueError(f"{resources.role}: {len(args)} argument tuples for {resources.count} actors")
        self.actors = [self._start_actor(i, actor_args) for i, actor_args in enumerate(args)]
        self._started: dict[int, Any] = {}  # index -> ready ref of a worker added since, until it has started

    def _placement_group(self, count: int, worker: int | None = None):
        from ray.util.placement_group import placement_group

        name = f"raygrpo-{self.resources.role}" + (f"-{worker}" if worker is not None else "")
        return placement_group([self.resources.bundle] * count, strategy="PACK", name=name)

    def _placement_groups(self) -> list:
        """Every placement group the group holds, each once."""
        return list({id(slot[0]): slot[0] for slot in self.slots if slot is not None}.values())

    def _remove_placement_groups(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self._placement_groups():
            remove_placement_group(group)

    def _strategy(self, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group, bundle = self.slots[index]
        return PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle)

    def _start_actor(self, index: int, actor_args: tuple) -> Any:
        return self._remote_cls.options(**self._options, scheduling_strategy=self._strategy(index)).remote(*actor_args)

    def add_workers(self, args: Sequence[tuple]) -> list[int]:
        """Elastic groups only: one placement group and actor per tuple, not waited for (a bundle may wait for a
        node the autoscaler is still adding); :meth:`started` says when each is up."""
        if not self.elastic:
            raise ValueError(f"{self.resources.role}: a group in one placement group cannot grow (start it elastic)")
        added = []
        for actor_args in args:
            index = len(self.slots)
            self.slots.append((self._placement_group(1, index), 0))
            self.actors.append(self._start_actor(index, actor_args))
            self._started[index] = self.actors[index].__ray_ready__.remote()  # one ref, polled: no task per poll
            added.append(index)
        return added

    def started(self, index: int) -> bool:
        import ray

        ref = self._started.get(index)
        if ref is None:
            return self.actors[index] is not None
        if not ray.wait([ref], timeout=0)[0]:
            return False
        del self._started[index]
        ray.get(ref)  # its start-up error, if any
        return True

    def remove_worker(self, index: int) -> None:
        """Elastic groups only: kill actor ``index`` and remove its placement group (its resources go back)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if not self.elastic:
            raise ValueError(f"{self.resources.role}: a group in one placement group cannot shrink (start it elastic)")
        ray.kill(self.actors[index])
        remove_placement_group(self.slots[index][0])
        self.actors[index], self.slots[index] = None, None
        self._started.pop(index, None)

    def run_on_bundle(self, index: int, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` as a task on the node of bundle ``index`` (e.g. to pick a free port there), waited for."""
        import ray

        # A sliver of the bundle's CPU: the task must fit inside it and the bundle's actor does not exist yet.
        return ray.get(ray.remote(fn).options(num_cpus=0.001, scheduling_strategy=self._strategy(index)).remote(*args))

    def single_node(self) -> bool:
        """Whether every bundle of the group sits on one node (then its members can meet on loopback)."""
        return len(set(filter(None, self.bundle_nodes()))) == 1

    def call(self, index: int, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Send ``actors[index].method(*args)``; its ObjectRef (``num_returns`` > 1: a list of them)."""
        remote_method = getattr(self.actors[index], method)
        if num_returns != 1:
            remote_method = remote_method.options(num_returns=num_returns)
        return remote_method.remote(*args)

    def ready(self) -> list:
        """Refs that resolve once every actor's ``__init__`` (model loading) has finished, or raise its error."""
        return [actor.__ray_ready__.remote() for actor in self.actors]

    def wait_alive(self, index: int, timeout_s: float = RESTART_TIMEOUT_S) -> bool:
        """True once actor ``index`` answers (at once if it is alive; after Ray restarted it if it was
        dying); False if it is gone for good (out of restarts), if its bundle has no node (its node died
        and no other has room: it cannot come back until one joins), or if it is not back within ``timeout_s``
        (0: ask once)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            if self.bundle_nodes()[index] is None:
                return False  # it would wait for a node forever (and asking a dead node's actor takes seconds)
            try:
                ray.get(self.actors[index].__ray_ready__.remote(), timeout=max(deadline - time.monotonic(), 0.1))
                return True
            except ray.exceptions.ActorUnavailableError:
                # Restarting (its calls fail until it is back), or its node died and Ray has not noticed yet.
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False

    def dead(self, timeout_s: float = 30.0) -> list[int]:
        """Indices of the actors that are dead for good (out of restarts, their node or process gone). An actor
        that is unreachable is asked again until ``timeout_s``: Ray reports a dead node's actors unavailable until
        it has noticed the node is gone, then dead. One still restarting then, or busy (waiting in a collective
        for a dead peer), or answering, is not counted."""
        import ray

        deadline = time.monotonic() + timeout_s
        pending, dead = set(range(len(self.actors))), []
        while pending:
            refs = {i: self.actors[i].__ray_ready__.remote() for i in sorted(pending)}
            done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0.1))
            for i, ref in refs.items():
                try:
                    if ref in done:
                        ray.get(ref)
                    pending.discard(i)  # answered, or busy
                except ray.exceptions.ActorUnavailableError:
                    pass  # restarting, or its node's death not known yet: ask again
                except ray.exceptions.RayActorError:
                    dead.append(i)
                    pending.discard(i)
            if pending and time.monotonic() >= deadline:
                break
            time.sleep(0.5 if pending else 0)
        return sorted(dead)

    def bundle_nodes(self) -> list[str | None]:
        """The live node each actor's bundle is on now (Ray node ids), None for a bundle without one: its node
        died and Ray found no room for it elsewhere yet. A bundle moves only when its node dies, so a changed
        node means the actor was lost with its node, and the objects it had made there with it."""
        import ray
        from ray.util.placement_group import placement_group_table

        alive = {node["NodeID"] for node in ray.nodes() if node.get("Alive")}
        tables = {id(group): placement_group_table(group)["bundles_to_node_id"] for group in self._placement_groups()}
        placed = [tables[id(slot[0])].get(slot[1]) if slot is not None else None for slot in self.slots]
        return [node if node in alive else None for node in placed]

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            if actor is not None:
                ray.kill(actor)
        self._remove_placement_groups()


def make_group(in_process: bool, actor_cls: type, resources: RoleResources, args: Sequence[tuple], **options: Any) -> ActorGroup | LocalGroup:
    """A :class:`LocalGroup` for ``run.in_process`` runs, else an :class:`ActorGroup` (``options``: its restart/ordering/elastic knobs)."""
    if in_process:
        return LocalGroup(actor_cls, resources, args)
    return ActorGroup(actor_cls, resources, args, **options)


def lost_actor(exc: BaseException) -> bool:
    """Whether a failed call means its actor died (the work can be sent again), not that the call itself raised."""
    import ray

    return isinstance(exc, ray.exceptions.RayActorError)
