"""Run checkpoints: atomic folders that hold everything needed to continue a run exactly.

Layout inside a run folder::

    checkpoints/step-000010/
        learner/            the learner group's training state (model, optimizer, EMA, RNG; sharded per rank)
        controller.json     step, policy version, data position, group ids, round-robin cursors, RNG
        config.yaml         the configuration the checkpoint was made with
        MANIFEST.json       every file above with its size; written last

A checkpoint is written into a hidden ``.tmp-…`` sibling and renamed into place only after its
MANIFEST is on disk, so a crash while saving never leaves a folder that looks complete (the rename is
atomic on one filesystem). A folder without MANIFEST, or whose files do not match it, is refused with
a message that says how to go on. Retention keeps the newest ``train.keep_checkpoints``; a checkpoint
is removed only after a newer one is complete.

``python -m raygrpo.run CONFIG`` resumes by itself (``run.resume: auto``): it looks for the newest
unfinished run of the same ``run.name`` under ``run.output_root`` and continues from its newest
checkpoint — what a resubmitted Ray job needs, since Ray Jobs never retry on their own.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from raygrpo.config import Config

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
FINISHED = "checkpoint-final"  # a run with this folder is done and never resumed

# Fields that may change between a checkpoint and its resumption: how long to train, how often to
# checkpoint and log, and where and on how many workers things run. Everything else (model, algorithm,
# optimizer, rewards, data, seeds, learner ranks) must be identical or the continuation would not be
# the same run.
MAY_CHANGE = (
    "run.resume", "run.output_root", "ray.", "train.steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.sample_grid_groups", "logging.", "rollout.num_workers", "rollout.num_cpus", "rollout.num_gpus",
    "rollout.max_restarts", "learner.num_cpus", "learner.num_gpus",
)  # fmt: skip
MAY_CHANGE_PER_REWARD = ("replicas", "num_cpus", "num_gpus", "max_restarts", "params")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and what to do."""


@dataclass
class ControllerState:
    """The controller's part of a checkpoint (the learner writes its own)."""

    step: int  # the last finished training step
    policy_version: int
    next_group_id: int
    next_worker: int
    next_replica: dict[str, int]
    prompt_order: dict[str, Any]  # PromptOrder.state_dict()
    rng: dict[str, Any]  # the controller's numpy bit generator state (best-of-N picks)
    trained_group_ids: list[int]  # every group id trained so far (exactly-once bookkeeping)
    reissued: int = 0
    rescored: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def step_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(run_dir: Path, state: ControllerState, config: Config, write_learner: Callable[[Path], None], keep: int) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically, then apply the retention policy."""
    final = step_folder(run_dir, state.step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a saved checkpoint")
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_learner(tmp / "learner")
    (tmp / "controller.json").write_text(json.dumps(asdict(state), indent=1))
    (tmp / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_synced(tmp / MANIFEST, json.dumps({"step": state.step, "files": files}, indent=1))
    os.rename(tmp, final)  # atomic: the folder appears complete or not at all
    _apply_retention(run_dir, keep)
    logger.info("checkpoint saved: %s", final)
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders with a MANIFEST, oldest first (not verified; see :func:`verify_checkpoint`)."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _apply_retention(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in (run_dir / CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash while saving


def verify_checkpoint(folder: Path) -> dict:
    """The checkpoint's MANIFEST after checking every listed file exists with its size; else CheckpointError."""
    folder = Path(folder)
    how = f"delete {folder} to resume from the checkpoint before it, or start afresh with run.resume=never (or another run.name)"
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {MANIFEST}: it was being written when the run stopped); {how}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder} has an unreadable {MANIFEST} ({exc}); {how}") from None
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}; {how}")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, {size} were written; {how}")
    return manifest


def load_controller_state(folder: Path) -> ControllerState:
    return ControllerState(**json.loads((Path(folder) / "controller.json").read_text()))


def check_compatible(folder: Path, config: Config) -> None:
    """Refuse to resume a checkpoint made with a configuration that differs where it matters."""
    saved = _flatten(yaml.safe_load((Path(folder) / "config.yaml").read_text()))
    now = _flatten(config.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and not _may_change(k))
    if changed:
        lines = [f"  {k}: {saved.get(k, '(absent)')!r} in the checkpoint, {now.get(k, '(absent)')!r} now" for k in changed[:20]]
        raise CheckpointError(
            f"the configuration changed since checkpoint {folder} in ways a resumed run cannot follow:\n"
            + "\n".join(lines)
            + "\nUndo those changes to continue that run, or start a new one with run.resume=never or another run.name."
        )


def _may_change(key: str) -> bool:
    if key.startswith("rewards."):
        parts = key.split(".")
        return len(parts) >= 3 and parts[2] in MAY_CHANGE_PER_REWARD
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in MAY_CHANGE)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): tree}


@dataclass(frozen=True)
class ResumePoint:
    run_dir: Path
    checkpoint: Path
    step: int


def find_resume_point(config: Config) -> ResumePoint | None:
    """Where ``run.resume`` says to continue from, verified and compatible; None to start a new run.

    ``auto``: the newest unfinished run folder ``<output_root>/<name>-*`` that has a checkpoint (its
    newest one). ``never``: None. Anything else: a checkpoint folder, or a run folder (its newest).
    """
    resume = config.run.resume
    if resume == "never":
        return None
    if resume == "auto":
        root = Path(config.run.output_root).resolve()
        runs = (
            sorted((p for p in root.glob(f"{config.run.name}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
        )
        candidates = [p for p in runs if not (p / FINISHED).exists() and (p / CHECKPOINTS).is_dir()]
        if not candidates:
            return None
        run_dir = candidates[-1]
        checkpoints = complete_checkpoints(run_dir)
        if not checkpoints:
            leftovers = sorted((run_dir / CHECKPOINTS).glob(".tmp-*"))
            if leftovers:
                logger.warning("%s has only a checkpoint that was never completed; starting a new run", run_dir)
            return None
        checkpoint = checkpoints[-1]
    else:
        path = Path(resume).resolve()
        if (path / MANIFEST).exists() or path.parent.name == CHECKPOINTS:
            checkpoint, run_dir = path, path.parent.parent
        elif path.is_dir():
            checkpoints = complete_checkpoints(path)
            if not checkpoints:
                raise CheckpointError(f"run.resume={resume!r}: {path} holds no complete checkpoint under {CHECKPOINTS}/")
            checkpoint, run_dir = checkpoints[-1], path
        else:
            raise CheckpointError(f"run.resume={resume!r}: no such checkpoint or run folder (use auto, never, or a path)")
    manifest = verify_checkpoint(checkpoint)
    check_compatible(checkpoint, config)
    return ResumePoint(run_dir, checkpoint, int(manifest["step"]))
