"""The elastic rollout pool (issue #17 item 2): the autoscale policy on hand-made histories, the signed command
file, the scheduler growing and draining a pool of stand-in workers, a whole run resized in process (equal to a
fixed pool's run), a resume on another pool size, and a run on Ray grown 1 -> 3 -> 2 while it goes on."""

from __future__ import annotations

import json
import time

import pytest
import ray

from raygrpo.actor_group import LocalGroup
from raygrpo.config import AutoscaleConfig, ConfigError, load_config
from raygrpo.contracts import PromptGroup
from raygrpo.controller import Controller
from raygrpo.placement import RoleResources
from raygrpo.pool import main as pool_cli
from raygrpo.ray_metrics import NullTelemetry
from raygrpo.rollout.autoscale import AutoscalePolicy, PoolSample
from raygrpo.rollout.control import CommandReader, PoolCommand, read_status, sign, write_command
from raygrpo.rollout.scheduler import RolloutScheduler

from .conftest import ROOT
from .test_multinode import Reward, WeightSync
from .test_multinode import Worker as NodeWorker

# ----- the policy -----

SCALE = AutoscaleConfig(min=1, max=4, window=2, grow_wait=0.3, shrink_idle=0.75)
BUSY = PoolSample(pool_size=2, queue_depth=4, idle=0.1, wait=0.6)  # groups wait, the driver waits for generation
IDLE = PoolSample(pool_size=2, queue_depth=2, idle=0.9, wait=0.05)  # every group had a worker, workers mostly idle
MIDDLE = PoolSample(pool_size=2, queue_depth=4, idle=0.5, wait=0.1)  # groups queue but generation overlaps training


@pytest.mark.parametrize(
    ("history", "target", "expected"),
    [
        ([BUSY], 2, 2),  # one step is not a trend (window 2)
        ([BUSY, BUSY], 2, 3),
        ([IDLE, BUSY, BUSY], 2, 3),  # only the last window counts
        ([BUSY, BUSY], 4, 4),  # at max
        ([IDLE, IDLE], 2, 1),
        ([IDLE, IDLE], 1, 1),  # at min
        ([BUSY, IDLE], 2, 2),  # mixed: hold
        ([MIDDLE, MIDDLE], 2, 2),  # the gap between the rules: hold
        ([BUSY, BUSY], 3, 3),  # a worker of the 3 aimed at is still starting: judge nothing yet
        ([BUSY, BUSY], 6, 4),  # outside min..max: clamped at once
    ],
)
def test_the_autoscale_policy_grows_when_groups_wait_shrinks_when_workers_idle_and_holds_otherwise(history, target, expected):
    decision = AutoscalePolicy(SCALE).decide(history, target)
    assert decision.target == expected
    assert bool(decision.reason) == (expected != target)


def test_pool_samples_come_from_the_step_record():
    record = {"time/generate": 3.0, "time/step": 4.0, "queue/groups_in_flight": 5.0, "idle/rollout": 0.2}
    assert PoolSample.of(record, pool_size=2) == PoolSample(2, 5, 0.2, 0.75)


def test_autoscale_bounds_are_checked_before_anything_starts():
    tiny = ROOT / "cluster" / "tiny.yaml"
    with pytest.raises(ConfigError, match="min=3 is above max=2"):
        load_config(tiny, ["rollout.autoscale={min: 3, max: 2}"])
    with pytest.raises(ConfigError, match="num_workers=1 .* must lie in autoscale min..max = 2..3"):
        load_config(tiny, ["rollout.autoscale={min: 2, max: 3}"])
    with pytest.raises(ConfigError, match="autoscale.auto=false"):
        load_config(tiny, ["rollout.autoscale={min: 1, max: 3}", "run.in_process=true"])
    load_config(tiny, ["rollout.autoscale={min: 1, max: 3, auto: false}", "run.in_process=true"])


# ----- the command file -----


