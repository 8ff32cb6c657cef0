"""The learner group: M learner ranks (Ray actors, one placement group) in one torch.distributed group.

The controller holds one :class:`LearnerGroup` (like RLlib's LearnerGroup) and calls it as it
called the single learner::

    group = LearnerGroup(config, resources)      # actors scheduled; rank 0 picks the rendezvous
    ray.get(group.ready())                        # every rank: process group joined, model loaded, sharded
    metrics = group.update(batch)                 # whole groups sharded over the ranks, one step together
    ref = group.export_weights()                  # rank 0's WeightsMessage (every rank joins the gather)
    group.save(folder); group.save_state(folder); version = group.load_state(folder)

For ``rollout.weight_sync: collective`` rank 0 is also the sender (rank 0) of the learner-to-rollout
broadcast group (``raygrpo/weight_broadcast.py``)::

    host, port = ray.get(group.weight_group_address(loopback))
    ray.get([group.join_weight_group(host, port, 1 + n_workers)] +
            [w.join_weight_group.remote(host, port, 1 + i, 1 + n_workers) for i, w in enumerate(workers)])
    names = group.weight_names()
    sent = group.send_weights()                                   # ref: (policy_version, fingerprint)
    got = [w.receive_weights.remote(version, names) for w in workers]   # each: (policy_version, fingerprint)

Every method that touches the sharded network runs on all ranks at once (their collectives must
meet); only rank 0's answer is returned. A rank that fails makes the call raise.
"""

from __future__ import annotations

import logging

import ray

from raygrpo.config import Config
from raygrpo.contracts import LearnerMetrics, TrainGroup, WeightsMessage
from raygrpo.learner.fsdp import init_process_group, rendezvous_address
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import Shard, split_batch
from raygrpo.placement import ActorPool, RoleResources
from raygrpo.weight_broadcast import WeightBroadcastGroup

logger = logging.getLogger(__name__)


class LearnerRank:
    """One rank as a Ray actor: it joins the process group first, then builds its :class:`Learner` (FSDP needs the group)."""

    def __init__(self, config: Config):
        self.config = config
        self.learner: Learner | None = None

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def rendezvous(self, loopback: bool) -> tuple[str, int]:
        """Rank 0: an address on this node and a free port there, for every rank's ``init_process_group``."""
        return rendezvous_address(loopback)

    def join(self, rank: int, world_size: int, host: str, port: int) -> int:
        init_process_group(rank, world_size, host, port, use_cuda=self.config.learner.num_gpus > 0)
        self.learner = Learner(self.config, rank=rank, world_size=world_size)
        return rank

    def update(self, batch: list[TrainGroup], shard: Shard) -> LearnerMetrics:
        return self.learner.update(batch, shard)

    def export_weights(self) -> WeightsMessage | None:
        return self.learner.export_weights()

    def save(self, folder: str) -> str | None:
        return self.learner.save(folder)

    def weight_names(self) -> list[str]:
        return self.learner.weight_names()

    def join_weight_group(self, host: str, port: int, world_size: int, timeout_s: float = 600.0) -> int:
        """Rank 0 only: join the learner-to-rollout broadcast group as its sender (its rank 0), leaving an older one."""
        if getattr(self, "weight_group", None) is not None:
            self.weight_group.close()
        self.weight_group = WeightBroadcastGroup(host, port, 0, world_size, self.learner.device, timeout_s=timeout_s)
        return 0

    def send_weights(self) -> tuple[int, int] | None:
        """Every rank gathers the sampling weights tensor by tensor; rank 0 broadcasts each as it is gathered
        and returns ``(policy_version, fingerprint)``. No rank holds a second whole copy of the network."""
        with self.learner.sampling_tensors() as tensors:
            if self.learner.rank != 0:
                for _ in tensors:  # join every gather
                    pass
                return None
            return self.learner.policy_version, self.weight_group.send(tensors)

    def save_state(self, folder: str) -> None:
        self.learner.save_state(folder)

    def load_state(self, folder: str) -> int:
        return self.learner.load_state(folder)


