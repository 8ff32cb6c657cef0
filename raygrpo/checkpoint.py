"""Run checkpoints: atomic folders that hold everything needed to continue a run exactly.

Layout inside a run folder::

    checkpoints/step-000010/
        learner/            the learner group's training state (model, optimizer, EMA, RNG; sharded per rank)
        controller.json     step, policy version, data position, group ids, round-robin cursors, RNG
        config.yaml         the configuration the checkpoint was made with
        MANIFEST.json       every file above with its size and sha256; written last
    checkpoint-final/       the trained weights (diffusers layout), written when the run ends
    checkpoint-aborted[-N]/ the weights of a run stopped on purpose, one folder per abort
    run_state.json          running | aborted | finishing (trained, writing report and export) | finished;
                            "finished" is written last of all

A checkpoint is written into a hidden ``.tmp-…`` sibling, every file and folder in it is fsynced,
and it is renamed into place only after its MANIFEST is on disk; the rename is then fsynced too. So
neither a crash nor a power loss leaves a folder that looks complete (the rename is atomic on one
filesystem). A folder without MANIFEST, or whose files do not match it (size, then sha256), is
refused with a message that says how to go on. The hashes are computed while the files are synced
at save and checked only on resume: both read every byte once (sha256 runs at ~1.7 GB/s per core,
on one thread per file), so on a FLUX-size state (~100 GB) each costs about as long as reading it
from the checkpoint filesystem. Retention keeps the newest ``train.keep_checkpoints``; a checkpoint
is removed only after a newer one is complete.

``python -m raygrpo.run CONFIG`` resumes by itself (``run.resume: auto``): it looks for the newest
unfinished run folder of exactly this ``run.name`` (``<name>-YYYYmmdd-HHMMSS[-pid]``, what
:func:`run_folder_name` makes) under ``run.output_root`` and continues from its newest checkpoint —
what a resubmitted Ray job needs, since Ray Jobs never retry on their own. A run is finished when its
``run_state.json`` says so; runs from before that file existed count as finished once they have
``checkpoint-final``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from raygrpo.config import Config

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "MANIFEST.json"
FINAL = "checkpoint-final"
ABORTED = "checkpoint-aborted"
RUN_STATE = "run_state.json"
RUN_STAMP = "%Y%m%d-%H%M%S"  # the time in a run folder's name
_HASH_CHUNK = 8 << 20

# Fields that may change between a checkpoint and its resumption: how long to train, how often to
# checkpoint and log, and where and on how many workers things run. Everything else (model, algorithm,
# optimizer, rewards, data, seeds, learner ranks) must be identical or the continuation would not be
# the same run.
MAY_CHANGE = (
    "run.resume", "run.output_root", "run.in_process", "run.device_override", "ray.", "train.steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.sample_grid_groups", "logging.", "rollout.num_workers", "rollout.num_cpus", "rollout.num_gpus",
    "rollout.max_restarts", "rollout.autoscale", "rollout.autoscale.", "rollout.weight_sync", "rollout.weight_sync_timeout_s",
    "rollout.weight_verify", "learner.num_cpus",
    "learner.num_gpus", "learner.reduce_every_backward", "learner.gradient_checkpointing",
    "guard",  # the reward-hacking guard (on, off, its rules) may change, e.g. after it stopped a run
    "guard.",
)  # fmt: skip
MAY_CHANGE_PER_REWARD = ("replicas", "num_cpus", "num_gpus", "max_restarts")
# Of a reward's params only those that say where and how the reward is reached (raygrpo/reward/http.py,
# vlm_judge.py), never what it computes; frame_average's inner reward follows the same rule.
MAY_CHANGE_REWARD_PARAMS = (
    "url", "token_env", "timeout_s", "max_attempts", "backoff_s", "max_concurrency", "concurrency", "batch_size",
    "check_health", "serve.python", "serve.port", "serve.startup_timeout_s",
)  # fmt: skip


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
    learned: bool = True  # some trained group had unequal rewards (a non-zero advantage) so far
    extra: dict[str, Any] = field(default_factory=dict)


def step_folder(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(run_dir: Path, state: ControllerState, config: Config, write_learner: Callable[[Path], None], keep: int) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically and durably, then apply the retention policy."""
    final = step_folder(run_dir, state.step)
    if final.exists():
        raise CheckpointError(f"{final} already exists; refusing to overwrite a saved checkpoint")
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_learner(tmp / "learner")
    (tmp / "controller.json").write_text(json.dumps(asdict(state), indent=1))
    (tmp / "config.yaml").write_text(config.to_yaml())
    sizes, hashes = _sync_tree(tmp, hash_files=True)
    _write_synced(tmp / MANIFEST, json.dumps({"step": state.step, "files": sizes, "sha256": hashes}, indent=1))
    _fsync_path(tmp)
    os.rename(tmp, final)  # atomic: the folder appears complete or not at all
    _fsync_path(final.parent)  # the rename itself survives a power loss before retention deletes older ones
    _apply_retention(run_dir, keep)
    logger.info("checkpoint saved: %s", final)
    return final