def test_a_signed_command_is_read_once_and_unsigned_or_forged_ones_are_refused(tmp_path, monkeypatch):
    reader = CommandReader(tmp_path, token="s3cret")
    assert reader.poll() is None  # no file yet
    command = write_command(tmp_path, 3, token="s3cret")
    assert reader.poll() == command and reader.poll() is None  # once
    write_command(tmp_path, 4)  # unsigned
    assert reader.poll() is None and reader.outcome["outcome"].startswith("refused: unsigned or wrongly signed")
    forged = write_command(tmp_path, 5, token="guess")
    assert reader.poll() is None and reader.outcome["workers"] == 5 and "refused" in reader.outcome["outcome"]
    # Tampering with a signed command's size breaks its signature.
    tampered = forged.model_copy(update={"workers": 2, "signature": sign(forged, "s3cret")}).model_dump() | {"workers": 1}
    (tmp_path / "pool-command.json").write_text(json.dumps(tampered))
    assert reader.poll() is None and "refused" in reader.outcome["outcome"]
    # A command older than the driver (a resumed run meeting an old file) is ignored: the resumed config wins.
    later = CommandReader(tmp_path, token=None)
    stale = PoolCommand(workers=2, issued_at=later.started - 60, nonce="old-command")
    (tmp_path / "pool-command.json").write_text(stale.model_dump_json())
    assert later.poll() is None and later.outcome["outcome"].startswith("ignored")


def test_the_pool_cli_writes_a_signed_command_and_reports_the_outcome(tmp_path, monkeypatch, capsys):
    assert pool_cli([str(tmp_path), "--workers", "2"]) == 2  # not a run folder
    (tmp_path / "run_state.json").write_text("{}")
    monkeypatch.setenv("POOL_TOKEN", "s3cret")
    reader = CommandReader(tmp_path, token="s3cret")
    assert pool_cli([str(tmp_path), "--workers", "2", "--token-env", "POOL_TOKEN"]) == 0
    assert reader.poll().workers == 2
    with pytest.raises(SystemExit):
        pool_cli([str(tmp_path), "--workers", "2", "--token-env", "UNSET_POOL_TOKEN"])  # names what is missing
    assert "UNSET_POOL_TOKEN" in capsys.readouterr().err


# ----- the scheduler with stand-in workers -----


class Worker(NodeWorker):
    """Also records the groups it got; built like a rollout worker (the scheduler starts added ones with the config)."""

    def __init__(self, config=None):
        super().__init__(0)
        self.groups: list[int] = []

    def generate(self, group: PromptGroup):
        self.groups.append(group.group_id)
        return super().generate(group)


class SlowStartGroup(LocalGroup):
    """Added workers start only when the test says so (their bundle waits for a node until then)."""

    def __init__(self, count: int):
        super().__init__(Worker, RoleResources("rollout", count, 1, 0), [()] * count)
        self.up: set[int] = set(range(count))
        self.removed: list[int] = []

    def started(self, index: int) -> bool:
        return index in self.up

    def remove_worker(self, index: int) -> None:
        self.removed.append(index)
        super().remove_worker(index)


def elastic_scheduler(workers: int, staleness: int = 0):
    config = load_config(
        ROOT / "cluster" / "tiny.yaml",
        ["rewards=[{name: r, kind: brightness}]", "algorithm.group_size=2", "algorithm.groups_per_step=3",
         f"train.max_staleness={staleness}", f"rollout.num_workers={workers}", "rollout.autoscale={min: 1, max: 4, auto: false}"],
    )  # fmt: skip
    rollout = SlowStartGroup(workers)
    sync = WeightSync(rollout)
    rewards = {"r": LocalGroup(Reward, RoleResources("reward:r", 1, 1, 0), [()])}
    return RolloutScheduler(config, list(config.data.prompts), None, rollout, rewards, sync, NullTelemetry()), rollout, sync


def run_step(scheduler, step: int, version: int) -> list[int]:
    scheduler.submit_through(step, version)
    return [g.group.group_id for g in scheduler.wait_scored(scheduler.wait_generated(step, version), version)]


def test_added_workers_wait_pending_without_holding_the_run_and_get_the_weights_before_any_group():
    scheduler, rollout, sync = elastic_scheduler(1)
    scheduler.resize(3)
    assert run_step(scheduler, 1, version=0) == [0, 1, 2]  # the run goes on while workers 1 and 2 start
    assert scheduler.pending == {1, 2} and scheduler.pool_size == 1 and rollout.actors[0].groups == [0, 1, 2]
    rollout.actors[0].version = 1  # the sync after update 1
    rollout.up.add(2)  # worker 2's bundle found a node
    assert run_step(scheduler, 2, version=1) == [3, 4, 5]
    assert sync.pushed == [(2, 1)] and scheduler.pending == {1}  # the current version before its first group
    assert rollout.actors[2].groups and rollout.actors[1].groups == []  # the started one takes work, the pending one none
    assert sorted(rollout.actors[0].groups[3:] + rollout.actors[2].groups) == [3, 4, 5]
    assert scheduler.joined == 1 and scheduler.pool_size == 2


