"""Reading run folders under an output root, safely while runs are still writing them.

A run folder is a direct child of the root holding ``config.yaml`` or ``metrics.jsonl`` (what
``python -m raygrpo.run`` writes: ``<output_root>/<name>-<YYYYmmdd-HHMMSS>``). Its status comes from
its ``run_state.json`` (raygrpo/checkpoint.py), which the controller replaces atomically:

* ``finished``: run_state says so (written after the final weights, report and export);
* ``aborted``: run_state says so (the run stopped on purpose and saved ``checkpoint-aborted[-N]``),
  or nothing was written for ``stale_after_s`` seconds (the driver died without saving: a killed
  job, a lost node; resubmitting the same command resumes it);
* ``running``: otherwise.

Folders from before run_state.json: ``checkpoint-final`` means finished, ``checkpoint-aborted`` aborted.

``metrics.jsonl`` is appended one line per step; the last line may be half-written while we read it,
and such a line (or any line that is not a JSON object with a ``step``) is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from raygrpo.checkpoint import ABORTED, FINAL, RUN_STATE, read_run_state
from raygrpo.guard.layout import EVENTS as GUARD_EVENTS
from raygrpo.guard.layout import GUARD_DIR

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
TOTAL_REWARD = "reward/total/mean"


class RunNotFound(LookupError):
    """The name is not a run folder directly under the root."""


@dataclass(frozen=True)
class RunInfo:
    name: str
    started_at: float  # unix seconds (when config.yaml was written)
    updated_at: float  # unix seconds of the newest metrics line (or of the folder)
    steps: int  # steps with a metrics line
    last_reward: float | None  # the last step's weighted total reward mean
    status: str  # running | finished | aborted
    status_reason: str


@dataclass(frozen=True)
class Metrics:
    steps: list[int]
    series: dict[str, list[float | None]]  # key -> one value per step (None where absent or not finite)


def run_dir(root: Path, name: str) -> Path:
    """The folder of run ``name``; RunNotFound for anything that is not a run directly under ``root``."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise RunNotFound(name)
    folder = root / name
    if not folder.is_dir() or folder.resolve().parent != root.resolve() or not _is_run(folder):
        raise RunNotFound(name)
    return folder


def _is_run(folder: Path) -> bool:
    return (folder / CONFIG).is_file() or (folder / METRICS).is_file()


def list_runs(root: Path, stale_after_s: float, now: float | None = None) -> list[RunInfo]:
    """Every run under ``root``, newest first."""
    now = time.time() if now is None else now
    runs = []
    try:
        children = list(root.iterdir())
    except OSError as exc:
        logger.warning("cannot list %s: %s", root, exc)
        return []
    for folder in children:
        if folder.name.startswith(".") or not folder.is_dir() or not _is_run(folder):
            continue
        try:
            runs.append(run_info(folder, stale_after_s, now))
        except OSError as exc:  # the folder vanished or became unreadable between listing and reading
            logger.warning("skipping run %s: %s", folder, exc)
    return sorted(runs, key=lambda r: (r.started_at, r.name), reverse=True)


def run_info(folder: Path, stale_after_s: float, now: float | None = None) -> RunInfo:
    now = time.time() if now is None else now
    records = read_records(folder / METRICS)
    started = _mtime(folder / CONFIG) or _mtime(folder) or 0.0
    updated = max(_mtime(folder / METRICS) or 0.0, _mtime(folder / RUN_STATE) or 0.0, started)
    last = _finite(records[-1].get(TOTAL_REWARD)) if records else None
    status, reason = _status(folder, updated, now, stale_after_s)
    return RunInfo(folder.name, started, updated, len(records), last, status, reason)


def _status(folder: Path, updated: float, now: float, stale_after_s: float) -> tuple[str, str]:
    state = read_run_state(folder)
    if state is None:  # a run from before run_state.json
        if (folder / FINAL).exists():
            return "finished", f"{FINAL} saved"
        if (folder / ABORTED).exists():
            return "aborted", f"{ABORTED} saved"
    elif state.get("status") == "finished":
        return "finished", f"finished after step {state.get('step')}"
    elif state.get("status") == "aborted":
        return "aborted", f"stopped after step {state.get('step')}: {state.get('reason', '')}; weights in {state.get('checkpoint')}"
    idle = now - updated
    if idle > stale_after_s:
        return "aborted", f"not finished and nothing written for {idle / 60:.0f} min"
    return "running", f"last written {idle:.0f} s ago"


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# Parsed metrics per file, keyed by (size, mtime): a dashboard polling every few seconds re-reads only changed files.
_CACHE: dict[Path, tuple[tuple[int, int], list[dict]]] = {}


def read_records(path: Path) -> list[dict]:
    """The complete JSON lines of a metrics file that carry a ``step``, in file order; [] when missing."""
    try:
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        cached = _CACHE.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        data = path.read_bytes()
    except OSError:
        return []
    records = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number < len(lines):  # the last piece without "\n" is a line still being written: expected, stay quiet
                logger.warning("%s:%d is not JSON; skipped", path, number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    _CACHE[path] = (key, records)
    return records


def read_metrics(path: Path) -> Metrics:
    """Column form of a metrics file: one list per numeric key, aligned with ``steps``."""
    records = read_records(path)
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and (value is None or isinstance(value, (int, float))) and not isinstance(value, bool):
                keys.setdefault(key)
    series = {key: [_finite(r.get(key)) for r in records] for key in keys}
    return Metrics(steps=[r["step"] for r in records], series=series)


def read_guard_events(folder: Path) -> list[dict]:
    """The reward-hacking guard's rounds that acted (warn, rollback, stop) with their evidence, from
    ``<run>/guard/events.jsonl`` (raygrpo/guard/guard.py); a half-written last line is skipped."""
    path = folder / GUARD_DIR / GUARD_EVENTS
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("action") not in (None, "none"):
            events.append(record)
    return events
