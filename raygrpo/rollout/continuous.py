"""Continuous batching of ODE rollouts across denoising steps (issue #17, item 3).

The plain rollout worker samples one group per ``generate`` call: every forward holds that group's
members only (``min(G, rollout.micro_batch_size)`` rows), and a second group waits until the first is
decoded. Here one batching loop serves every group the worker has been sent: at each *step boundary*
(after one denoising step of everything in flight) it admits waiting members into the free rows, so a
forward holds up to ``rollout.micro_batch_size`` members of any groups, each at its own noise level,
and a group is returned as soon as its own members are done, not when the batch is.

The idea is continuous ("iteration-level") batching of LLM serving (Orca, Yu et al., OSDI 2022;
vLLM's scheduler), moved from decoding steps to denoising steps. It is exact for deterministic ODE
samplers (DGPO's DPM-Solver++(2M) and Euler; :mod:`raygrpo.sampling.ode`) because nothing in an ODE
step couples the rows of a batch:

* the network sees a batch of rows ``x [N, ...]`` with noise levels ``sigma [N]`` and conditioning
  stacked per row (``ModelAdapter.velocity`` takes a level per row, and
  :meth:`ConditioningBatch.concat` stacks the prompts);
* the solver update is elementwise per row. Members admitted together form a *lane*: rows ``[lo, hi)``
  of one job (one group, or one part of a spread group) that step together through a solver object
  of their own (:func:`raygrpo.sampling.make_ode_solver`, the one the plain worker uses), which keeps
  their grid position and DPM-Solver++(2M)'s history (the previous data prediction ``x0_{i-1}`` of
  those rows). Each step: ``v = velocity(cat(lane.x), cat(sigma[lane.step]), cat(lane.cond))`` once,
  then ``lane.x = lane.solver.step(lane.x, v[lane rows], lane.step)`` per lane.

So a member's trajectory is the plain worker's up to how the network's kernels round for another batch
composition (float32 GEMMs split the batch dimension differently): bit-for-bit equal when a group runs
alone in a batch of the same rows, about 1e-6 relative in float32 otherwise
(tests/test_continuous_batching.py). The initial noise is drawn per group as before (the group's seed).

Admission (first come, first served): the oldest waiting job fills the free rows first, possibly in
several lanes (a group of 4 with 3 rows free runs 3 members now and 1 when a row frees up), so every
forward is as full as the queue allows. A job larger than the batch runs in lanes of at most the batch.

Concurrency. :class:`ContinuousRolloutWorker` is a threaded Ray actor (``max_concurrency`` from
:func:`actor_concurrency`): each ``generate`` call runs in a thread of its own (prompt encoding, noise,
then decoding and the Rollout, exactly the plain worker's ``generate``) and blocks in
:meth:`OdeBatcher.sample` while the one batching thread denoises. Its three returns (Rollout, GroupMedia,
RolloutInfo) are unchanged. The groups' host work and the loop's steps take turns (:class:`TurnLock`, first
asked, first served): one thing at a time on the device, no two threads in a tokenizer. Weights must not
change under a group: :class:`VersionGate` lets a weight load start only when no group is running and holds
back groups that ask for the version being loaded (a threaded actor does not keep the order calls were sent
in). In process (``run.in_process``) the same worker runs one group at a time: correct, nothing to batch with.

Time accounting (:class:`~raygrpo.contracts.RolloutInfo`). A group's latency (``seconds``) overlaps the other
groups', so latencies cannot say how busy a worker was (3 groups in flight all the time read as 3 busy workers, and
``idle/rollout`` as 0). ``busy_seconds`` is the group's own turns plus its share of every step it had rows in (the
step's wall time times its rows over the step's rows): turns never overlap, so a worker's groups add up to the wall
seconds it spent working, and ``idle/rollout`` and the autoscale policy (raygrpo/rollout/autoscale.py) read that.

Expected gain. What batching saves is the network's cost per row at ``micro_batch_size`` rows against at
the rows one group gives (``min(G, micro_batch_size)``); decoding and prompt encoding stay per group. On the
tiny CPU FLUX a forward is mostly fixed per-call cost (4.0 ms for 4 rows, 4.2 ms for 16: 1.0 against 0.26 ms
per row), so a group's denoising gets about 4x cheaper and the whole rollout, decoding included, about
1.5x faster (benchmarks/continuous_batching.py, benchmarks/README.md). On a GPU the per-row cost of a large
network hardly falls past a few rows: FLUX.1-dev at 720x720 has ~2.5k tokens per sample, so 4 rows are
already 10k rows per GEMM, near an H100's peak, and the expected gain is 1.0-1.1x. It grows where a group
gives few rows: short sequences (256-512 px), small networks, Flow-GRPO's parts (G / num_workers members per
worker), and group sizes that leave a ragged last micro-batch (G 12 at micro-batch 8: forwards of 8 and 4).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from raygrpo.config import Config
from raygrpo.contracts import Conditioning, ConditioningBatch, GroupMedia, PromptGroup, Rollout, RolloutInfo, SyncReport, WeightsMessage
from raygrpo.guard.sampling import HeldOutRequest, HeldOutSamples
from raygrpo.models.base import ModelAdapter
from raygrpo.rollout.worker import RolloutWorker
from raygrpo.sampling import ODE_SOLVERS, make_ode_solver
from raygrpo.sampling.ode import OdeSolver

logger = logging.getLogger(__name__)

NEWER_VERSION_WAIT_S = 5.0
"""How long a group asking for a newer policy version than the worker holds waits for its weights when no load is
under way (a threaded actor may start it before the load sent ahead of it): then the plain worker's StaleWorkerError."""


