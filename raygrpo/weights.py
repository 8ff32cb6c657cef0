"""Moving the trainable network's weights from the learner to the rollout side, and proving they arrived.

The learner exports one :class:`~raygrpo.contracts.WeightsMessage` per update: the whole network, or
with LoRA only the adapter's tensors (``partial``; the rollout side keeps its base weights). Arrays
are numpy, so the object store serves them zero-copy to every worker.

Cost. On Ray the learner builds the message from numpy *views* of its tensors (``copy=False``; a GPU
learner's tensors are copied to the CPU first) and ``ray.put``s it itself, inside its
``sampling_weights`` block (``Learner.publish_weights``). ``ray.put`` returns once the bytes are in
shared memory, so neither the block's exit (DGPO swaps its fast EMA into the live parameters with
``copy_`` and back) nor a later call (an update) can change what was sent. Every worker gets the
object zero-copy and ``copy_``s each array into its parameter in place. A sync is then one put, one
get and one copy per worker (the floor ``benchmarks/scale_out.py`` part (d) measures) plus the
digests below. In process there is no object store: the message is a snapshot copy (``copy=True``).

Verification: every message carries its version and a digest of what the learner sent. A worker
recomputes that digest from what its module holds *after* loading (read back through a fresh
``state_dict()``, so a module that hands out copies is caught); :func:`load_weights` raises
:class:`WeightsMismatchError` when they differ, and the controller requires every worker to report
the controller's version and the same digest (``raygrpo/weight_sync.py``: a stale version stops it).

* Always, before anything is copied: the names (a full message must name every tensor of the
  network, a partial one only tensors it has), each tensor's shape and its dtype (``copy_`` would
  broadcast or cast silently).
* ``rollout.weight_verify: sample`` (the default): the digest covers the version, each tensor's
  name, dtype and shape, and :data:`SAMPLES` of its elements evenly spaced from an offset that moves
  with the version, plus its last element: a few microseconds per tensor. It catches a tensor not
  loaded or loaded from another version (an update moves nearly every element, and a tensor whose
  values did not move is right without a load), a copy that stopped short (it misses the last
  element), a tensor loaded under another name, a dropped tensor, a load into copies. It can miss
  corruption confined to elements between sample points (a flipped bit, a bad write in the middle of
  a tensor); as the offset moves, a fault that recurs at the same place is met at a later version.
* ``rollout.weight_verify: full``: the digest covers the same and every byte of every tensor
  (CRC-32), one more pass over the weights on each side: 35-70 ms per 145 MB on one core of the
  2-core test machine; tensors on a GPU are read back to the CPU for it. It catches any changed
  byte. Turn it on in the run config (``rollout: {weight_verify: full}``) or on the command line
  (``rollout.weight_verify=full``).

The collective broadcast (``raygrpo/weight_broadcast.py``) computes the same digests.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from raygrpo.contracts import WeightsMessage

Verify = Literal["sample", "full"]
SAMPLES = 1024  # elements per tensor in the sampled digest (the last element is added to them)
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}  # an element's bytes as one numpy value, by width


class WeightsMismatchError(RuntimeError):
    """A rollout worker's weights do not match what the learner exported (names, shapes, version or digest)."""


