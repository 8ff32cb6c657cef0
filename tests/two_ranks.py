"""One two-process gloo session for every multi-rank learner scenario of the suite.

Each test module with 2-rank checks (test_learner_group.py, test_students_ranks.py, test_dcpo.py) defines
``rank_jobs() -> dict[str, RankJob]``; the session fixture ``two_ranks`` (conftest.py) gathers the jobs of the
modules whose collected tests use it, starts ONE pair of plain torch processes (``mp.spawn``: the ``Learner`` class
the Ray actors hold, without Ray's CPU scheduling in the way, ENVIRONMENT.md), runs every job in it one after the
other and hands rank 0's return values back. One pair instead of one per module: each interpreter imports torch,
diffusers and transformers and joins a process group, ~11 s per pair on 2 idle cores, far more on a loaded machine.

A job that raises stops the session (``mp.spawn`` ends the other rank, which may wait in a collective); its traceback
is kept, so the tests reading that job fail with it and tests of jobs that already finished still pass.
"""

from __future__ import annotations

import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class RankJob:
    """``run(rank, world, folder, *args)`` on every rank; rank 0's return value is the job's result.

    ``run`` must be a module-level function (the children import it by name); ``args`` are pickled to both ranks
    (configs, rollouts); ``folder`` is the job's own scratch folder, shared by the ranks (saved states)."""

    run: Callable[..., Any]
    args: tuple = ()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_main(rank: int, world: int, port: int, jobs: dict[str, RankJob], out: str) -> None:
    from raygrpo.learner.fsdp import init_process_group

    torch.set_num_threads(1)
    init_process_group(rank, world, "127.0.0.1", port, use_cuda=False)
    try:
        for name, job in jobs.items():
            folder = Path(out) / name
            folder.mkdir(exist_ok=True)
            try:
                result = job.run(rank, world, folder, *job.args)
            except BaseException:
                (Path(out) / f"{name}.rank{rank}.error").write_text(traceback.format_exc())
                raise
            if rank == 0:
                torch.save(result, Path(out) / f"{name}.pt")
    finally:
        torch.distributed.destroy_process_group()


class TwoRankResults:
    """Rank 0's result of each job, by name; a job that failed or never ran raises with the reason. ``jobs``: what
    ran (a test reads its job's inputs back from there: the same rollouts for its one-rank comparison)."""

    def __init__(self, jobs: dict[str, RankJob], out: Path, stopped: str | None):
        self.jobs = jobs
        self.out = out
        self.stopped = stopped

    def __getitem__(self, name: str) -> Any:
        saved = self.out / f"{name}.pt"
        if saved.is_file():
            return torch.load(saved, weights_only=False)
        errors = sorted(self.out.glob(f"{name}.rank*.error"))
        if errors:
            raise AssertionError(f"2-rank job {name!r} failed:\n" + "\n".join(e.read_text() for e in errors))
        raise AssertionError(f"2-rank job {name!r} did not run: the session stopped before it ({self.stopped})")


def run_two_ranks(jobs: dict[str, RankJob], out: Path) -> TwoRankResults:
    """Every job in one 2-rank gloo session (in ``jobs``' order); the results, or what stopped the session."""
    import torch.multiprocessing as mp

    stopped = None
    if jobs:
        try:
            mp.spawn(_session_main, args=(2, free_port(), jobs, str(out)), nprocs=2, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:  # the job's traceback is in its .error file
            stopped = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return TwoRankResults(jobs, out, stopped)