class LearnerGroup:
    """``resources.count`` learner ranks; the driver-side handle the controller holds."""

    def __init__(self, config: Config, resources: RoleResources):
        if resources.count != config.learner.num_ranks:
            raise ValueError(f"learner resources ask for {resources.count} actors, learner.num_ranks is {config.learner.num_ranks}")
        self.config = config
        self.pool = ActorPool(resources, LearnerRank, config)
        self.ranks = self.pool.actors
        # All ranks on one node (the PACK placement usually does it): rendezvous on loopback.
        node_ips = ray.get([rank.node_ip.remote() for rank in self.ranks])
        host, port = ray.get(self.ranks[0].rendezvous.remote(len(set(node_ips)) == 1))
        world = len(self.ranks)
        self._joined = [rank.join.remote(i, world, host, port) for i, rank in enumerate(self.ranks)]
        logger.info("learner group: %d ranks, rendezvous %s:%d", world, host, port)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def ready(self) -> list[ray.ObjectRef]:
        """Refs that resolve once every rank has joined the process group and built its learner (or raise its error)."""
        return list(self._joined)

    def update(self, batch: list[TrainGroup]) -> LearnerMetrics:
        """One training step: rank r trains slots ``[r k, (r + 1) k)`` of the batch, ``k = ceil(n / M)``; global metrics."""
        refs = [rank.update.remote(groups, shard) for rank, (groups, shard) in zip(self.ranks, split_batch(batch, self.world_size))]
        return ray.get(refs)[0]

    def export_weights(self) -> ray.ObjectRef:
        """Ref to rank 0's :class:`WeightsMessage`; the other ranks' calls only join the gather."""
        refs = [rank.export_weights.remote() for rank in self.ranks]
        self._check_others(refs[1:])
        return refs[0]

    def node_ip(self) -> str:
        """The address of rank 0's node (the sender of the weight broadcast)."""
        return ray.get(self.ranks[0].node_ip.remote())

    def weight_group_address(self, loopback: bool) -> ray.ObjectRef:
        """Ref to ``(host, port)`` on rank 0's node for the learner-to-rollout broadcast group's store."""
        return self.ranks[0].rendezvous.remote(loopback)

    def join_weight_group(self, host: str, port: int, world_size: int, timeout_s: float = 600.0) -> ray.ObjectRef:
        """Rank 0 joins the broadcast group as its sender; resolves once every member joined (start theirs first)."""
        return self.ranks[0].join_weight_group.remote(host, port, world_size, timeout_s)

    def weight_names(self) -> list[str]:
        """The tensors every broadcast sends, in its order (the receivers pass them to ``receive_weights``)."""
        return ray.get(self.ranks[0].weight_names.remote())

    def send_weights(self) -> ray.ObjectRef:
        """Broadcast the sampling weights from rank 0 (every rank joins the gather); ref to ``(policy_version, fingerprint)``."""
        refs = [rank.send_weights.remote() for rank in self.ranks]
        return refs[0]

    def save(self, folder: str) -> str:
        """Evaluation weights in diffusers' layout (``transformer/`` or ``transformer_lora/``); returns the folder."""
        return ray.get([rank.save.remote(folder) for rank in self.ranks])[0]

    def save_state(self, folder: str) -> None:
        """The full training state for an exact resume (``raygrpo/learner/state.py``); every rank writes its shards."""
        ray.get([rank.save_state.remote(folder) for rank in self.ranks])

    def load_state(self, folder: str) -> int:
        """Restore :meth:`save_state`'s folder on every rank; returns the restored policy version."""
        versions = ray.get([rank.load_state.remote(folder) for rank in self.ranks])
        if len(set(versions)) != 1:
            raise RuntimeError(f"learner ranks restored different policy versions {versions} from {folder}")
        return versions[0]

    def shutdown(self) -> None:
        self.pool.shutdown()

    @staticmethod
    def _check_others(refs: list[ray.ObjectRef]) -> None:
        # Ranks > 0 return None; waiting on them surfaces a failed rank here rather than as a hang later.
        failed = [value for value in ray.get(refs) if value is not None]
        if failed:
            raise RuntimeError(f"learner ranks > 0 returned weights: {len(failed)} unexpected messages")
