"""Run checkpoints: atomic and durable writes, retention, verification, config compatibility, where a run
resumes, and the entry point refusing a bad resume before Ray starts without touching what is on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from raygrpo.checkpoint import (
    CheckpointError,
    ControllerState,
    check_compatible,
    complete_checkpoints,
    find_resume_point,
    is_run_folder_of,
    run_finished,
    save_checkpoint,
    save_weights,
    step_folder,
    verify_checkpoint,
    write_run_state,
)
from raygrpo.config import load_config
from raygrpo.data.prompts import PromptOrder

from .conftest import ROOT, run_main


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
    assert manifest["sha256"]["learner/model.safetensors"] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert set(manifest["sha256"]) == set(manifest["files"]) == {"learner/model.safetensors", "controller.json", "config.yaml"}
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
    (saved / "learner" / "model.safetensors").write_bytes(b"x" * 999 + b"y")  # the right size, one byte wrong
    with pytest.raises(CheckpointError, match=r"corrupt: learner/model.safetensors does not match the sha256 it was written with"):
        verify_checkpoint(saved)
    (saved / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(saved)


def test_every_file_and_folder_is_fsynced_and_the_rename_too(tmp_path, monkeypatch):
    """A power loss after save_checkpoint returns must not leave a MANIFEST pointing at data still in the page cache."""
    config, run_dir = config_for(tmp_path), tmp_path / "r-1"
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    saved = save_checkpoint(run_dir, state(2), config, fake_learner, keep=2)
    tmp = step_folder(run_dir, 2).with_name(f".tmp-step-000002-{os.getpid()}")
    written = {str(p).replace(str(saved), str(tmp)) for p in [saved, *saved.rglob("*")]}
    assert written <= set(synced), f"not fsynced: {sorted(written - set(synced))}"
    assert synced[-1] == str(run_dir / "checkpoints"), "the folder holding the renamed checkpoint is synced last"


def test_weights_folders_appear_whole_and_aborts_never_overwrite_each_other(tmp_path):
    def weights(text: str):
        return lambda folder: (folder / "transformer").mkdir() or (folder / "transformer" / "w.bin").write_text(text)

    def crash(folder: Path) -> None:
        weights("half")(folder)
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        save_weights(tmp_path, "checkpoint-final", crash, replace=True)
    assert not (tmp_path / "checkpoint-final").exists()
    final = save_weights(tmp_path, "checkpoint-final", weights("one"), replace=True)
    assert final == tmp_path / "checkpoint-final" and not list(tmp_path.glob(".tmp-*")), "the crashed attempt is cleaned up"
    save_weights(tmp_path, "checkpoint-final", weights("two"), replace=True)  # a resumed run writes it again
    assert (final / "transformer" / "w.bin").read_text() == "two" and not list(tmp_path.glob(".*"))
    aborted = [save_weights(tmp_path, "checkpoint-aborted", weights(f"abort {i}"), replace=False) for i in range(3)]
    assert [p.name for p in aborted] == ["checkpoint-aborted", "checkpoint-aborted-2", "checkpoint-aborted-3"]
    assert [(p / "transformer" / "w.bin").read_text() for p in aborted] == ["abort 0", "abort 1", "abort 2"]


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
    run_dir = tmp_path / "r-20260101-000000"
    save_checkpoint(run_dir, state(2), config, fake_learner, keep=0)
    point = find_resume_point(config)
    assert point.run_dir == run_dir and point.step == 2
    write_run_state(run_dir, "running", step=2)
    (run_dir / "checkpoint-final").mkdir()  # killed after the final weights, before the report and export
    assert not run_finished(run_dir) and find_resume_point(config).run_dir == run_dir
    write_run_state(run_dir, "aborted", step=2, checkpoint="checkpoint-aborted", reason="no rollout worker left")
    assert find_resume_point(config).run_dir == run_dir, "an aborted run is continued by the same command"
    write_run_state(run_dir, "finished", step=6, checkpoint="checkpoint-final")
    assert find_resume_point(config) is None, "a finished run is not continued"
    (run_dir / "run_state.json").unlink()
    assert run_finished(run_dir) and find_resume_point(config) is None, "runs from before run_state.json finish with checkpoint-final"
    assert find_resume_point(config_for(tmp_path, "run.resume=never")) is None
    explicit = find_resume_point(config_for(tmp_path, f"run.resume={step_folder(tmp_path / 'r-20260101-000000', 2)}"))
    assert explicit.step == 2
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        find_resume_point(config_for(tmp_path, f"run.resume={tmp_path / 'nowhere'}"))


def test_auto_resume_takes_only_folders_of_exactly_this_name(tmp_path):
    """All presets share output_root; run.name=tiny must never pick up a tiny-dgpo (or tiny-sd) run."""
    tiny, dgpo = config_for(tmp_path, "run.name=tiny"), config_for(tmp_path, "run.name=tiny-dgpo", "algorithm={name: dgpo}")
    save_checkpoint(tmp_path / "tiny-20260101-000000", state(2), tiny, fake_learner, keep=0)
    save_checkpoint(tmp_path / "tiny-dgpo-20260102-000000", state(4), dgpo, fake_learner, keep=0)  # newer, and incompatible
    save_checkpoint(tmp_path / "tiny-notes", state(6), tiny, fake_learner, keep=0)  # not a name make_run_dir makes
    os.utime(tmp_path / "tiny-20260101-000000", (1, 1))  # the oldest folder of all
    assert find_resume_point(tiny).run_dir == tmp_path / "tiny-20260101-000000"
    assert find_resume_point(dgpo).run_dir == tmp_path / "tiny-dgpo-20260102-000000"
    save_checkpoint(tmp_path / "tiny-20260101-000000-4242", state(8), tiny, fake_learner, keep=0)  # same second, another pid
    assert find_resume_point(tiny).step == 8
    names = ("tiny-20260101-000000", "tiny-dgpo-20260101-000000", "tiny-2026-01-01", "xtiny-20260101-000000")
    assert [is_run_folder_of("tiny", n) for n in names] == [True, False, False, False]


def test_reward_params_may_change_only_where_they_say_how_to_reach_the_reward(tmp_path):
    http = "rewards=[{name: judge, kind: http, params: {url: 'http://127.0.0.1:9000', timeout_s: 10, media_type: image/png}}]"
    saved = save_checkpoint(tmp_path / "r-1", state(2), config_for(tmp_path, http), fake_learner, keep=0)
    moved = http.replace("9000", "9001").replace("timeout_s: 10", "timeout_s: 30, max_attempts: 8, token_env: JUDGE_TOKEN")
    check_compatible(saved, config_for(tmp_path, moved))
    refused = r"rewards.0.params.media_type: 'image/png' in the checkpoint, 'video/mp4' now(.|\n)*only these may change: url"
    with pytest.raises(CheckpointError, match=refused):
        check_compatible(saved, config_for(tmp_path, http.replace("image/png", "video/mp4")))
    jpeg = save_checkpoint(tmp_path / "r-2", state(2), config_for(tmp_path), fake_learner, keep=0)
    with pytest.raises(CheckpointError, match=r"rewards.0.params.quality: '\(absent\)' in the checkpoint, 50 now"):
        check_compatible(jpeg, config_for(tmp_path, "rewards.0.params.quality=50"))
    frame = "rewards=[{name: f, kind: frame_average, params: {reward: {kind: http, params: {url: 'http://a:1'}}}}]"
    framed = save_checkpoint(tmp_path / "r-3", state(2), config_for(tmp_path, frame), fake_learner, keep=0)
    check_compatible(framed, config_for(tmp_path, frame.replace("a:1", "b:2")))
    with pytest.raises(CheckpointError, match=r"rewards.0.params.reward.kind"):
        check_compatible(framed, config_for(tmp_path, frame.replace("kind: http", "kind: clip_score")))


def test_prompt_order_state_round_trips(tmp_path):
    a = PromptOrder(5, seed=3)
    a.take(7)
    b = PromptOrder(5, seed=99)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.take(12) == b.take(12)


# ----- the entry point: bad resumes and unwritable output folders fail before Ray starts -----


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every path under ``root`` with its bytes (None for a folder) and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _run_main_without_dac_override(*args: str) -> subprocess.CompletedProcess:
    """``run_main(*args)`` in a child forked from this process that has dropped CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    (root writes through any mode bits with them; without them it obeys the bits like any user), and no RAY_ADDRESS, so
    the run would start a local Ray. A fork, not a new interpreter: the entry point's imports are already loaded here."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read)
            _drop_dac_capabilities()
            os.environ.pop("RAY_ADDRESS", None)
            proc = run_main(*args)
            result = {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
            result = {"returncode": -1, "stdout": "", "stderr": f"the child failed: {exc!r}"}
        with os.fdopen(write, "w") as out:
            json.dump(result, out)
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        result = json.load(answer)
    os.waitpid(pid, 0)
    return subprocess.CompletedProcess(["raygrpo.run", *args], result["returncode"], result["stdout"], result["stderr"])


def _drop_dac_capabilities() -> None:
    """capset(2) on this (single-threaded, forked) process: clear CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2) from
    the effective and permitted sets; os.access as root checks the permitted set. A no-op for a user without them."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


@pytest.mark.parametrize(
    "damage, words",
    [
        ("one byte of the learner state", "is corrupt: learner/model.safetensors does not match the sha256 it was written with; delete"),
        ("optimizer.lr=1e-3", "optimizer.lr: 0.005 in the checkpoint, 0.001 now"),
    ],
)
def test_the_entry_point_refuses_a_bad_resume_with_exit_2_and_touches_nothing(tmp_path, damage, words):
    saved = save_checkpoint(tmp_path / "tiny-20260101-000000", state(2), config_for(tmp_path, "run.name=tiny"), fake_learner, keep=0)
    overrides = [f"run.output_root={tmp_path}"]
    if damage.startswith("one byte"):
        (saved / "learner" / "model.safetensors").write_bytes(b"x" * 999 + b"y")
    else:
        overrides.append(damage)
    before = _snapshot(tmp_path)
    proc = run_main("cluster/tiny.yaml", *overrides)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Ray instance" not in proc.stderr and "Ray cluster" not in proc.stderr, "it must fail before Ray starts"
    assert _snapshot(tmp_path) == before, "a refused resume changes nothing on disk"


def test_an_output_root_below_a_file_is_refused_naming_the_field(tmp_path):
    from raygrpo.errors import PreflightError
    from raygrpo.run import preflight

    (tmp_path / "taken").write_text("a file where a folder should be")
    with pytest.raises(PreflightError, match=r"run.output_root: '.*taken' is a file, not a folder"):
        preflight(config_for(tmp_path / "taken" / "runs"))


def test_a_read_only_output_root_is_refused_before_ray_starts(tmp_path):
    """Root writes through any mode bits (CAP_DAC_OVERRIDE); without that capability it obeys them like any user."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        proc = _run_main_without_dac_override("cluster/tiny.yaml", f"run.output_root={locked / 'runs'}")
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"run.output_root: '{locked}' is not writable" in proc.stderr, proc.stderr[-3000:]
    assert "Ray instance" not in proc.stderr and "Ray cluster" not in proc.stderr, "it must fail before Ray starts"
    assert not (locked / "runs").exists()