@dataclass(eq=False)  # a job is itself (compared by identity), not its tensors
class OdeJob:
    """One group (or part of one) in the batching loop: its rows' noise, grid and conditioning, and its result."""

    noise: torch.Tensor  # [G, ...] float32 on the CPU, the members' initial noise
    sigmas: torch.Tensor  # [T+1] on the model's device, the grid every member walks
    cond: ConditioningBatch  # [G, ...] on the model's device (views of one copy)
    final: torch.Tensor  # [G, ...] float32 on the CPU, filled lane by lane
    admitted: int = 0  # members admitted so far (in member order)
    remaining: int = 0  # members not finished
    busy: float = 0.0  # seconds of the loop's steps that were this job's: each step's time split over its rows
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def size(self) -> int:
        return len(self.noise)


@dataclass(eq=False)
class _Lane:
    """Rows ``rows`` of one job, stepping together through one solver object (their grid position and history)."""

    job: OdeJob
    rows: slice
    solver: OdeSolver
    x: torch.Tensor  # [b, ...] float32 on the model's device
    cond: ConditioningBatch  # [b, ...]
    step: int = 0

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


class OdeBatcher:
    """The batching loop: jobs in, one forward per step boundary over every row in flight, jobs out when finished.

    ``solver``: one of :data:`raygrpo.sampling.ode.ODE_SOLVERS`; ``max_batch``: the most rows per forward.
    Driven either by :meth:`sample` from any number of threads (a loop thread of its own runs while there is
    work), or synchronously by :meth:`submit` and :meth:`step` (tests: admission at chosen steps).
    ``forwards`` and ``rows`` count the forwards run and the rows they held (mean fill = rows / forwards).
    The loop thread takes ``turns`` for each step: the owner's other work on the same device (a group's prompt
    encoding and decoding) takes its turns between steps, never beside one. Side by side they gain nothing on one
    device and, for a network whose forward is mostly Python, contend for the GIL: on the tiny CPU FLUX a batched
    forward took 2-4x longer while groups decoded in other threads.
    """

    def __init__(self, model: ModelAdapter, solver: str, max_batch: int, device: torch.device | str, turns: TurnLock | None = None):
        if solver not in ODE_SOLVERS:
            raise ValueError(f"continuous batching runs the ODE solvers {ODE_SOLVERS}, got sampler {solver!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.solver, self.max_batch, self.device = model, solver, max_batch, torch.device(device)
        self.turns = turns if turns is not None else TurnLock()
        self.forwards = self.rows = 0
        self._waiting: deque[OdeJob] = deque()  # FIFO; a job leaves it once all its members are admitted
        self._lanes: list[_Lane] = []  # in flight; touched by the stepping thread only
        self._stacked: ConditioningBatch | None = None  # the lanes' conditioning stacked; None when the lanes changed
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, noise: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> OdeJob:
        """Queue ``noise [G, ...]`` to be sampled on grid ``sigmas [T+1]`` under ``cond``; admitted at the next step boundary."""
        if noise.ndim < 2 or len(noise) == 0:
            raise ValueError(f"noise must be [G, ...] with G >= 1, got shape {tuple(noise.shape)}")
        job = OdeJob(
            noise=noise,
            sigmas=sigmas.to(self.device),
            cond=ConditioningBatch.of(cond, len(noise), self.device),  # one transfer per job, in the caller's thread
            final=torch.empty(noise.shape, dtype=torch.float32),
            remaining=len(noise),
        )
        with self._lock:
            self._waiting.append(job)
        return job

    def sample(self, noise: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning) -> OdeJob:
        """The finished job of ``noise``: its final latents ``job.final [G, ...]`` (CPU float32), sampled among whatever
        else is in flight, and its share of the loop's time ``job.busy``; blocks until this job's members are done.
        Thread-safe; raises the forward's error if the batch it was in failed."""
        job = self.submit(noise, sigmas, cond)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="raygrpo-ode-batcher", daemon=True)
                self._thread.start()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    @property
    def in_flight(self) -> int:
        """Rows being denoised now."""
        return sum(lane.size for lane in self._lanes)

    def step(self) -> list[OdeJob]:
        """One step boundary: admit waiting members into the free rows, one forward over every lane, each lane's
        solver step. Returns the jobs that finished (their ``done`` is set). The step's wall time goes to the jobs in
        it by rows (``OdeJob.busy``), so the jobs' busy seconds add up to the loop's."""
        start = time.perf_counter()
        self._admit()
        lanes = self._lanes
        if not lanes:
            return []
        x = torch.cat([lane.x for lane in lanes])  # [N, ...]
        sigma = torch.cat([lane.job.sigmas[lane.step].expand(lane.size) for lane in lanes])  # [N]
        try:
            if self._stacked is None:
                self._stacked = ConditioningBatch.concat([lane.cond for lane in lanes])  # [N, ...]
            v = self.model.velocity(x, sigma, self._stacked)  # [N, ...]
        except Exception as exc:  # noqa: BLE001 - out of memory, a bad input...: the groups in this batch fail, the loop goes on
            logger.warning("continuous batching: a forward of %d rows failed (%s); failing the %d groups in it", len(x), exc, len({id(l.job) for l in lanes}))
            return self._fail([lane.job for lane in lanes], exc)
        self.forwards, self.rows = self.forwards + 1, self.rows + len(x)
        finished, running, lo = [], [], 0
        for lane in lanes:
            lane.x = lane.solver.step(lane.x, v[lo : lo + lane.size], lane.step)  # [b, ...]
            lo, lane.step = lo + lane.size, lane.step + 1
            if lane.step < len(lane.job.sigmas) - 1:
                running.append(lane)
                continue
            job = lane.job
            job.final[lane.rows] = lane.x.cpu()
            job.remaining -= lane.size
            if job.remaining == 0:
                finished.append(job)
        if len(running) != len(lanes):
            self._lanes, self._stacked = running, None
        seconds = time.perf_counter() - start
        for lane in lanes:
            lane.job.busy += seconds * lane.size / len(x)
        for job in finished:
            job.done.set()
        return finished

    def _admit(self) -> None:
        free = self.max_batch - self.in_flight
        with self._lock:
            while free > 0 and self._waiting:
                job = self._waiting[0]
                take = min(free, job.size - job.admitted)
                rows = slice(job.admitted, job.admitted + take)
                solver = make_ode_solver(self.solver, job.sigmas)  # a fresh history per lane: its rows start at step 0
                x = job.noise[rows].to(self.device, torch.float32)  # [b, ...]
                self._lanes.append(_Lane(job, rows, solver, x, job.cond.rows(rows)))
                self._stacked = None
                job.admitted += take
                free -= take
                if job.admitted == job.size:
                    self._waiting.popleft()

    def _fail(self, jobs: list[OdeJob], exc: BaseException) -> list[OdeJob]:
        """Fail ``jobs`` with ``exc``: their lanes and their members still waiting leave the loop."""
        failed = {id(job): job for job in jobs}
        self._lanes = [lane for lane in self._lanes if id(lane.job) not in failed]
        self._stacked = None
        with self._lock:
            self._waiting = deque(job for job in self._waiting if id(job) not in failed)
        for job in failed.values():
            job.error = exc
            job.done.set()
        return list(failed.values())

    def _run(self) -> None:
        # no_grad is per thread: generate's decorator does not reach this one.
        with torch.no_grad():
            while True:
                with self._lock:
                    if not self._waiting and not self._lanes:
                        self._thread = None  # under the lock: a job submitted from now on starts a new loop
                        return
                try:
                    with self.turns:
                        self.step()
                except BaseException as exc:  # a bug in the loop itself: nothing in flight may wait forever
                    with self._lock:
                        waiting = list(self._waiting)
                    self._fail([lane.job for lane in self._lanes] + waiting, exc)
                    with self._lock:
                        self._thread = None  # the next job starts a new loop
                    raise


