"""The learner group: M :class:`~raygrpo.learner.learner.Learner` ranks in one torch.distributed group.

The controller holds one :class:`LearnerGroup` (like RLlib's LearnerGroup) and calls it as one learner::

    learner = LearnerGroup(config, resources)     # ranks scheduled; they join the process group as they start
    get(learner.ready())                          # every rank: process group joined, model loaded, sharded
    metrics = learner.update(batch)               # whole groups sharded over the ranks, one step together
    ref = learner.export_weights()                # rank 0's WeightsMessage (every rank joins the gather)
    learner.save(folder); learner.save_state(folder); learner.load_state(folder)

It also owns the policy version on the driver: the version of the weights the ranks hold, as the last
update or restore reported it (the ranks count it; nothing else does).

Every method that touches the sharded network runs on all ranks at once (their collectives must
meet); only rank 0's answer is returned. A rank that fails makes the call raise: the group is
fail-stop, and a run whose learner dies resumes from its latest checkpoint.
With ``run.in_process`` the group is one Learner object in the driver process (no process group).
"""

from __future__ import annotations

import logging

from raygrpo.actor_group import ActorGroup, LocalGroup, get
from raygrpo.config import Config
from raygrpo.contracts import LearnerMetrics
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import split_batch
from raygrpo.net import rendezvous_address  # torch-free: the task's worker imports only that module
from raygrpo.placement import RoleResources

logger = logging.getLogger(__name__)


class LearnerGroup:
    """``resources.count`` learner ranks; the driver-side handle the controller holds."""

    def __init__(self, config: Config, resources: RoleResources):
        if resources.count != config.learner.num_ranks:
            raise ValueError(f"learner resources ask for {resources.count} actors, learner.num_ranks is {config.learner.num_ranks}")
        world = resources.count
        if config.run.in_process:
            self.ranks: ActorGroup | LocalGroup = LocalGroup(Learner, resources, [(config,)])
        else:

            def rank_args(group: ActorGroup) -> list[tuple]:
                # Rank 0's node offers the rendezvous; all ranks on one node (PACK usually does it) meet on loopback.
                host, port = group.run_on_bundle(0, rendezvous_address, group.single_node())
                logger.info("learner group: %d ranks, rendezvous %s:%d", world, host, port)
                return [(config, rank, world, (host, port)) for rank in range(world)]

            self.ranks = ActorGroup(Learner, resources, rank_args)
        self.policy_version = 0

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def ready(self) -> list:
        """Refs that resolve once every rank has joined the process group and built its learner (or raise its error)."""
        return self.ranks.ready()

    def update(self, batch) -> LearnerMetrics:
        """One training step: rank r trains slots ``[r k, (r + 1) k)`` of the batch, ``k = ceil(n / M)``; global metrics."""
        metrics = self.ranks.map("update", split_batch(batch, self.world_size))[0]
        self.policy_version = metrics.policy_version
        return metrics

    def export_weights(self):
        """Ref to rank 0's :class:`WeightsMessage`; the other ranks' calls only join the gather.

        On Ray rank 0 puts the message itself (``Learner.publish_weights``: no snapshot copy) and its
        ObjectRef is returned once the put is done; in process the ref holds a snapshot copy."""
        method = "export_weights" if isinstance(self.ranks, LocalGroup) else "publish_weights"
        refs = [self.ranks.call(rank, method) for rank in range(self.world_size)]
        # Ranks > 0 return None; waiting on them surfaces a failed rank here rather than as a hang later.
        if any(value is not None for value in get(refs[1:])):
            raise RuntimeError("learner ranks > 0 returned weights")
        return refs[0] if method == "export_weights" else get(refs[0])

    def node_ip(self) -> str:
        """The address of rank 0's node (the sender of the weight broadcast)."""
        return get(self.ranks.call(0, "node_ip"))

    def weight_group_address(self, loopback: bool):
        """Ref to ``(host, port)`` on rank 0's node for the learner-to-rollout broadcast group's store."""
        return self.ranks.call(0, "rendezvous", loopback)

    def join_weight_group(self, host: str, port: int, world_size: int, timeout_s: float = 600.0):
        """Rank 0 joins the broadcast group as its sender; resolves once every member joined (start theirs first)."""
        return self.ranks.call(0, "join_weight_group", host, port, world_size, timeout_s)

    def weight_names(self) -> list[str]:
        """The tensors every broadcast sends, in its order (the receivers pass them to ``receive_weights``)."""
        return get(self.ranks.call(0, "weight_names"))

    def send_weights(self):
        """Broadcast the sampling weights from rank 0 (every rank joins the gather); ref to ``(policy_version, digest)``."""
        return [self.ranks.call(rank, "send_weights") for rank in range(self.world_size)][0]

    def save(self, folder: str) -> str:
        """Evaluation weights in diffusers' layout (``transformer/`` or ``transformer_lora/``); returns the folder."""
        return self.ranks.foreach("save", folder)[0]

    def save_state(self, folder: str, rollback: bool = False) -> None:
        """The full training state for an exact resume (``raygrpo/learner/state.py``); every rank writes its shards.
        ``rollback``: only what a guard rollback restores (a rollback state, the same module)."""
        self.ranks.foreach("save_state", folder, rollback)

    def load_state(self, folder: str) -> int:
        """Restore :meth:`save_state`'s folder on every rank; returns (and now holds) the restored policy version."""
        versions = self.ranks.foreach("load_state", folder)
        if len(set(versions)) != 1:
            raise RuntimeError(f"learner ranks restored different policy versions {versions} from {folder}")
        self.policy_version = versions[0]
        return self.policy_version

    def dead_ranks(self) -> list[int]:
        """Ranks whose actor died (its process or its node); the group has no restarts, so they stay dead."""
        return self.ranks.dead()

    def shutdown(self) -> None:
        self.ranks.shutdown()
