"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, a short log line, and optional mirrors.

The JSON-lines file is the record of a run (the dashboard and ``report.py`` read it, a resumed run
appends to it). Mirrors, each optional and each unable to stop a run:

* TensorBoard scalars (``torch.utils.tensorboard``), one tag per metric key, x axis = ``step``;
* Weights & Biases, only when a project is configured and ``wandb`` is importable; it follows its own
  environment (``WANDB_MODE=offline`` writes locally and syncs later with ``wandb sync``);
* ``metrics.parquet`` written by :meth:`MetricsLog.close`, a columnar copy of the whole JSON-lines
  file (one row per step; where a resumed run wrote a step twice, the later line wins).

The controller uses it as::

    metrics = MetricsLog.for_run(run_dir, config)   # or MetricsLog(path, tensorboard_dir=..., wandb=...)
    metrics.write(step_record(outcome, config))     # every step (what a step produced -> one flat record)
    metrics.close()                                 # at the end, also after a failure
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raygrpo.algorithms.advantages import StepBatch
from raygrpo.contracts import LearnerMetrics, ScoredGroup

if TYPE_CHECKING:
    from typing_extensions import Self

    from raygrpo.config import Config

logger = logging.getLogger(__name__)


class PhaseTimer:
    """Wall seconds of a step's phases: ``with timer("generate"): ...``; ``timer.total()`` since it was made."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - begin

    def total(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class StepOutcome:
    """What one training step produced, as the controller hands it to :func:`step_record`."""

    step: int
    policy_version: int  # after the step's update (the version rollout samples with next)
    groups: list[ScoredGroup]  # every group generated for the step, trained or not
    batch: StepBatch  # what was trained, and what became of the rewards
    staleness: np.ndarray  # [trained groups] policy versions between sampling and training
    learner: LearnerMetrics | None  # None when no group was trained
    sync_seconds: float  # the sync's own work (export + the slowest worker's load); 0 without an update
    queue_depth: int  # groups (parts) in flight when the step began waiting
    reissued: int  # groups generated again this step (a rollout worker died)
    rescored: int  # scorings sent again this step (a reward replica died)
    timer: PhaseTimer
    actors: dict[str, int]  # role -> actors ("rollout", "reward/<name>")


def step_record(outcome: StepOutcome, config: Any) -> dict[str, float]:
    """One flat record of metrics (the keys of metrics.jsonl, TensorBoard and the dashboard) for a step."""
    o, names = outcome, [r.name for r in config.rewards]
    weights = np.array([r.weight for r in config.rewards], np.float64)
    rewards = o.batch.rewards  # [N, K]
    samples = sum(g.evaluated for g in o.groups) * config.algorithm.group_size  # an offline pair may sample none
    record: dict[str, float] = {"step": o.step, "policy_version": o.policy_version, **o.batch.stats}
    record["groups/reissued"], record["groups/rescored"] = float(o.reissued), float(o.rescored)
    reward_seconds = {n: [g.seconds[n] for g in o.groups] for n in names}
    for name in names:
        # Every sample the reward scored, trained or not: a reward still shows its curve while another one fails.
        scored = np.concatenate([g.scores[name].values[g.scores[name].valid] for g in o.groups] or [np.zeros(0, np.float32)])
        record[f"reward/{name}/mean"] = float(np.mean(scored)) if len(scored) else float("nan")
        record[f"reward/{name}/std"] = float(np.std(scored)) if len(scored) else float("nan")
        record[f"time/reward/{name}"] = float(sum(reward_seconds[name]))
    record["reward/total/mean"] = float(np.mean(rewards @ weights)) if len(rewards) else float("nan")  # of the trained groups
    if o.learner is not None:
        fields = asdict(o.learner)
        extras = fields.pop("extras")
        record.update({f"learner/{k}": float(v) for k, v in {**fields, **extras}.items()})
    record["samples/generated"] = float(samples)
    record["rollout/bytes_per_sample"] = float(sum(i.rollout_bytes for g in o.groups for i in g.infos)) / max(samples, 1)
    record["staleness/mean"] = float(o.staleness.mean()) if len(o.staleness) else float("nan")
    record["staleness/max"] = float(o.staleness.max()) if len(o.staleness) else float("nan")
    record["queue/groups_in_flight"] = float(o.queue_depth)
    # Busy seconds, not latencies: a continuous-batching worker's groups overlap (contracts.RolloutInfo).
    record["time/rollout_worker_sum"] = float(sum(i.busy_seconds for g in o.groups for i in g.infos))
    latencies = [i.seconds for g in o.groups for i in g.infos]
    record["time/rollout_latency_mean"] = float(np.mean(latencies)) if latencies else float("nan")
    record["time/rollout_latency_max"] = float(np.max(latencies)) if latencies else float("nan")
    for phase in ("generate", "score_wait", "learner"):
        record[f"time/{phase}"] = o.timer.seconds.get(phase, 0.0)
    # The sync's own work (export + the slowest worker's load); its wall time also counts waiting for
    # workers to finish the groups queued before it (max_staleness >= 1), which is generation, not sync.
    record["time/sync"] = o.sync_seconds
    record["time/sync_wall"] = o.timer.seconds.get("sync", 0.0)
    record["time/step"] = o.timer.total()
    record.update(_idle_fractions(record, reward_seconds, o.learner, o.actors))
    return record


def _idle_fractions(record: dict[str, float], reward_seconds: dict[str, list[float]], learner: LearnerMetrics | None, actors: dict[str, int]):
    """Per role, 1 - (busy seconds of the work trained this step) / (actors x the step's wall time).

    With max_staleness >= 1 part of that work ran during the previous step's window, so single
    steps can be off; averaged over steps it is the share of time a role's actors had nothing to do.
    """
    wall = max(record["time/step"], 1e-9)

    def idle(busy: float, count: int) -> float:
        return float(np.clip(1.0 - busy / (max(count, 1) * wall), 0.0, 1.0))

    fractions = {"idle/rollout": idle(record["time/rollout_worker_sum"], actors["rollout"])}
    for name, seconds in reward_seconds.items():
        fractions[f"idle/reward/{name}"] = idle(sum(seconds), actors[f"reward/{name}"])
    fractions["idle/learner"] = idle(learner.seconds if learner is not None else 0.0, 1)
    return fractions


@dataclass(frozen=True)
class WandbOptions:
    """Where a run's metrics go in Weights & Biases (``wandb.init`` arguments)."""

    project: str
    name: str | None = None  # the run's name in the project (default: wandb's)
    config: dict[str, Any] = field(default_factory=dict)  # the run configuration, shown beside the curves
    dir: str | None = None  # where wandb keeps its local files (default: wandb's ./wandb)


class MetricsLog:
    """Appends step records to ``path`` and mirrors them to TensorBoard / wandb when asked.

    ``tensorboard_dir``: write TensorBoard event files there (None: no TensorBoard). ``wandb``: log
    to that project when ``wandb`` is importable (None: no wandb). ``purge_step``: on resume, the
    first step being rewritten, so TensorBoard hides the old events from that step on.
    """

    def __init__(
        self,
        path: Path,
        *,
        tensorboard_dir: Path | None = None,
        wandb: WandbOptions | None = None,
        purge_step: int | None = None,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _end_torn_line(self.path)
        self.records: list[dict[str, float]] = []
        self.parquet_path = self.path.with_suffix(".parquet")
        self._tensorboard = _open_tensorboard(tensorboard_dir, purge_step) if tensorboard_dir is not None else None
        self._wandb = _open_wandb(wandb) if wandb is not None else None

    @classmethod
    def for_run(cls, run_dir: Path, config: Config, purge_step: int | None = None) -> MetricsLog:
        """``<run_dir>/metrics.jsonl`` with the mirrors ``config.logging`` asks for (TensorBoard in ``<run_dir>/tensorboard``)."""
        run_dir = Path(run_dir)
        options = config.logging
        wandb = None
        if options.wandb_project:
            wandb = WandbOptions(options.wandb_project, name=run_dir.name, config=config.model_dump(mode="json"), dir=str(run_dir))
        tensorboard_dir = run_dir / "tensorboard" if options.tensorboard else None
        return cls(run_dir / "metrics.jsonl", tensorboard_dir=tensorboard_dir, wandb=wandb, purge_step=purge_step)

    def write(self, record: dict[str, float]) -> None:
        self.records.append(record)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        step = int(record.get("step", len(self.records)))
        scalars = {k: float(v) for k, v in record.items() if k != "step" and _is_finite_number(v)}
        if self._tensorboard is not None:
            try:
                for key, value in scalars.items():
                    self._tensorboard.add_scalar(key, value, global_step=step)
                self._tensorboard.flush()  # a dashboard reading the events mid-run sees every finished step
            except Exception as exc:  # noqa: BLE001 - a full disk under TensorBoard must not stop training
                logger.warning("TensorBoard logging stopped: %s: %s", type(exc).__name__, exc)
                self._tensorboard = None
        if self._wandb is not None:
            try:
                self._wandb.log(scalars, step=step)
            except Exception as exc:  # noqa: BLE001 - a wandb outage must not stop training
                logger.warning("wandb logging stopped: %s: %s", type(exc).__name__, exc)
                self._wandb = None
        rewards = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in record.items() if k.startswith("reward/") and k.endswith("/mean"))
        logger.info(
            "step %d  %s  loss=%.3g  %.1fs", step, rewards, record.get("learner/loss", float("nan")), record.get("time/step", float("nan"))
        )

    def close(self) -> Path | None:
        """Close the mirrors and write ``metrics.parquet`` from the whole JSON-lines file; returns its path (None if no steps)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as exc:  # noqa: BLE001
                logger.warning("wandb finish failed: %s: %s", type(exc).__name__, exc)
            self._wandb = None
        return write_parquet(self.path, self.parquet_path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics JSON-lines file, one per step, sorted by step.

    Lines that are not JSON objects with a step (a half-written last line) are skipped; a step
    written twice (a resumed run repeats the steps after its checkpoint) keeps its later line.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _is_finite_number(record.get("step")):
            by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def keep_steps_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """Cut a metrics file back to the records of steps <= ``step`` (a resumed run computes the later ones
    again) and return those records; the cut lines, and a line a crash cut short, are appended to
    ``metrics.discarded.jsonl`` beside it.

    The shortened file replaces the old one by rename, so a crash in between leaves either the old file
    or the new one, never a truncated history (the discarded lines may then be appended twice).
    """
    path = Path(path)
    if not path.exists():
        return []
    kept, discarded = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            discarded.append(line)
            continue
        (kept if record.get("step", 0) <= step else discarded).append(line)
    if discarded:
        with (path.parent / "metrics.discarded.jsonl").open("a") as f:
            f.write("\n".join(discarded) + "\n")
            f.flush()
            os.fsync(f.fileno())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return [json.loads(line) for line in kept]


def write_parquet(jsonl: Path, out: Path) -> Path | None:
    """Write the records of ``jsonl`` as a Parquet table (``step`` int64, numbers float64, text as text).

    Columns are the union of all keys; a key a step lacks is null there. Numbers are all float64 so
    that a metric that is 0 in one step and 0.5 in the next is one column type. Written to a
    temporary name and renamed, so a reader never sees half a file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = read_metrics(jsonl) if Path(jsonl).is_file() else []
    if not records:
        return None
    keys = list(dict.fromkeys(k for record in records for k in record))
    columns = {}
    for key in keys:
        values = [record.get(key) for record in records]
        if key == "step":
            columns[key] = pa.array([int(v) for v in values], pa.int64())
        elif all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
            columns[key] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        else:
            columns[key] = pa.array([None if v is None else str(v) for v in values], pa.string())
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, out)
    return out


def _end_torn_line(path: Path) -> None:
    """Terminate a last line a crash cut short, so the next record starts on a line of its own."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _open_tensorboard(folder: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # tensorboard is a dependency, but an environment may lack it
        logger.warning("TensorBoard logging is off: %s (pip install tensorboard, or set logging.tensorboard=false)", exc)
        return None
    return SummaryWriter(log_dir=str(folder), purge_step=purge_step)


def _open_wandb(options: WandbOptions):
    try:
        import wandb
    except ImportError:
        logger.warning("logging.wandb_project=%r but wandb is not installed (pip install wandb): wandb logging is off", options.project)
        return None
    try:
        return wandb.init(project=options.project, name=options.name, config=options.config, dir=options.dir)
    except Exception as exc:  # noqa: BLE001 - no API key, no network: the run goes on without wandb
        logger.warning("wandb.init failed, wandb logging is off (WANDB_MODE=offline logs locally): %s: %s", type(exc).__name__, exc)
        return None
