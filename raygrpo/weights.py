"""Moving the trainable network's weights from the learner to the rollout side.

The learner exports a :class:`~raygrpo.contracts.WeightsMessage` once per update; every rollout worker
gets the same object, so it is not pickled per worker. Arrays are numpy so the object store serves
them zero-copy.

Every message carries a version and a CRC-32 of its tensors. A worker recomputes the checksum from
its own module *after* loading and reports it with its version, so the controller can tell that every
worker really holds the weights the learner sent (a partial or mismatched load fails loudly instead of
silently sampling with other weights).
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import torch

from raygrpo.contracts import WeightsMessage


class WeightsMismatchError(RuntimeError):
    """A rollout worker's weights do not match what the learner exported (version or checksum)."""


def _raw(tensor: torch.Tensor, copy: bool = True) -> np.ndarray:
    """The tensor's bytes as a numpy array (bfloat16, which numpy lacks, as uint16 bit patterns).

    ``copy=False`` (checksumming what a module holds): a CPU tensor's own memory, no copy."""
    tensor = tensor.detach()
    tensor = (tensor.to("cpu", copy=True) if copy or tensor.device.type != "cpu" else tensor).contiguous()
    return tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def checksum(arrays: dict[str, np.ndarray]) -> int:
    """CRC-32 over the arrays' bytes, in name order (so it does not depend on dict order)."""
    crc = 0
    for name in sorted(arrays):
        crc = zlib.crc32(name.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(arrays[name]).view(np.uint8).reshape(-1), crc)
    return crc


def export_weights(module: torch.nn.Module, policy_version: int, names: set[str] | None = None) -> WeightsMessage:
    """The module's state, or only the tensors in ``names`` (e.g. the trainable LoRA parameters)."""
    arrays, dtypes = {}, {}
    for name, tensor in module.state_dict().items():
        if names is not None and name not in names:
            continue
        # A copy, never a view: the caller may swap other values into the module right after (EMA weights).
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
        arrays[name] = _raw(tensor)
    return WeightsMessage(policy_version=policy_version, arrays=arrays, dtypes=dtypes, checksum=checksum(arrays), partial=names is not None)


def load_weights(module: torch.nn.Module, message: WeightsMessage) -> int:
    """Copy the message into ``module`` in place (names and shapes must match exactly); returns the
    checksum of what the module now holds for those names, to compare with ``message.checksum``."""
    state = {}
    with warnings.catch_warnings():
        # The arrays are the object store's read-only memory; load_state_dict only reads them (no copy here).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, array in message.arrays.items():
            tensor = torch.from_numpy(array)
            state[name] = tensor.view(torch.bfloat16) if message.dtypes[name] == "bfloat16" else tensor
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (missing and not message.partial):
        raise WeightsMismatchError(
            f"weights of version {message.policy_version} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    held = module.state_dict()
    return checksum({name: _raw(held[name], copy=False) for name in message.arrays})
