"""Moving the trainable network's weights from the learner to the rollout side.

The learner exports a :class:`WeightsMessage` once per update (``ray.put`` once; every rollout worker
``ray.get``s the same object, so it is not pickled per worker). Arrays are numpy so the object store
serves them zero-copy; bfloat16, which numpy lacks, travels as its raw 16-bit pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class WeightsMessage:
    policy_version: int
    arrays: dict[str, np.ndarray]  # parameter name -> array (bf16 as uint16 bit patterns)
    dtypes: dict[str, str]  # parameter name -> torch dtype name

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def export_weights(module: torch.nn.Module, policy_version: int) -> WeightsMessage:
    arrays, dtypes = {}, {}
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu()
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
        arrays[name] = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    return WeightsMessage(policy_version=policy_version, arrays=arrays, dtypes=dtypes)


def load_weights(module: torch.nn.Module, message: WeightsMessage) -> None:
    """Copy the message into ``module`` in place; names and shapes must match exactly."""
    state = {}
    for name, array in message.arrays.items():
        tensor = torch.from_numpy(np.array(array, copy=True))
        state[name] = tensor.view(torch.bfloat16) if message.dtypes[name] == "bfloat16" else tensor
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights of version {message.policy_version} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
