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