def test_a_drained_worker_finishes_its_queued_groups_then_leaves_and_a_pending_one_goes_first():
    scheduler, rollout, _ = elastic_scheduler(3, staleness=1)
    scheduler.submit_through(1, version=0)  # steps 1 and 2 queued, over workers 0, 1, 2
    step2_on_2 = [w.group.group_id for w in scheduler.queue[2] if w.worker == 2]
    scheduler.resize(4)
    scheduler.refresh_pool(version=0)
    assert scheduler.pending == {3}  # still starting ...
    scheduler.resize(2)
    scheduler.refresh_pool(version=0)  # ... so it goes first, then the newest worker that holds work drains
    assert rollout.removed == [3] and scheduler.draining == {2} and scheduler.left == 0 and scheduler.pool_size == 2
    scheduler.resize(1)  # worker 1 drains too
    assert [g.group.group_id for g in scheduler.wait_scored(scheduler.wait_generated(1, 0), 0)] == [0, 1, 2]
    scheduler.submit_through(2, version=0)  # step 3's groups go to worker 0 only; 1 and 2 still hold step 2's
    assert scheduler.draining == {1, 2} and {w.worker for w in scheduler.queue[3]} == {0}
    assert [g.group.group_id for g in scheduler.wait_scored(scheduler.wait_generated(2, 0), 0)] == [3, 4, 5]
    assert step2_on_2 and set(step2_on_2) <= set(rollout.actors[2].groups)  # generated where it was sent, once
    scheduler.refresh_pool(version=0)  # nothing of theirs is queued any more: stopped
    assert sorted(rollout.removed[1:]) == [1, 2] and scheduler.retired == {1, 2, 3} and scheduler.left == 2
    assert scheduler.pool_size == 1 and rollout.bundle_nodes()[1:] == [None, None, None]


def test_a_worker_removed_while_out_of_the_pool_has_its_groups_generated_again_exactly_once():
    scheduler, rollout, _ = elastic_scheduler(2)
    scheduler.submit_through(1, version=0)
    lost = [w.group.group_id for w in scheduler.queue[1] if w.worker == 1]
    scheduler.down.add(1)  # its node died before it generated anything
    scheduler.resize(1)
    scheduler.refresh_pool(version=0)
    assert scheduler.retired == {1} and scheduler.down == set()
    groups = scheduler.wait_scored(scheduler.wait_generated(1, 0), 0)
    assert [g.group.group_id for g in groups] == [0, 1, 2] and scheduler.reissued == len(lost) == 1
    assert sorted(rollout.actors[0].groups) == [0, 1, 2]


# ----- whole runs -----


def tiny_config(tmp_path, *overrides):
    return load_config(
        ROOT / "cluster" / "tiny.yaml",
        [f"run.output_root={tmp_path}", "algorithm.group_size=4", "algorithm.groups_per_step=2", "algorithm.grad_accum_samples=8",
         "rollout.num_steps=4", "train.sample_grid_groups=1", *overrides],
    )  # fmt: skip


class CommandedController(Controller):
    """Writes pool commands (through the CLI's own function) while the given steps run: the driver reads them at
    the step's end, and the pool changes from the next step on."""

    commands: dict[int, int] = {}

    def step(self, step: int) -> dict[str, float]:
        if step in self.commands:
            write_command(self.run_dir, self.commands[step])
        return super().step(step)


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "idle/", "rollout/")) and not k.endswith("seconds")} for r in records]


@pytest.mark.slow
def test_a_run_resized_in_process_equals_the_same_run_on_a_fixed_pool(tmp_path):
    """In process every worker starts at once: 1 -> 3 asked in step 1, 3 -> 2 in step 2; the learning is the same."""
    fixed_config = tiny_config(tmp_path / "fixed", "train.steps=4", "run.in_process=true")
    fixed = Controller(fixed_config, tmp_path / "fixed" / "run", list(fixed_config.data.prompts))
    fixed.run()
    config = tiny_config(tmp_path / "elastic", "train.steps=4", "run.in_process=true", "rollout.autoscale={min: 1, max: 3, auto: false}")
    elastic = CommandedController(config, tmp_path / "elastic" / "run", list(config.data.prompts))
    elastic.commands = {1: 3, 2: 2}
    elastic.run()
    records = elastic.metrics.records
    assert [r["rollout/pool_size"] for r in records] == [1, 3, 2, 2]
    assert [r["rollout/joined"] for r in records] == [0, 2, 0, 0] and [r["rollout/left"] for r in records] == [0, 0, 1, 0]
    assert [r["rollout/resized"] for r in records] == [1, 1, 0, 0]
    assert sorted(elastic.trained_group_ids) == list(range(8))
    assert comparable(records) == comparable(fixed.metrics.records)
    status = read_status(elastic.run_dir)
    assert status["pool_size"] == 2 and status["last_command"]["outcome"] == "applied: target 2"