def _cpu_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes as a flat uint8 array (no copy for a contiguous CPU tensor)."""
    return tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


@torch.no_grad()
def digest_step(crc: int, name: str, tensor: torch.Tensor, verify: Verify, seed: int) -> int:
    """:func:`digest` extended by one tensor; callers go in sorted name order (the broadcast streams tensors).

    ``sample``: :data:`SAMPLES` elements every ``n // SAMPLES``-th from an offset set by (seed, name), then the
    last; read where the tensor is (a strided view, so a GPU sends back only the samples)."""
    tensor = tensor.detach()
    crc = zlib.crc32(f"{seed}|{name}|{str(tensor.dtype).removeprefix('torch.')}|{tuple(tensor.shape)}".encode(), crc)
    n = tensor.numel()
    if verify == "full" or n <= SAMPLES + 1:
        return zlib.crc32(_cpu_bytes(tensor), crc)
    stride = n // SAMPLES
    offset = zlib.crc32(f"{seed}:{name}".encode()) % stride  # the last sample, offset + (SAMPLES - 1) * stride, is < n
    if tensor.device.type == "cpu" and tensor.is_contiguous():
        # The same bytes through numpy views (elements as unsigned integers of their width), so the same digest: at
        # 145 MB (140 tensors) 1.4 ms per side instead of the tensor operations' 2.3 ms below.
        flat = tensor.reshape(-1).view(torch.uint8).numpy().view(_UNSIGNED[tensor.element_size()])
        crc = zlib.crc32(np.ascontiguousarray(flat[offset : offset + SAMPLES * stride : stride]), crc)
        return zlib.crc32(flat[n - 1 :], crc)
    flat = tensor.reshape(-1)
    crc = zlib.crc32(_cpu_bytes(flat[offset : offset + SAMPLES * stride : stride]), crc)
    return zlib.crc32(_cpu_bytes(flat[n - 1 :]), crc)


def digest(tensors: Mapping[str, torch.Tensor], verify: Verify, seed: int) -> int:
    """CRC-32 of ``seed`` (the policy version: a digest binds the bytes to their version) and the tensors in
    name order: every byte (``full``) or each tensor's sample (``sample``, its positions set by ``seed``).
    Computed where the tensors are; the module docstring says what each mode proves."""
    crc = 0
    for name in sorted(tensors):
        crc = digest_step(crc, name, tensors[name], verify, seed)
    return crc


def export_weights(
    module: torch.nn.Module, policy_version: int, names: set[str] | None = None, verify: Verify = "sample", copy: bool = True
) -> WeightsMessage:
    """The module's state, or only the tensors in ``names`` (the trainable LoRA parameters), with its digest.

    ``copy=False``: the arrays are views of CPU tensors (others are copied to the CPU anyway). Only for a
    message that is put into the object store before anything can change those tensors (the module
    docstring); otherwise a later change (an update, an EMA swapped out) would rewrite a sent version.
    """
    arrays, dtypes, crc = {}, {}, 0
    state = module.state_dict()
    for name in sorted(state):
        if names is not None and name not in names:
            continue
        tensor = state[name].detach()
        tensor = (tensor.to("cpu", copy=True) if copy or tensor.device.type != "cpu" else tensor).contiguous()
        crc = digest_step(crc, name, tensor, verify, policy_version)
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
        # bfloat16, which numpy lacks, as its 16-bit patterns (a view)
        arrays[name] = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    return WeightsMessage(policy_version, arrays, dtypes, crc, verify=verify, partial=names is not None)


def _check_fits(state: dict[str, torch.Tensor], message: WeightsMessage) -> None:
    """Names, shapes and dtypes, before anything is copied (``copy_`` would broadcast or cast silently)."""
    version = message.policy_version
    unexpected = sorted(set(message.arrays) - set(state))
    missing = [] if message.partial else sorted(set(state) - set(message.arrays))
    if unexpected or missing:
        raise WeightsMismatchError(
            f"weights of version {version} do not fit this rollout model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(learner and rollout must load the same model.pretrained and model.lora)"
        )
    for name, array in message.arrays.items():
        held = state[name]
        sent_dtype = message.dtypes[name]
        if tuple(array.shape) != tuple(held.shape) or str(held.dtype).removeprefix("torch.") != sent_dtype:
            raise WeightsMismatchError(
                f"weights of version {version}: size mismatch for {name}: the learner sent {tuple(array.shape)} {sent_dtype}, "
                f"this rollout model holds {tuple(held.shape)} {held.dtype} (both sides must load the same model in model.dtype)"
            )


def load_weights(module: torch.nn.Module, message: WeightsMessage) -> int:
    """Copy the message into ``module``'s tensors in place and verify what the module now holds.

    Returns the digest of the loaded tensors (equal to ``message.checksum``); raises
    :class:`WeightsMismatchError` if the message does not fit the module or the digests differ.
    """
    state = module.state_dict()  # detached views of the parameters and buffers: copy_ into them writes the module
    _check_fits(state, message)
    with torch.no_grad(), warnings.catch_warnings():
        # The arrays are the object store's read-only memory; copy_ only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, array in message.arrays.items():
            source = torch.from_numpy(array)
            state[name].copy_(source.view(torch.bfloat16) if message.dtypes[name] == "bfloat16" else source)
    held = module.state_dict()  # afresh: what the module holds, not the tensors just written
    crc = digest({name: held[name] for name in message.arrays}, message.verify, message.policy_version)
    if crc != message.checksum:
        raise WeightsMismatchError(
            f"rollout worker loaded version {message.policy_version} and holds digest {crc:#010x} ({message.verify}), "
            f"the learner sent {message.checksum:#010x}: a tensor was not (fully) loaded, or the message was changed after export"
        )
    return crc
