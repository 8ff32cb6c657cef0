"""One two-process gloo session for every multi-rank learner scenario of the suite.

Each test module with 2-rank checks (test_learner_group.py, test_students_ranks.py, test_dcpo.py) defines
``rank_jobs() -> dict[str, RankJob]``; the session fixture ``two_ranks`` (conftest.py) gathers the jobs of the
modules whose collected tests use it, starts ONE pair of plain torch processes (``mp.spawn``: the ``Learner`` class
the Ray actors hold, without Ray's CPU scheduling in the way, ENVIRONMENT.md), runs every job in it one after the
other and hands rank 0's return values back. One pair instead of one per module: each interpreter imports torch,
diffusers and transformers and joins a process group, ~11 s per pair on 2 idle cores, far more on a loaded machine.
And the pair starts early: conftest.py's ``_two_ranks_started`` starts it when the session begins, so the children's
imports (the test modules that hold jobs, and through them raygrpo, diffusers, transformers) run beside the tests
before the first user, mostly on the core a single-threaded test leaves idle; the jobs follow through a file
(:meth:`TwoRankPair.run`), built in this process only when a test asks for them.

A job that raises stops the session (``mp.spawn`` ends the other rank, which may wait in a collective); its traceback
is kept, so the tests reading that job fail with it and tests of jobs that already finished still pass.
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygrpo.net import free_port


@dataclass(frozen=True)
class RankJob:
    """``run(rank, world, folder, *args)`` on every rank; rank 0's return value is the job's result.

    ``run`` must be a module-level function (the children import it by name); ``args`` are pickled to both ranks
    (configs, rollouts); ``folder`` is the job's own scratch folder, shared by the ranks (saved states)."""

    run: Callable[..., Any]
    args: tuple = ()


def _session_main(rank: int, world: int, modules: list[str], out: str, parent: int) -> None:
    import importlib

    torch.set_num_threads(1)
    for name in modules:  # the jobs' code and what it imports, before the jobs exist: the reason to start early
        importlib.import_module(name)
    given = _wait_for_jobs(Path(out), parent)
    if given is None:
        return
    port, jobs = given
    from raygrpo.learner.fsdp import init_process_group

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
        (Path(out) / f"{_DONE}.rank{rank}").touch()  # the test process goes on now, not after this interpreter's exit
    finally:
        torch.distributed.destroy_process_group()


_JOBS = "jobs.pkl"
_CANCELLED = "cancelled"
_DONE = "done"


def _wait_for_jobs(out: Path, parent: int) -> tuple[int, dict[str, RankJob]] | None:
    """The rendezvous port and the jobs once the test process has written them; None when it cancelled the session
    or is gone (it may end with ``os._exit``, conftest.py's pytest_unconfigure, which leaves no chance to cancel)."""
    while not (out / _JOBS).is_file():
        if (out / _CANCELLED).exists() or os.getppid() != parent:
            return None
        time.sleep(0.05)
    with open(out / _JOBS, "rb") as f:
        return pickle.load(f)


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


class TwoRankPair:
    """The session's two rank processes, started (spawned) before their jobs exist, then given the jobs once
    (``run``) or sent home (``cancel``). ``modules``: what the children import while they wait (the modules whose
    ``rank_jobs()`` make the jobs: unpickling a job imports its module anyway)."""

    def __init__(self, modules: list[str], out: Path):
        import torch.multiprocessing as mp

        self.out = out
        self._done = False
        self._context = mp.start_processes(
            _session_main, args=(2, modules, str(out), os.getpid()), nprocs=2, join=False, start_method="spawn"
        )

    def run(self, jobs: dict[str, RankJob]) -> TwoRankResults:
        """Every job in the pair's gloo session (in ``jobs``' order); the results, or what stopped the session."""
        import torch.multiprocessing as mp

        if self._done:
            raise RuntimeError("the two-rank pair runs its jobs once")
        self._done = True
        if not jobs:
            self._end()
            return TwoRankResults(jobs, self.out, None)
        partial = self.out / f"{_JOBS}.partial"
        with open(partial, "wb") as f:
            pickle.dump((free_port(), jobs), f)  # the port now, not at the start: free when the ranks meet
        partial.rename(self.out / _JOBS)  # whole or absent: the children poll for it
        stopped = None
        try:
            # Until both ranks have finished every job (their interpreters' exit, seconds of torch and gloo teardown on a
            # loaded machine, is waited for at the session's end: cancel), or one of them stopped.
            while len(list(self.out.glob(f"{_DONE}.rank*"))) < 2 and not self._context.join(timeout=0.05):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:  # the job's traceback is in its .error file
            stopped = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return TwoRankResults(jobs, self.out, stopped)

    def cancel(self) -> None:
        """At the session's end: the children leave without running any job if none was given (their tests were
        deselected or never reached), else they are waited for as they exit."""
        self._done = True
        self._end()

    def _end(self) -> None:
        (self.out / _CANCELLED).touch()
        for process in self._context.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