@pytest.mark.slow
def test_a_fixed_pool_refuses_a_resize_command_and_says_how(tmp_path):
    config = tiny_config(tmp_path, "train.steps=2", "run.in_process=true")
    controller = CommandedController(config, tmp_path / "run", list(config.data.prompts))
    controller.commands = {1: 2}
    controller.run()
    assert [r["rollout/pool_size"] for r in controller.metrics.records] == [1, 1]
    assert "refused: this run's rollout pool is fixed" in read_status(controller.run_dir)["last_command"]["outcome"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [3])
def test_a_checkpoint_of_a_two_worker_run_resumes_on_another_pool_size_and_ends_the_same(tmp_path, workers):
    """Steps 2-3 again from the step-1 checkpoint of a 2-worker run, on ``workers`` workers: the same steps."""
    from raygrpo.checkpoint import find_resume_point

    first = tiny_config(tmp_path, "train.steps=3", "train.checkpoint_every=1", "rollout.num_workers=2", "run.in_process=true")
    reference = Controller(first, tmp_path / "run", list(first.data.prompts))
    reference.run()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    again = tiny_config(tmp_path, "train.steps=3", f"rollout.num_workers={workers}", "run.in_process=true", f"run.resume={checkpoint}")
    resume = find_resume_point(again)
    assert resume is not None and resume.step == 1
    resumed = Controller(again, resume.run_dir, list(again.data.prompts), resume=resume)
    resumed.run()
    assert sorted(resumed.trained_group_ids) == list(range(6)) and len(resumed.scheduler.incarnations) == workers
    assert comparable(resumed.metrics.records) == comparable(reference.metrics.records)


@pytest.fixture(scope="module")
def ray_driver(ray_cluster):
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    yield
    ray.shutdown()


class WaitingController(CommandedController):
    """Also holds after the step given in ``wait_for_pool`` until every worker started has joined (Ray starts them
    in their own time; the test wants the pool of 3 to take work before it shrinks it)."""

    wait_for_pool: int = 0
    queued: dict[int, list[int]] = {}  # step -> the workers holding its groups when it began

    def step(self, step: int) -> dict[str, float]:
        self.queued[step] = [work.worker for work in self.scheduler.queue.get(step, [])]
        return super().step(step)

    def _run_step(self, step: int) -> None:
        super()._run_step(step)
        if step == self.wait_for_pool:
            deadline = time.monotonic() + 60
            self.scheduler.refresh_pool(self.learner.policy_version)  # starts them (the command came after the step)
            while self.scheduler.pending and time.monotonic() < deadline:
                time.sleep(0.1)
                self.scheduler.refresh_pool(self.learner.policy_version)


@pytest.mark.slow
def test_a_pool_grown_1_3_2_on_ray_trains_every_group_once_and_shows_the_resize(ray_driver, tmp_path):
    """Ray workers in placement groups of their own: 1 -> 3 asked in step 1 (they join when up, with the current
    weights), 3 -> 2 in step 2 (the newest drains: its queued group of step 3 is generated there, then it stops);
    step 4 runs on the pool of 2."""
    config = tiny_config(
        tmp_path, "train.steps=4", "train.max_staleness=1", "rollout.num_cpus=0.25", "rollout.autoscale={min: 1, max: 3, auto: false}",
    )  # fmt: skip
    controller = WaitingController(config, tmp_path / "run", list(config.data.prompts))
    controller.commands, controller.wait_for_pool, controller.queued = {1: 3, 2: 2}, 1, {}
    controller.run()
    records = controller.metrics.records
    assert sorted(controller.trained_group_ids) == list(range(8)), "every group trained exactly once"
    assert [r["rollout/pool_size"] for r in records] == [1, 3, 2, 2]
    assert [r["rollout/pool_target"] for r in records] == [3, 2, 2, 2]
    assert sum(r["rollout/joined"] for r in records) == 2 and sum(r["rollout/left"] for r in records) == 1
    assert all(r["staleness/max"] <= 1 for r in records) and [r["policy_version"] for r in records] == [1, 2, 3, 4]
    assert 2 in controller.queued[3] and controller.scheduler.retired == {2}  # it left with work queued, and finished it
    assert [r["rollout/left"] for r in records] == [0, 0, 1, 0]
