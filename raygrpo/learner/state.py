"""The learner's full training state, for a resume that continues bit-exactly.

Layout of ``<folder>/`` (every rank writes its part; the caller makes the folder atomic)::

    tensors/                 torch.distributed.checkpoint (DCP): the trainable parameters, the
                             AdamW state, every shadow of the algorithm (DGPO's fast/slow EMA
                             and frozen start) and its sharded state (Diff-Instruct*'s fake score
                             moments), sharded as the ranks hold them
    algorithm.pt             the algorithm's replicated state (RG-LCD's latent reward model and its
                             AdamW state), written by rank 0, read by every rank; only for an
                             algorithm with state hooks (algorithms/base.py: StatefulAlgorithm)
    rng-rank<r>.pt           rank r's generators: numpy ``rng`` bit-generator state, torch CPU
                             (and CUDA) RNG state
    learner_state.json       policy_version, the algorithm's counters (DGPO: optimizer_steps),
                             world size, what was trained

DCP stores raw tensors, so parameters and moments come back bit-identical; the generators restart
where they stopped, so the next update draws the same timesteps and noises as an uninterrupted run.
With LoRA only the adapter's parameters (and their optimizer state) are stored: the frozen base is
the pretrained model the config names.

A *rollback state* (``save_training_state(..., rollback=True)``, the reward-hacking guard's best round, raygrpo/guard/guard.py)
holds what a rollback restores to rewind training to that round, no more: the trainable parameters (the adapter
only with LoRA), their AdamW moments, the shadows that move with training (EMAs, DiffusionNFT's old policy), the
algorithm's own state and counters, and the policy version. Left out: the shadows that never change
(:data:`CONSTANT_SHADOWS`: the frozen starting weights, equal at every round, so the learner has them already) and the
generators (after a rollback the run goes on drawing fresh timesteps and noises; a resume still gets them from the
periodic checkpoint). AdamW is kept because a rollback without it goes wrong either way: the moments the learner
holds now were built on the hacked stretch (the first moment points along it, so the next steps head straight back),
and fresh moments restart Adam's bias correction, whose first steps are about ``lr`` in every coordinate whatever its
gradient scale (a jolt the run never took at that point). With the best round's moments training continues exactly
as it would have from that round. :func:`load_training_state` reads either kind (``learner_state.json`` says which).
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

from raygrpo.algorithms.base import AlgorithmState, StatefulAlgorithm
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
ALGORITHM_FILE = "algorithm.pt"
# strict=False: the state holds the trainable tensors only (with LoRA, not the frozen base), and a strict load into the
# network would call every frozen tensor missing; a trainable one missing from the files already fails in dcp.load.
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


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


CONSTANT_SHADOWS = ("frozen",)
"""Shadows that never change after setup: every algorithm names its frozen starting weights ``frozen``
(algorithms/forward_process.py: frozen_snapshot). A rollback state leaves them out."""


def _shadows(learner: Learner, rollback: bool = False) -> dict[str, ParameterShadow]:
    # Every ParameterShadow the algorithm holds is state (DGPO: fast_ema, slow_ema, frozen); DanceGRPO has none.
    shadows = {name: value for name, value in vars(learner.algorithm).items() if isinstance(value, ParameterShadow)}
    return {name: value for name, value in shadows.items() if not (rollback and name in CONSTANT_SHADOWS)}


def _counters(learner: Learner) -> dict[str, int]:
    # Integer attributes are the algorithm's step counters (DGPO.optimizer_steps drives the EMA schedules).
    return {name: value for name, value in vars(learner.algorithm).items() if isinstance(value, int) and not isinstance(value, bool)}


def _algorithm_state(learner: Learner) -> AlgorithmState | None:
    # The algorithm's own state beyond shadows and counters, when it has any (RG-LCD, Diff-Instruct*).
    return learner.algorithm.state_dict() if isinstance(learner.algorithm, StatefulAlgorithm) else None


def _tensor_state(learner: Learner, extra: AlgorithmState | None, rollback: bool = False) -> dict:
    """The DCP state tree, whose tensors are the live ones (loading fills them in place); ``rollback``: of a rollback state."""
    model_state, optim_state = get_state_dict(learner.model.transformer, learner.optimizer, options=_OPTIONS)
    shadows = {
        shadow_name: dict(zip(learner.parameter_names, shadow.values, strict=True)) for shadow_name, shadow in _shadows(learner, rollback).items()
    }
    tree = {"model": model_state, "optimizer": optim_state, "shadows": shadows}
    if extra is not None and extra.sharded:
        tree["algorithm"] = extra.sharded
    return tree


def _describe(learner: Learner) -> dict:
    config = learner.config
    return {
        "world_size": learner.world_size,
        "algorithm": config.algorithm.name,
        "pretrained": config.model.pretrained,
        "lora": config.model.lora is not None,
        "parameters": len(learner.parameters),
    }


def save_training_state(learner: Learner, folder: Path, rollback: bool = False) -> None:
    """The full training state into ``folder``; ``rollback``: only what a rollback restores (module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = _algorithm_state(learner)
    with _quiet_single_process():
        dcp.save(_tensor_state(learner, extra, rollback), checkpoint_id=str(folder / "tensors"), no_dist=not _distributed())
    if extra is not None and learner.rank == 0:
        # Replicated: every rank holds the same values (the LRM's gradients are averaged over the ranks), one copy.
        torch.save(extra.replicated, folder / ALGORITHM_FILE)
    if not rollback:
        rng = {"numpy": learner.rng.bit_generator.state, "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, folder / f"rng-rank{learner.rank}.pt")
    if learner.rank == 0:
        state = {"policy_version": learner.policy_version, "counters": _counters(learner), "rollback": rollback, **_describe(learner)}
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
    rollback = bool(saved.get("rollback", False))  # a rollback state has no generators
    rng_file = folder / f"rng-rank{learner.rank}.pt"
    if not rollback and not rng_file.is_file():
        raise TrainingStateError(f"{rng_file} is missing: the checkpoint is incomplete")
    extra = _algorithm_state(learner)
    algorithm_file = folder / ALGORITHM_FILE
    if extra is not None and not algorithm_file.is_file():
        raise TrainingStateError(
            f"{algorithm_file} is missing: the checkpoint is incomplete, or was written before {learner.config.algorithm.name} saved its own state"
        )
    tensors = _tensor_state(learner, extra, rollback)
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
    if extra is not None:
        try:
            learner.algorithm.load_state_dict(AlgorithmState(tensors.get("algorithm", {}), torch.load(algorithm_file, weights_only=True)))
        except (KeyError, ValueError, RuntimeError) as exc:  # a missing entry, other sizes (the LRM's), an unreadable file
            raise TrainingStateError(f"the algorithm state in {algorithm_file} does not load into this learner: {exc!r}") from None
    if not rollback:
        rng = torch.load(rng_file, weights_only=True)
        learner.rng.bit_generator.state = rng["numpy"]
        torch.set_rng_state(rng["torch_cpu"])
        if "torch_cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["torch_cuda"])
    for name, value in saved["counters"].items():
        setattr(learner.algorithm, name, int(value))
    learner.policy_version = int(saved["policy_version"])
    logger.info("rank %d restored the training state of policy version %d from %s", learner.rank, learner.policy_version, folder)
