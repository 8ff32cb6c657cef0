"""Moving the trainable network's weights from the learner to the rollout side.

The learner exports a :class:`~raygrpo.contracts.WeightsMessage` once per update; every rollout worker
gets the same object, so it is not pickled per worker. Arrays are numpy so the object store serves
them zero-copy.
"""

from __future__ import annotations

import numpy as np
import torch

from raygrpo.contracts import WeightsMessage


def export_weights(module: torch.nn.Module, policy_version: int, names: set[str] | None = None) -> WeightsMessage:
    """The module's state, or only the tensors in ``names`` (e.g. the trainable LoRA parameters)."""
    arrays, dtypes = {}, {}
    for name, tensor in module.state_dict().items():
        if names is not None and name not in names:
            continue
        # A copy, never a view: the caller may swap other values into the module right after (EMA weights).
        tensor = tensor.detach().to("cpu", copy=True)
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
        arrays[name] = tensor.view(torch.uint16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    return WeightsMessage(policy_version=policy_version, arrays=arrays, dtypes=dtypes, partial=names is not None)


def load_weights(module: torch.nn.Module, message: WeightsMessage) -> None:
    """Copy the message into ``module`` in place; names and shapes must match exactly."""
    state = {}
    for name, array in message.arrays.items():
        tensor = torch.from_numpy(np.array(array, copy=True))
        state[name] = tensor.view(torch.bfloat16) if message.dtypes[name] == "bfloat16" else tensor
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or (missing and not message.partial):
        raise RuntimeError(f"weights of version {message.policy_version} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
