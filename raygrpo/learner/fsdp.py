"""torch.distributed for the learner ranks: the process group, FSDP2 sharding with mixed precision, full tensors.

Mixed precision follows the reference (DanceGRPO FLUX: fp32 master weights + bf16 compute, doc
§6.4): the parameters, gradients and AdamW moments stay float32; FSDP2's ``MixedPrecisionPolicy``
all-gathers the parameters as ``param_dtype`` (bf16) for the forward and backward and
reduce-scatters the gradients in float32.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from datetime import timedelta

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)


def init_process_group(rank: int, world_size: int, host: str, port: int, use_cuda: bool, timeout_s: float = 600) -> None:
    """Join the learner's process group: NCCL on GPU, gloo on CPU."""
    if ipaddress.ip_address(host).is_loopback:
        # gloo picks an interface by the host name otherwise, which may not be loopback (only loopback works here).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if use_cuda:
        torch.cuda.set_device(0)  # Ray exposes the rank's own GPU as device 0
    torch.distributed.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"tcp://{host}:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    logger.info("learner rank %d/%d joined %s:%d (%s)", rank, world_size, host, port, torch.distributed.get_backend())


def join_single_rank_group(use_cuda: bool) -> None:
    """A process group of this process alone (NCCL on GPU, gloo on CPU), once per process: a learner that is the
    only rank (``run.in_process``, tests) then shards its network with FSDP2's mixed-precision policy exactly
    as a LearnerGroup rank does. Nothing crosses the process: the store is in memory."""
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise RuntimeError("a one-rank learner was built in a process already in a larger process group: pass its rank and world size")
        return
    if use_cuda:
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)


def transformer_blocks(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a diffusers transformer (FLUX: double + single stream; SD3: joint blocks)."""
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks", "blocks"):
        child = getattr(network, name, None)
        if isinstance(child, torch.nn.ModuleList):
            blocks.extend(child)
    return blocks


def shard_network(network: torch.nn.Module, compute_dtype: torch.dtype, mesh=None) -> None:
    """``fully_shard`` every block, then the root (its embeddings and output layers), in place.

    Each block is one FSDP unit: its parameters are all-gathered just before its forward and freed
    after it, so peak memory holds one block's full weights, not the network's. ``compute_dtype``
    below float32 turns on mixed precision (parameters must be float32: they are the master copy).
    A network loaded on the CPU moves to the mesh's device unit by unit as it is sharded, so a GPU
    never holds more than one unit's whole weights besides its shards. ``mesh``: the device mesh
    (None: FSDP's default over the process group; the planner passes a CPU mesh for fake tensors).
    """
    blocks = transformer_blocks(network)
    if not blocks:
        logger.warning("%s has no transformer_blocks: sharding it as one unit", type(network).__name__)
    # Only the root casts its inputs to the compute dtype, as the rollout side's adapter does. A block
    # must not: FLUX's blocks take the rotary embedding in float32, and rounding it to bf16 would make
    # the learner's forward differ from the rollout model's (the first ratio would leave 1).
    for block in blocks:
        fully_shard(
            block, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        )
    fully_shard(network, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32))
    # FSDP2 reads each unit's trained parameters, and from them its gradients' dtypes (the policy's reduce_dtype, the
    # float32 of the shards), from requires_grad at its lazy init, the network's first forward. peft's disable_adapters
    # clears the adapter's requires_grad while a teacher / reference forward runs with the adapter off (RG-LCD,
    # Diff-Instruct*, DGPO, Diffusion-DPO, DiffusionNFT with LoRA); when that forward came first, FSDP saw nothing
    # trained and, below float32, reduce-scattered bf16 gradients and assigned them to the float32 shards uncast (2 gloo
    # ranks: "attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float"; one rank: the
    # terms' gradients summed in bf16). Initialised here, it reads requires_grad as the learner set it. (FSDP2 offers no
    # public call for it: unshard() initialises the root's own units only, and the first forward would redo them.)
    network._get_fsdp_state()._lazy_init()
    # FSDP2 keeps the root's gathered parameters after its forward (a backward usually follows). After a forward without
    # gradients none does, and the next forward would reuse them: after a reference or EMA swap (ParameterShadow.swapped
    # copies into the shards) the policy's forward would run its embeddings and output layers with the swapped-out
    # values. Measured on 2 ranks: Diffusion-DPO's second update diverged from one rank's by 1.7e-2; 4e-6 with this.
    network.register_forward_hook(lambda module, args, output: None if torch.is_grad_enabled() else module.reshard())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a DTensor shard (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gathered_tensors(network: torch.nn.Module, names: set[str] | None, dtype: torch.dtype | None):
    """``(name, whole tensor)`` of the network's state one at a time, in sorted name order.

    Gathering a DTensor is a collective: every rank must iterate the generator to its end, in step.
    One whole tensor exists at a time, so a rank never holds a second full copy of the network (an
    8-rank FLUX learner would otherwise hold 8 x 24 GB of gathered bf16 weights). ``names``: keep only
    these (the LoRA adapter); ``dtype``: cast floating tensors to it (what the rollout side holds).
    """
    state = network.state_dict()  # references to the local shards, no copies
    for name in sorted(state):
        if names is not None and name not in names:
            continue
        tensor = full_tensor(state[name].detach())
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor


def full_state_dict(network: torch.nn.Module, names: set[str] | None, dtype: torch.dtype | None, keep: bool = True) -> dict[str, torch.Tensor]:
    """The network's state as whole tensors, copied to the CPU; every rank gathers.

    ``keep=False``: this rank joins the gathers and keeps nothing (ranks other than the one writing or
    sending), so only one rank pays the memory of a full copy. See :func:`gathered_tensors`.
    """
    state = {}
    for name, tensor in gathered_tensors(network, names, dtype):
        if keep:
            # A copy, never a view: the caller may swap other values into the network right after (EMA weights).
            state[name] = tensor.to("cpu", copy=True)
    return state
