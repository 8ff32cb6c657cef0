"""MetricsLog: JSON lines plus TensorBoard scalars, optional wandb, and a Parquet copy at the end."""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing import event_accumulator

from raygrpo.config import load_config
from raygrpo.metrics import MetricsLog, WandbOptions, keep_steps_up_to, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _record(step: int, **extra) -> dict:
    return {
        "step": step,
        "reward/jpeg/mean": -3.0 + step,
        "reward/total/mean": -3.0 + step,
        "learner/loss": 0.5 / step,
        "time/step": 1.0,
        **extra,
    }


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = event_accumulator.EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_scalars_and_parquet_round_trip(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    log.write(_record(1, **{"groups/dropped": 0}))
    log.write(_record(2, **{"learner/kl": float("nan"), "groups/dropped": 1}))
    # Visible before close: each write is flushed, so a dashboard can read a running job.
    assert _scalars(tmp_path / "tb")["reward/total/mean"] == [(1, -2.0), (2, -1.0)]
    parquet = log.close()

    scalars = _scalars(tmp_path / "tb")
    assert scalars["learner/loss"] == [(1, 0.5), (2, 0.25)]
    assert scalars["groups/dropped"] == [(1, 0.0), (2, 1.0)]
    assert "learner/kl" not in scalars  # NaN is not plotted; it stays null in the JSON lines
    assert "step" not in scalars

    assert parquet == tmp_path / "metrics.parquet"
    table = pq.read_table(parquet).to_pylist()
    assert [row["step"] for row in table] == [1, 2]
    assert table[0]["learner/loss"] == 0.5 and table[1]["reward/jpeg/mean"] == -1.0
    assert table[0]["learner/kl"] is None and table[1]["learner/kl"] is None  # absent in step 1, NaN in step 2
    assert table[1]["groups/dropped"] == 1.0  # ints and floats share one float64 column
    assert pq.read_schema(parquet).field("step").type == "int64"


def test_parquet_keeps_the_last_line_of_a_repeated_step_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path) as log:
        for step in (1, 2, 3):
            log.write(_record(step))
    # A crash left half a line (no newline); the resumed run appends steps 3.. again after its checkpoint at step 2.
    with path.open("a") as f:
        f.write('{"step": 4, "reward/jpeg/me')
    with MetricsLog(path) as log:
        log.write(_record(3, **{"reward/jpeg/mean": 9.0}))
    rows = pq.read_table(tmp_path / "metrics.parquet").to_pylist()
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["reward/jpeg/mean"] == 9.0
    assert len(read_metrics(path)) == 3 and len(path.read_text().splitlines()) == 5


def test_no_steps_no_parquet(tmp_path):
    assert MetricsLog(tmp_path / "metrics.jsonl").close() is None
    assert not (tmp_path / "metrics.parquet").exists()


class _FakeRun:
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def log(self, data, step):
        self.logged.append((data, step))

    def finish(self):
        self.finished = True


def test_wandb_gets_every_finite_scalar_at_its_step(tmp_path, monkeypatch):
    run, inits = _FakeRun(), []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: inits.append(kwargs) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(tmp_path / "metrics.jsonl", wandb=WandbOptions("proj", name="run-1", config={"a": 1}, dir=str(tmp_path)))
    log.write(_record(1, **{"learner/kl": float("nan")}))
    log.close()
    assert inits == [{"project": "proj", "name": "run-1", "config": {"a": 1}, "dir": str(tmp_path)}]
    data, step = run.logged[0]
    assert step == 1 and data["reward/jpeg/mean"] == -2.0 and "learner/kl" not in data and "step" not in data
    assert run.finished


def test_wandb_missing_or_failing_never_stops_the_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with caplog.at_level(logging.WARNING, logger="raygrpo.metrics"):
        log = MetricsLog(tmp_path / "a.jsonl", wandb=WandbOptions("proj"))
    assert "wandb is not installed" in caplog.text
    log.write(_record(1))
    log.close()

    broken = types.ModuleType("wandb")
    broken.init = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("no API key"))
    monkeypatch.setitem(sys.modules, "wandb", broken)
    log = MetricsLog(tmp_path / "b.jsonl", wandb=WandbOptions("proj"))
    log.write(_record(1))
    assert json.loads((tmp_path / "b.jsonl").read_text())["step"] == 1
    log.close()


@pytest.mark.parametrize("tensorboard", [True, False])
def test_for_run_follows_the_logging_section(tmp_path, monkeypatch, tensorboard):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = load_config(ROOT / "cluster" / "tiny.yaml", [f"logging.tensorboard={str(tensorboard).lower()}", "logging.wandb_project=demo"])
    log = MetricsLog.for_run(tmp_path, config)
    log.write(_record(1))
    log.close()
    assert log.path == tmp_path / "metrics.jsonl"
    assert (tmp_path / "tensorboard").is_dir() == tensorboard
    assert (tmp_path / "metrics.parquet").is_file()


def test_a_resume_cuts_the_history_back_by_replacing_the_file_never_rewriting_it(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(_record(step)) for step in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + lines[0][:20])  # steps 3-4 after the checkpoint, and a torn line
    original = path.read_bytes()

    def crash(*args):
        raise OSError("killed while replacing")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        keep_steps_up_to(path, 2)
    assert path.read_bytes() == original, "a crash while cutting the history back loses nothing"
    monkeypatch.undo()
    (tmp_path / "metrics.discarded.jsonl").unlink()
    records = keep_steps_up_to(path, 2)
    assert [r["step"] for r in records] == [1, 2] and path.read_text() == "\n".join(lines[:2]) + "\n"
    assert (tmp_path / "metrics.discarded.jsonl").read_text().splitlines() == [lines[2], lines[3], lines[0][:20]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.discarded.jsonl", "metrics.jsonl"]
