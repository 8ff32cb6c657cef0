"""Run checkpoints: atomic writes, retention, verification, config compatibility and where a run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raygrpo.checkpoint import (
    CheckpointError,
    ControllerState,
    check_compatible,
    complete_checkpoints,
    find_resume_point,
    save_checkpoint,
    step_folder,
    verify_checkpoint,
)
from raygrpo.config import load_config
from raygrpo.data.prompts import PromptOrder

from .conftest import ROOT


def config_for(tmp_path, *overrides):
    return load_config(ROOT / "cluster" / "tiny.yaml", [f"run.output_root={tmp_path}", "run.name=r", *overrides])


def state(step: int) -> ControllerState:
    order = PromptOrder(8, seed=0)
    order.take(3)
    return ControllerState(step, step, 2 * step, step, {"jpeg": step}, order.state_dict(), {"state": 1}, list(range(step)))


def fake_learner(folder: Path) -> None:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 1000)


def test_a_checkpoint_is_complete_or_absent_never_half_written(tmp_path):
    config = config_for(tmp_path)
    run_dir = tmp_path / "r-1"

    def crash(folder: Path) -> None:
        fake_learner(folder)
        raise KeyboardInterrupt("killed while the learner was writing")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run_dir, state(2), config, crash, keep=2)
    assert complete_checkpoints(run_dir) == [] and not step_folder(run_dir, 2).exists()
    saved = save_checkpoint(run_dir, state(2), config, fake_learner, keep=2)
    assert saved == step_folder(run_dir, 2) and complete_checkpoints(run_dir) == [saved]
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the crashed attempt's leftovers are cleaned up"
    manifest = verify_checkpoint(saved)
    assert manifest["step"] == 2 and manifest["files"]["learner/model.safetensors"] == 1000
    restored = json.loads((saved / "controller.json").read_text())
    assert restored["prompt_order"]["order"] == state(2).prompt_order["order"]
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(run_dir, state(2), config, fake_learner, keep=2)


def test_retention_keeps_the_newest(tmp_path):
    config, run_dir = config_for(tmp_path), tmp_path / "r-1"
    for step in (2, 4, 6):
        save_checkpoint(run_dir, state(step), config, fake_learner, keep=2)
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-000004", "step-000006"]


def test_a_truncated_or_unfinished_checkpoint_is_refused_with_what_to_do(tmp_path):
    config, run_dir = config_for(tmp_path), tmp_path / "r-1"
    saved = save_checkpoint(run_dir, state(2), config, fake_learner, keep=0)
    (saved / "learner" / "model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(CheckpointError, match=r"corrupt: learner/model.safetensors has 10 bytes, 1000 were written; delete"):
        verify_checkpoint(saved)
    (saved / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(saved)


def test_only_compatible_changes_may_resume(tmp_path):
    config, run_dir = config_for(tmp_path), tmp_path / "r-1"
    saved = save_checkpoint(run_dir, state(2), config, fake_learner, keep=0)
    check_compatible(saved, config_for(tmp_path, "train.steps=60", "rollout.num_workers=3", "rewards.0.replicas=2"))
    with pytest.raises(CheckpointError, match=r"optimizer.lr: 0.005 in the checkpoint, 0.001 now(.|\n)*run.resume=never"):
        check_compatible(saved, config_for(tmp_path, "optimizer.lr=1e-3"))
    with pytest.raises(CheckpointError, match="algorithm.group_size"):
        check_compatible(saved, config_for(tmp_path, "algorithm.group_size=4"))


def test_auto_resume_picks_the_newest_unfinished_run_and_never_a_finished_one(tmp_path):
    config = config_for(tmp_path)
    assert find_resume_point(config) is None  # nothing there yet: a new run
    save_checkpoint(tmp_path / "r-20260101-000000", state(2), config, fake_learner, keep=0)
    point = find_resume_point(config)
    assert point.run_dir == tmp_path / "r-20260101-000000" and point.step == 2
    (tmp_path / "r-20260101-000000" / "checkpoint-final").mkdir()
    assert find_resume_point(config) is None, "a finished run is not continued"
    assert find_resume_point(config_for(tmp_path, "run.resume=never")) is None
    explicit = find_resume_point(config_for(tmp_path, f"run.resume={step_folder(tmp_path / 'r-20260101-000000', 2)}"))
    assert explicit.step == 2
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        find_resume_point(config_for(tmp_path, f"run.resume={tmp_path / 'nowhere'}"))


def test_prompt_order_state_round_trips(tmp_path):
    a = PromptOrder(5, seed=3)
    a.take(7)
    b = PromptOrder(5, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.take(12) == b.take(12)
