"""The entry point on Ray: SIGTERM while the workers start, a plan that does not fit the cluster, and fast failures
of the real-model presets on a machine without their weights or GPUs. (The same command under `ray job submit` and
`ray job stop` runs with the kill-and-resume test: tests/test_resume_e2e.py; the tiny runs that learn, and the reward
failures, run in process: tests/test_run_in_process.py.)"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from .conftest import run_main
from .test_run_in_process import SigtermWhenLogged


def printed_run_dir(stdout: str) -> Path:
    match = re.search(r"^outputs: (.+)$", stdout, re.MULTILINE)
    assert match, f"the run must print its output folder; stdout was:\n{stdout[-2000:]}"
    return Path(match.group(1))


@pytest.mark.slow
def test_sigterm_while_the_ray_workers_start_stops_with_one_line(ray_cluster, tmp_path):
    """Loading the models can take minutes, the likeliest time for Ctrl-C: one line, 143, nothing to resume yet.
    The driver is this process (run_main), joined to the session cluster; the signal comes from another thread once
    the learner group starts, inside Controller._start while the actors load their models."""
    with SigtermWhenLogged("learner group: "):
        proc = run_main("cluster/tiny.yaml", "train.steps=2", f"run.output_root={tmp_path}", env={"RAY_ADDRESS": ray_cluster.address})
    stderr = proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [x for x in stderr.splitlines() if x.startswith("raygrpo: ")]
    assert "stopped by SIGTERM" in line, line
    for run_dir in tmp_path.glob("tiny-*"):  # stopped inside the controller: marked aborted, nothing to resume from
        assert json.loads((run_dir / "run_state.json").read_text())["status"] == "aborted"


@pytest.mark.parametrize(
    "preset, hub_id, gpus, reward_problem",
    [
        ("flux.yaml", "black-forest-labs/FLUX.1-dev", "25", "rewards.0 (hps): reward 'hps_v2.1': parameter 'checkpoint'"),
        ("flux_dgpo.yaml", "black-forest-labs/FLUX.1-dev", "16", "rewards.0 (pickscore): reward 'pickscore': parameter 'model'"),
        ("sd3_dgpo.yaml", "stabilityai/stable-diffusion-3.5-medium", "7", "rewards.0: reward 'ocr': http reward GET http://127.0.0.1:8010/v1/health failed"),
    ],
)
def test_real_model_presets_fail_fast_without_weights_or_gpus(tmp_path, monkeypatch, preset, hub_id, gpus, reward_problem):
    """No weights and no GPU here: a clear list of what is missing within seconds, and no hang. Both modes in this
    process (run_main): huggingface_hub reads HF_HUB_OFFLINE once at import, so for an unreachable hub its constant is
    switched off as a process started with HF_HUB_OFFLINE=0 would have it (raygrpo reads the constant and the variable)."""
    import huggingface_hub.constants

    modes = ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0"}) if preset == "flux.yaml" else ({"HF_HUB_OFFLINE": "1"},)
    for extra in modes:  # offline mode, and an unreachable hub
        start = time.monotonic()
        with monkeypatch.context() as patch:
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", extra["HF_HUB_OFFLINE"] == "1")
            proc = run_main(f"cluster/{preset}", f"run.output_root={tmp_path}", env=extra)
        elapsed = time.monotonic() - start
        assert proc.returncode == 2, proc.stderr
        message = proc.stderr
        assert "model.pretrained" in message and hub_id in message and "download" in message, message
        assert f"the plan needs {gpus} GPUs, this machine has 0" in message, message
        if extra["HF_HUB_OFFLINE"] == "1":  # online, reward weights count as downloadable until an actor loads them
            assert reward_problem in message, message
        else:  # the hub was asked, not skipped as offline
            assert "the hub could not be reached" in message, message
        assert elapsed < 60, f"took {elapsed:.0f} s"
        assert not any(tmp_path.iterdir()), "nothing may be written when the run cannot start"


def test_a_plan_that_does_not_fit_the_cluster_names_need_and_have(ray_cluster, tmp_path):
    """Joined to the session cluster (RAY_ADDRESS) from this process, which the entry point leaves as it found it."""
    proc = run_main("cluster/tiny.yaml", "rollout.num_gpus=1", "rollout.num_workers=3", f"run.output_root={tmp_path}",
                    env={"RAY_ADDRESS": ray_cluster.address})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs more GPU than the cluster has" in proc.stderr
    assert re.search(r"rollout\s+3\s+0.5\s+1", proc.stderr) and re.search(r"need\s+2.75\s+3", proc.stderr), proc.stderr
    assert re.search(r"have\s+4\s+0", proc.stderr), proc.stderr