def save_weights(run_dir: Path, name: str, write: Callable[[Path], object], replace: bool) -> Path:
    """``<run_dir>/<name>`` written by ``write(folder)`` into a hidden sibling, synced, then renamed into place.

    ``replace``: an existing folder of that name is swapped out (a resumed run that redid its last
    steps writes checkpoint-final again); otherwise ``name`` gets the first free ``-2``, ``-3``… suffix,
    so nothing saved before is overwritten. Returns the folder.
    """
    run_dir = Path(run_dir)
    final = run_dir / name
    if not replace:
        n = 1
        while final.exists():
            n += 1
            final = run_dir / f"{name}-{n}"
    for stale in [*run_dir.glob(f".tmp-{final.name}-*"), *run_dir.glob(f".old-{final.name}-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # a crash while writing or swapping it before
    tmp = run_dir / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True)
    write(tmp)
    _sync_tree(tmp, hash_files=False)
    _fsync_path(tmp)
    if final.exists():
        # rename(2) cannot replace a non-empty folder: the old one steps aside, then goes.
        old = run_dir / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(run_dir)
    return final


def write_run_state(run_dir: Path, status: str, **details: Any) -> None:
    """Replace ``<run_dir>/run_state.json`` atomically: ``{"status": running|aborted|finished, "updated_at": …, **details}``."""
    path = Path(run_dir) / RUN_STATE
    tmp = path.with_name(f".{RUN_STATE}.tmp-{os.getpid()}")
    _write_synced(tmp, json.dumps({"status": status, "updated_at": time.time(), **details}, indent=1))
    os.replace(tmp, path)
    _fsync_path(path.parent)


def read_run_state(run_dir: Path) -> dict | None:
    """The run's ``run_state.json``, or None when it has none (or it cannot be read)."""
    try:
        state = json.loads((Path(run_dir) / RUN_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def run_finished(run_dir: Path) -> bool:
    """Whether a run ended and must not be resumed: its run_state says so. Folders from before
    run_state.json was written finished by writing checkpoint-final, so for them that folder decides."""
    state = read_run_state(run_dir)
    if state is not None:
        return state.get("status") == "finished"
    return (Path(run_dir) / FINAL).is_dir()


def _finishing(run_dir: Path) -> bool:
    """Stopped after every step was trained and ``checkpoint-final`` saved (while writing the report or the export)."""
    state = read_run_state(run_dir)
    return state is not None and state.get("status") == "finishing" and (Path(run_dir) / FINAL).is_dir()


def run_folder_name(name: str) -> str:
    """``<name>-YYYYmmdd-HHMMSS`` for a run starting now (raygrpo/run.py adds ``-<pid>`` if that exists)."""
    return f"{name}-{time.strftime(RUN_STAMP)}"


def is_run_folder_of(name: str, folder_name: str) -> bool:
    """Whether ``folder_name`` is one :func:`run_folder_name` makes for ``name`` (``tiny`` never matches ``tiny-dgpo-…``)."""
    return re.fullmatch(rf"{re.escape(name)}-\d{{8}}-\d{{6}}(-\d+)?", folder_name) is not None


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the entries in it, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(folder: Path, hash_files: bool) -> tuple[dict[str, int], dict[str, str]]:
    """fsync every file and subfolder under ``folder``; return their sizes and (``hash_files``) sha256s."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    # hashlib releases the GIL on large updates: a thread per file reads several shards at once.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda p: _sync_file(p, hash_files), files))
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_path(sub)
    names = [str(p.relative_to(folder)) for p in files]
    sizes = {name: p.stat().st_size for name, p in zip(names, files)}
    return sizes, ({name: d for name, d in zip(names, digests)} if hash_files else {})


def _sync_file(path: Path, hash_file: bool) -> str | None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        return _digest(f) if hash_file else None


def _digest(f) -> str:
    h = hashlib.sha256()
    buffer = memoryview(bytearray(_HASH_CHUNK))
    while n := f.readinto(buffer):
        h.update(buffer[:n])
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _digest(f)


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
    """The checkpoint's MANIFEST after checking every listed file exists with its size and (when the
    MANIFEST has them) its sha256; else CheckpointError. Hashing reads the whole checkpoint once."""
    folder = Path(folder)
    how = f"delete {folder} to resume from the checkpoint before it, or start afresh with run.resume=never (or another run.name)"
    if not (folder / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {MANIFEST}: it was being written when the run stopped); {how}")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, hashes = manifest["files"], manifest.get("sha256", {})  # checkpoints from before hashing have sizes only
        int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder} has an unreadable {MANIFEST} ({exc}); {how}") from None
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}; {how}")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, {size} were written; {how}")
    start = time.perf_counter()
    names = sorted(set(hashes) & set(files))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = list(pool.map(lambda name: _file_sha256(folder / name), names))
    for name, digest in zip(names, found):
        if digest != hashes[name]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match the sha256 it was written with; {how}")
    if names:
        logger.info("checked the sha256 of %d files of %s in %.1f s", len(names), folder, time.perf_counter() - start)
    return manifest


def load_controller_state(folder: Path) -> ControllerState:
    return ControllerState(**json.loads((Path(folder) / "controller.json").read_text()))


def check_compatible(folder: Path, config: Config) -> None:
    """Refuse to resume a checkpoint made with a configuration that differs where it matters."""
    try:
        saved = _flatten(yaml.safe_load((Path(folder) / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError) as exc:
        how = "delete it to resume from the checkpoint before it"
        raise CheckpointError(f"checkpoint {folder}: cannot read its config.yaml ({exc}); {how}") from None
    now = _flatten(config.model_dump(mode="json"))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k) and not _may_change(k))
    if changed:
        lines = [f"  {k}: {saved.get(k, '(absent)')!r} in the checkpoint, {now.get(k, '(absent)')!r} now" for k in changed[:20]]
        if any(".params." in k for k in changed if k.startswith("rewards.")):
            lines.append(f"  (of a reward's params only these may change: {', '.join(MAY_CHANGE_REWARD_PARAMS)})")
        raise CheckpointError(
            f"the configuration changed since checkpoint {folder} in ways a resumed run cannot follow:\n"
            + "\n".join(lines)
            + "\nUndo those changes to continue that run, or start a new one with run.resume=never or another run.name."
        )


def _may_change(key: str) -> bool:
    if key.startswith("rewards."):
        parts = key.split(".", 3)  # rewards, index, field[, path inside the field]
        if len(parts) == 3:
            return parts[2] in MAY_CHANGE_PER_REWARD
        if len(parts) == 4 and parts[2] == "params":
            inner = parts[3]
            while inner.startswith("reward.params."):  # frame_average: {reward: {kind, params}}
                inner = inner.removeprefix("reward.params.")
            return inner in MAY_CHANGE_REWARD_PARAMS
        return False
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
    finishing: bool = False  # every step was trained and checkpoint-final saved: only the report and export are left


def find_resume_point(config: Config) -> ResumePoint | None:
    """Where ``run.resume`` says to continue from, verified and compatible; None to start a new run.

    ``auto``: the newest (by folder mtime) unfinished run folder of exactly this name
    (:func:`is_run_folder_of`) under ``output_root`` that has a checkpoint (its newest one). ``never``:
    None. Anything else: a checkpoint folder, or a run folder (its newest).
    """
    resume = config.run.resume
    if resume == "never":
        return None
    if resume == "auto":
        root = Path(config.run.output_root).resolve()
        runs = [p for p in root.iterdir() if p.is_dir() and is_run_folder_of(config.run.name, p.name)] if root.is_dir() else []
        candidates = sorted((p for p in runs if not run_finished(p) and ((p / CHECKPOINTS).is_dir() or _finishing(p))), key=lambda p: p.stat().st_mtime)
        if not candidates:
            return None
        run_dir = candidates[-1]
        if _finishing(run_dir):
            return ResumePoint(run_dir, run_dir / FINAL, int(read_run_state(run_dir)["step"]), finishing=True)
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
