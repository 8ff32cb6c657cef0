"""The learner's full training state, for a resume that continues bit-exactly.

Layout of ``<folder>/`` (every rank writes its part; the caller makes the folder atomic)::

    tensors/                 torch.distributed.checkpoint (DCP): the trainable parameters, the
                             AdamW state, and every shadow of the algorithm (DGPO's fast/slow EMA
                             and frozen start), sharded as the ranks hold them
    rng-rank<r>.pt           rank r's generators: numpy ``rng`` bit-generator state, torch CPU
                             (and CUDA) RNG state
    learner_state.json       policy_version, the algorithm's counters (DGPO: optimizer_steps),
                             world size, what was trained

DCP stores raw tensors, so parameters and moments come back bit-identical; the generators restart
where they stopped, so the next update draws the same timesteps and noises as an uninterrupted run.
With LoRA only the adapter's parameters (and their optimizer state) are stored: the frozen base is
the pretrained model the config names.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from raygrpo.config import Config
from raygrpo.learner.ema import ParameterShadow


class Learner(Protocol):
    """What of a learner rank (raygrpo/learner/learner.py) its training state is made of."""

    config: Config
    rank: int
    world_size: int
    model: Any  # the family's adapter; ``model.transformer`` is the trained network
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]
    parameter_names: list[str]
    algorithm: Any  # its ParameterShadow and int attributes are state
    rng: np.random.Generator
    policy_version: int

logger = logging.getLogger(__name__)

STATE_FILE = "learner_state.json"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)


class TrainingStateError(RuntimeError):
    """A training state that cannot be restored into this learner; the message says what differs."""


def _distributed() -> bool:
    # One in-process learner has no process group: DCP then reads and writes as a single process.
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    # DCP warns that it "assumes" a single process even when told so (no_dist=True).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _shadows(learner: Learner) -> dict[str, ParameterShadow]:
    # Every ParameterShadow the algorithm holds is state (DGPO: fast_ema, slow_ema, frozen); DanceGRPO has none.
    return {name: value for name, value in vars(learner.algorithm).items() if isinstance(value, ParameterShadow)}


def _counters(learner: Learner) -> dict[str, int]:
    # Integer attributes are the algorithm's step counters (DGPO.optimizer_steps drives the EMA schedules).
    return {name: value for name, value in vars(learner.algorithm).items() if isinstance(value, int) and not isinstance(value, bool)}


def _tensor_state(learner: Learner) -> dict:
    """The DCP state tree, whose tensors are the live ones (loading fills them in place)."""
    model_state, optim_state = get_state_dict(learner.model.transformer, learner.optimizer, options=_OPTIONS)
    shadows = {
        shadow_name: dict(zip(learner.parameter_names, shadow.values, strict=True)) for shadow_name, shadow in _shadows(learner).items()
    }
    return {"model": model_state, "optimizer": optim_state, "shadows": shadows}


def _describe(learner: Learner) -> dict:
    config = learner.config
    return {
        "world_size": learner.world_size,
        "algorithm": config.algorithm.name,
        "pretrained": config.model.pretrained,
        "lora": config.model.lora is not None,
        "parameters": len(learner.parameters),
    }


def save_training_state(learner: Learner, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_single_process():
        dcp.save(_tensor_state(learner), checkpoint_id=str(folder / "tensors"), no_dist=not _distributed())
    rng = {"numpy": learner.rng.bit_generator.state, "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / f"rng-rank{learner.rank}.pt")
    if learner.rank == 0:
        state = {"policy_version": learner.policy_version, "counters": _counters(learner), **_describe(learner)}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
    logger.info("rank %d saved the training state of policy version %d to %s", learner.rank, learner.policy_version, folder)


def load_training_state(learner: Learner, folder: Path) -> None:
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise TrainingStateError(f"{folder} holds no learner training state ({STATE_FILE} is missing): not a complete checkpoint")
    saved = json.loads(state_file.read_text())
    here = _describe(learner)
    differs = {key: (saved.get(key), value) for key, value in here.items() if saved.get(key) != value}
    if differs:
        detail = ", ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in differs.items())
        raise TrainingStateError(
            f"the training state in {folder} does not fit this learner ({detail}); resume with the saved configuration"
        )
    rng_file = folder / f"rng-rank{learner.rank}.pt"
    if not rng_file.is_file():
        raise TrainingStateError(f"{rng_file} is missing: the checkpoint is incomplete")
    tensors = _tensor_state(learner)
    try:
        with _quiet_single_process():
            dcp.load(tensors, checkpoint_id=str(folder / "tensors"), no_dist=not _distributed())
    except CheckpointException as exc:
        # DCP wraps each rank's error with its traceback; the first one says what is wrong (shape, key, file).
        first = next(iter(exc.failures.values()), None)
        cause = first[0] if isinstance(first, tuple) else exc
        raise TrainingStateError(f"the tensors in {folder / 'tensors'} do not load into this learner: {cause}") from None
    set_state_dict(
        learner.model.transformer,
        learner.optimizer,
        model_state_dict=tensors["model"],
        optim_state_dict=tensors["optimizer"],
        options=_OPTIONS,
    )
    # Shadows were loaded in place: their DCP entries are the shadow tensors themselves.
    rng = torch.load(rng_file, weights_only=True)
    learner.rng.bit_generator.state = rng["numpy"]
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["torch_cuda"])
    for name, value in saved["counters"].items():
        setattr(learner.algorithm, name, int(value))
    learner.policy_version = int(saved["policy_version"])
    logger.info("rank %d restored the training state of policy version %d from %s", learner.rank, learner.policy_version, folder)