class TurnLock:
    """A lock granted in the order it was asked for. ``threading.Lock`` is not: the batching loop, releasing and
    taking it again between steps, could keep it while a group waits to be encoded or decoded."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def acquire(self) -> None:
        with self._cond:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            self._cond.wait_for(lambda: self._serving == ticket)

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> TurnLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class VersionGate:
    """Weights change only between groups, on a worker that runs several ``generate`` calls at once.

    A group runs inside :meth:`group` and a weight load inside :meth:`weights`. A load waits until no group is
    running and, while it waits, groups asking for the version the worker holds still enter (a threaded actor may
    start a call after a later one); one asking for a newer version waits for the load (at most
    :data:`NEWER_VERSION_WAIT_S` when none is under way), so it finds its weights. What asks for an older version
    goes on to the worker's own StaleWorkerError, which the scheduler answers by sending the group again.
    """

    def __init__(self, newer_version_wait_s: float = NEWER_VERSION_WAIT_S):
        self.newer_version_wait_s = newer_version_wait_s
        self._cond = threading.Condition()
        self._running = 0  # groups inside group()
        self._loads = 0  # weight loads asked for and not finished
        self._loading = False

    @contextmanager
    def group(self, requested: int, held: Callable[[], int]) -> Iterator[None]:
        """Run a group that asks for policy version ``requested``; ``held()`` is the version the worker holds."""
        deadline = time.monotonic() + self.newer_version_wait_s
        with self._cond:
            while self._loading or (requested > held() and (self._loads or time.monotonic() < deadline)):
                timeout = None if self._loading or self._loads else deadline - time.monotonic()
                self._cond.wait(timeout)
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def weights(self) -> Iterator[None]:
        """Load weights once no group is running; groups wait meanwhile."""
        with self._cond:
            self._loads += 1
            while self._running or self._loading:
                self._cond.wait()
            self._loading = True
        try:
            yield
        finally:
            with self._cond:
                self._loading = False
                self._loads -= 1
                self._cond.notify_all()


class ContinuousRolloutWorker(RolloutWorker):
    """A :class:`RolloutWorker` whose ODE groups share forwards (``rollout.continuous_batching``, module docstring).

    Components: ``batcher`` (:class:`OdeBatcher`, at most ``rollout.micro_batch_size`` rows per forward) and
    ``gate`` (:class:`VersionGate`). Everything else is the plain worker's: only the ODE loop goes through the batcher.
    A group's host work (prompt encoding, noise, decoding) runs in turns with the other groups' and with the
    batching loop's steps (``batcher.turns``): the adapters' tokenizers are not thread-safe (a fast tokenizer's
    padding settings are shared state: two threads at once were seen to get a T5 encoding unpadded).
    """

    def __init__(self, config: Config):
        super().__init__(config)
        if self.spec.record_trajectory:
            raise ValueError(
                f"rollout.continuous_batching batches deterministic ODE rollouts, but algorithm {config.algorithm.name!r} "
                f"records SDE trajectories (sampler {self.spec.sampler!r}): set rollout.continuous_batching: false"
            )
        self.batcher = OdeBatcher(self.model, self.spec.sampler, config.rollout.micro_batch_size, self.device)
        self.gate = VersionGate()
        self._call = threading.local()  # per generate call (one thread each): its seconds off its turn, its loop share

    def generate(self, group: PromptGroup) -> tuple[Rollout, GroupMedia, RolloutInfo]:
        """The plain worker's ``generate``, its denoising in the batching loop. ``RolloutInfo.seconds``: the call's
        latency, waits for the gate and for turns included. ``busy_seconds``: the group's own turns (prompt encoding,
        noise, decoding) plus its rows' share of the loop's steps. Everything on the device runs in turns, one at a
        time, so the busy seconds of a worker's groups add up to its wall time at most (the held-out samples' turns
        and the waits between turns are the rest)."""
        called = time.perf_counter()
        with self.gate.group(group.policy_version, lambda: self.policy_version), self.batcher.turns:
            turn = time.perf_counter()
            self._call.off_turn = self._call.denoising = 0.0
            rollout, media, info = super().generate(group)
            own = time.perf_counter() - turn - self._call.off_turn
        busy = own + self._call.denoising
        return rollout, media, replace(info, seconds=time.perf_counter() - called, busy_seconds=busy)

    def set_weights(self, message: WeightsMessage) -> SyncReport:
        with self.gate.weights():
            return super().set_weights(message)

    def receive_weights(self, policy_version: int, names: list[str]) -> SyncReport:
        with self.gate.weights():
            return super().receive_weights(policy_version, names)

    def sample_held_out(self, request: HeldOutRequest) -> HeldOutSamples:
        with self.gate.group(self.policy_version, lambda: self.policy_version), self.batcher.turns:
            return super().sample_held_out(request)

    def _sample_ode(self, noise: torch.Tensor, sigmas: torch.Tensor, cond: Conditioning):
        """The plain worker's ODE loop, through the batching loop: no trajectory, no log-probs. Called by ``generate``
        in a turn of ``batcher.turns``, given up while this group's members are denoised."""
        self.batcher.turns.release()
        released = time.perf_counter()
        try:
            job = self.batcher.sample(noise, sigmas, cond)
        finally:
            self.batcher.turns.acquire()
            self._call.off_turn += time.perf_counter() - released
        self._call.denoising += job.busy
        return job.final, None, None


def actor_concurrency(config: Config) -> int:
    """Threads of a continuous-batching rollout actor: one per group a full batch can hold (groups of one member at
    the least), one more waiting to be admitted at the next step boundary, and room for the control calls (weights,
    status, the guard's held-out samples) beside them. 1 (the plain, ordered actor) without continuous batching."""
    if not config.rollout.continuous_batching:
        return 1
    return config.rollout.micro_batch_size + 4


__all__ = ["ContinuousRolloutWorker", "OdeBatcher", "OdeJob", "TurnLock", "VersionGate", "actor_concurrency"]
