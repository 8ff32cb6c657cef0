"""Small per-process settings shared by every role."""

from __future__ import annotations

import math

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def set_torch_threads(num_cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs Ray reserved, so co-located actors don't oversubscribe."""
    torch.set_num_threads(max(1, math.floor(num_cpus)))


def role_device(num_gpus: float, device_override: str | None) -> torch.device:
    """The device a role's models run on: its GPU when it reserves one (Ray exposes it as ``cuda``), else the CPU.
    ``device_override`` (``run.device_override``, test-only) runs a GPU-reserving role on that device instead."""
    if device_override is not None:
        return torch.device(device_override)
    return torch.device("cuda" if num_gpus > 0 else "cpu")
