"""Weight sync by collective broadcast: learner rank 0 sends, every rollout worker receives in place.

``rollout.weight_sync: collective`` (the default when both roles have GPUs) moves each new version
through a process group of its own: learner rank 0 is rank 0 of it, rollout worker ``i`` is rank
``i + 1``. NCCL on GPUs, gloo on CPU (which is how it is tested here). The group is built directly
from a ``TCPStore`` rather than ``init_process_group``, so it lives beside the learner's FSDP group
and needs nothing of the rollout workers' (they have no default group).

Tensors travel as their raw bytes (``uint8`` views: bfloat16 included, whatever the backend
supports) in sorted name order, straight into the receivers' parameters, with no copy in the object
store. Both sides compute the same digest as the object-store path (``raygrpo/weights.py``,
``rollout.weight_verify``): the sender tensor by tensor as it sends, each receiver from what its
network holds afterwards. ``sample`` (the default) reads about a thousand elements per tensor where
the tensor is (on a GPU: one small gather and read-back per tensor); ``full`` reads every byte (on a
GPU through a copy to the CPU). The controller requires every worker's digest to equal the learner's,
so a short or misrouted transfer fails loudly.

The object-store path (``weights.py``) stays the default on CPU: there a broadcast buys nothing over
Ray's shared memory, and it needs no extra ports.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from raygrpo.weights import Verify, digest, digest_step

logger = logging.getLogger(__name__)

_PREFIX = "raygrpo-weights"


class WeightBroadcastGroup:
    """One member of the learner-to-rollout broadcast group (rank 0 = the sender, which hosts the store).

    Construction blocks until all ``world_size`` members have joined: start every member's
    constructor before waiting on any of them.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device, timeout_s: float = 600.0):
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        if host in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: gloo would pick the machine's interface
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, rank == 0, timeout=timeout)
        prefixed = dist.PrefixStore(_PREFIX, self.store)
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout  # a member that died mid-broadcast fails the others after this, not after NCCL's 10 min
            self.group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
        logger.info("weight broadcast group: rank %d of %d on %s", rank, world_size, self.device)

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def send(self, tensors, verify: Verify = "sample", seed: int = 0) -> int:
        """Rank 0: broadcast ``(name, tensor)`` pairs in sorted name order, one tensor at a time (a dict works
        too); returns the digest of what was sent (``seed``: the policy version). Nothing beyond the tensor
        in flight is held."""
        if self.rank != 0:
            raise RuntimeError("only rank 0 (the learner) sends weights")
        items = sorted(tensors.items()) if isinstance(tensors, dict) else tensors
        crc, last = 0, None
        for name, tensor in items:
            if last is not None and name <= last:
                raise RuntimeError(f"weights must be sent in sorted name order: {name!r} came after {last!r}")
            tensor = tensor.detach().to(self.device).contiguous()
            self._broadcast(_bytes(tensor))
            crc, last = digest_step(crc, name, tensor, verify, seed), name
        return crc

    @torch.no_grad()
    def receive_into(self, module: torch.nn.Module, names: list[str], verify: Verify = "sample", seed: int = 0) -> int:
        """Ranks > 0: receive the tensors ``names`` straight into ``module``'s state; returns the digest of what
        the module then holds (read back through a fresh ``state_dict()``), to compare with the sender's."""
        state = module.state_dict()
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"broadcast weights name tensors this rollout model lacks: {missing[:5]}")
        for name in sorted(names):
            target = state[name]
            if target.device == self.device and target.is_contiguous():
                self._broadcast(_bytes(target))  # in place: the parameter's own memory receives the bytes
            else:
                buffer = torch.empty_like(target, device=self.device).contiguous()
                self._broadcast(_bytes(buffer))
                target.copy_(buffer)
        held = module.state_dict()
        return digest({n: held[n] for n in names}, verify, seed)

    def close(self) -> None:
        """Leave the group; NCCL communicators are shut down (a rebuilt group must not meet a stale one)."""
        shutdown = getattr(self.group, "shutdown", None) if self.device.type == "cuda" else None
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError as exc:  # an aborted communicator (a member died) may refuse; it is dropped anyway
                logger.warning("weight broadcast group shutdown: %s", exc)
        self.group = None
        self.store = None


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(-1).view(torch.uint8) if tensor.numel() else tensor.view(torch.uint8)
