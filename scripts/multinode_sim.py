"""A simulated multi-node Ray cluster on this one machine: a GPU layout of cluster/*.yaml, run with tiny weights,
with nodes killed and added mid-run.

Several Ray nodes (``ray.cluster_utils.Cluster``: one raylet each, all on 127.0.0.1, in a temp folder of their
own, random ports) declare GPUs they do not have. The run reserves and places those GPUs as it would on a real
cluster; ``run.device_override=cpu`` (test-only) runs the tiny models on the CPU inside the actors that hold them.

    .venv/bin/python scripts/multinode_sim.py                  # flux.yaml's layout on 4 nodes x 8 GPUs (~10 min here)
    .venv/bin/python scripts/multinode_sim.py --nodes 4 --gpus-per-node 2 --set rollout.num_workers=4 ...  # smaller

Node events happen right after a step's groups are submitted, so a node dies with work in flight:
``--kill-rollout-node STEP`` (a node holding only rollout workers), ``--add-node STEP`` (one more node like the
others), ``--kill-learner-node STEP`` (the node of learner rank 0). ``--resume`` then adds a node and runs the
same configuration again, which continues from the checkpoint the lost learner left.

Writes a JSON report (``--out``): the placement per node at the start and the end, one line per step (groups
trained and reissued, rollout workers taking work, seconds), what each event did, how the run ended (for a
lost learner: the message, run_state.json and the checkpoint the same command resumes from), whether every
group was trained exactly once, and the memory of the cluster's processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
# Before Ray is imported (it reads them then): every Ray socket on loopback, no token file under ~/.ray for a
# cluster nobody else can reach, no hub downloads.
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
os.environ.pop("RAY_ADDRESS", None)

from raygrpo.checkpoint import find_resume_point, read_run_state, verify_checkpoint  # noqa: E402
from raygrpo.config import Config, load_config  # noqa: E402
from raygrpo.controller import Controller  # noqa: E402
from raygrpo.data.prompts import load_prompts  # noqa: E402
from raygrpo.errors import RunAborted  # noqa: E402
from raygrpo.net import free_port  # noqa: E402
from raygrpo.run import make_run_dir  # noqa: E402

logger = logging.getLogger("multinode_sim")

# Tiny weights and a CPU-sized problem in the preset's layout: the GPUs, ranks, workers and replicas stay as given.
# One CPU per actor: torch runs as many threads as an actor asks CPUs for, and this machine has two cores for
# them all (the nodes declare plenty, so CPUs never decide where an actor goes, in the preset's layout either).
TINY = [
    "model.pretrained=tiny-random", "model.dtype=float32", "model.height=64", "model.width=64", "model.max_sequence_length=32",
    "model.lora=null", "rollout.num_steps=4", "algorithm.group_size=4", "run.device_override=cpu", "run.resume=never",
    "rollout.num_cpus=1", "learner.num_cpus=1",
    "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.sample_grid_groups=1", "logging.sample_every=0", "logging.tensorboard=false",
]  # fmt: skip
CPU_REWARDS = ["jpeg_compressibility", "brightness"]  # built in, no weights: they stand in for the preset's reward models


class SimCluster:
    """A head (no CPUs or GPUs for actors: the driver's node) and worker nodes declaring ``gpus`` each; labels
    ``node-1``, ``node-2``, ... in the order they joined. Stops every process it started, and nothing else."""

    def __init__(self, nodes: int, gpus: float, cpus: float, object_store_mb: int = 100):
        from ray.cluster_utils import Cluster

        self.gpus, self.cpus = gpus, cpus
        self.temp_dir = tempfile.mkdtemp(prefix="rg-mn-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
        os.makedirs(os.path.join(self.temp_dir, "ray"))
        # Read by its servers, raylets, actors and this driver when they start; restored by shutdown(). RAY_TMPDIR:
        # Ray writes the cluster's address there, this one's, not the machine's shared /tmp/ray. No Ray metrics: with
        # them this driver's ray.shutdown() waited 13-17 s flushing its OpenTelemetry exporter (Ray 2.60, measured
        # here; without: 0.3 s). The simulation checks placement, pools and resumes; the run's Ray metrics are
        # checked on a plain cluster (tests/test_scale_out.py).
        env = {"RAY_TMPDIR": self.temp_dir, "RAY_enable_metrics_collection": "0"}
        self._saved_env = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        self.common = dict(node_ip_address="127.0.0.1", temp_dir=self.temp_dir, object_store_memory=object_store_mb << 20)
        head = dict(num_cpus=0, num_gpus=0, include_dashboard=False, dashboard_port=free_port(), **self.common)
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=head)
            self.labels: dict[str, str] = {self.cluster.head_node.node_id: "head"}
            self.nodes = {}
            for _ in range(nodes):
                self.add_node(wait=False)  # registered all at once below: ~1 s less per node than one by one
            self.cluster.wait_for_nodes()
        except BaseException:
            if getattr(self, "cluster", None) is not None:
                self.cluster.shutdown()
            self._clean_up()
            raise

    def add_node(self, wait: bool = True) -> str:
        """One more node like the others (labelled in the order of these calls); ``wait``: until it has registered."""
        node = self.cluster.add_node(wait=wait, num_cpus=self.cpus, num_gpus=self.gpus, **self.common)
        label = f"node-{len(self.labels)}"
        self.labels[node.node_id], self.nodes[node.node_id] = label, node
        return label

    def remove_node(self, node_id: str) -> str:
        # Its raylet and every process on it: SIGTERM, on which the raylet kills its workers at once (after a
        # SIGKILL they would notice it gone and exit only a moment later, some still finishing a call).
        self.cluster.remove_node(self.nodes.pop(node_id))
        return self.labels[node_id]

    def memory_mb(self) -> float:
        """RSS of every process this script started (Ray's servers, raylets and workers), in MB."""
        total = 0
        for proc in psutil.Process().children(recursive=True):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return round(total / 1e6, 1)

    def shutdown(self) -> None:
        self.cluster.shutdown()
        self._clean_up()

    def _clean_up(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sim_config(preset: str, output_root: Path, steps: int, overrides: list[str]) -> Config:
    """The preset's layout with tiny weights; each reward keeps its name, weight, replicas, CPUs and GPUs."""
    base = load_config(ROOT / preset, [])
    rewards = [f"rewards.{i}.kind={CPU_REWARDS[i % len(CPU_REWARDS)]}" for i in range(len(base.rewards))]
    rewards += [f"rewards.{i}.{key}" for i in range(len(base.rewards)) for key in ("params={}", "num_cpus=1")]
    if base.data.prompt_file and not Path(base.data.prompt_file).is_absolute():
        rewards.append(f"data.prompt_file={ROOT / base.data.prompt_file}")  # presets name it from the checkout
    return load_config(ROOT / preset, [*TINY, *rewards, f"run.output_root={output_root}", f"train.steps={steps}", *overrides])


def placement(controller: Controller, labels: dict[str, str]) -> dict[str, list[str | None]]:
    """Role -> the node label of each of its actors (None: its node died and no node has room for it)."""
    groups = {"rollout": controller.rollout, "learner": controller.learner.ranks} | {f"reward:{k}": g for k, g in controller.rewards.items()}
    return {role: [labels.get(n) if n else None for n in group.bundle_nodes()] for role, group in groups.items()}


class ScenarioController(Controller):
    """The run's controller with node events right after given steps' groups are submitted, and a line per step."""

    def __init__(self, *args, sim: SimCluster, events: dict[int, list[str]], **kwargs):
        super().__init__(*args, **kwargs)
        self.sim, self.events = sim, events
        self.timeline: list[dict] = []
        self.event_log: list[dict] = []
        self.placement_start: dict = {}
        self.placement_end: dict = {}
        self.started = time.monotonic()

    def _start(self) -> None:
        super()._start()
        self.placement_start = placement(self, self.sim.labels)
        self.ready_s = round(time.monotonic() - self.started, 1)
        submit = self.scheduler.submit_through

        def submit_then_act(step: int, version: int) -> None:
            submit(step, version)
            for action in self.events.get(step, []):
                self.event_log.append(self._act(action, step))

        self.scheduler.submit_through = submit_then_act

    def _act(self, action: str, step: int) -> dict:
        where = placement(self, self.sim.labels)
        if action == "add_node":
            return {"step": step, "action": action, "node": self.sim.add_node()}
        if action == "kill_learner_node":
            label = where["learner"][0]
        else:
            # A node whose actors are all rollout workers (killing it tests the pool, nothing else).
            others = {label for role, nodes in where.items() if role != "rollout" for label in nodes}
            candidates = [label for label in where["rollout"] if label and label not in others]
            if not candidates:
                raise RuntimeError(f"no node holds rollout workers only: {where}")
            label = candidates[0]
        node_id = next(n for n, name in self.sim.labels.items() if name == label)
        on_it = {role: [i for i, node in enumerate(nodes) if node == label] for role, nodes in where.items()}
        start = time.monotonic()
        self.sim.remove_node(node_id)
        logger.warning("step %d: killed %s (%s)", step, label, {r: a for r, a in on_it.items() if a})
        return {"step": step, "action": action, "node": label, "actors_on_it": {r: a for r, a in on_it.items() if a}, "kill_s": round(time.monotonic() - start, 2)}

    def step(self, step: int) -> dict[str, float]:
        start = time.monotonic()
        record = super().step(step)
        self.timeline.append({
            "step": step, "seconds": round(time.monotonic() - start, 2), "groups_trained": record["groups/trained"],
            "groups_reissued": record["groups/reissued"], "rollout_pool": self.scheduler.pool_size,
            "rollout_nodes": placement(self, self.sim.labels)["rollout"],
            "policy_version": record["policy_version"], "reward": round(record["reward/total/mean"], 4), "memory_mb": self.sim.memory_mb(),
        })  # fmt: skip
        return record

    def _shutdown(self) -> None:
        if getattr(self, "scheduler", None) is not None:
            self.placement_end = placement(self, self.sim.labels)
        super()._shutdown()


def run_once(config: Config, sim: SimCluster, events: dict[int, list[str]], run_dir: Path | None) -> dict:
    """One run on the cluster (a new one, or ``run_dir``'s continued from its newest checkpoint); its report."""
    import ray

    resume = find_resume_point(config.model_copy(update={"run": config.run.model_copy(update={"resume": str(run_dir)})})) if run_dir else None
    run_dir = run_dir or make_run_dir(config)  # named as the CLI names it: ``run.resume=auto`` finds it
    controller = ScenarioController(config, run_dir, load_prompts(config.data), resume=resume, sim=sim, events=events)
    start = time.monotonic()
    report: dict = {"run_dir": str(run_dir), "resumed_from": str(resume.checkpoint) if resume else None, "cluster_gpus": ray.cluster_resources().get("GPU", 0)}
    try:
        controller.run()
        report["outcome"] = "finished"
    except RunAborted as exc:
        report["outcome"], report["message"] = "aborted", str(exc)
    expected = config.train.steps * config.algorithm.groups_per_step
    ids = controller.trained_group_ids
    report |= {
        "seconds": round(time.monotonic() - start, 1), "workers_ready_s": getattr(controller, "ready_s", None),
        "placement_start": controller.placement_start, "placement_end": controller.placement_end,
        "events": controller.event_log, "steps": controller.timeline,
        "trained_groups": len(ids), "trained_twice": sorted({i for i in ids if ids.count(i) > 1}),
        "every_group_once": sorted(ids) == list(range(len(ids))), "expected_groups": expected,
        "reissued": controller.scheduler.reissued if getattr(controller, "scheduler", None) else None,
        "run_state": read_run_state(run_dir),
    }  # fmt: skip
    return report


def resumable(config: Config, run_dir: Path) -> dict:
    """What the same command would continue from (run.resume=auto), checked as a resume checks it."""
    point = find_resume_point(config.model_copy(update={"run": config.run.model_copy(update={"resume": "auto"})}))
    if point is None or point.run_dir.resolve() != run_dir.resolve():
        return {"checkpoint": None}
    verify_checkpoint(point.checkpoint)
    return {"checkpoint": str(point.checkpoint), "step": point.step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cluster/flux.yaml", help="run config whose layout is simulated")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus-per-node", type=float, default=8)
    parser.add_argument("--cpus-per-node", type=float, default=96, help="CPUs each node declares (8x A100 machines have 96)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-rollout-node", type=int, metavar="STEP")
    parser.add_argument("--add-node", type=int, metavar="STEP")
    parser.add_argument("--kill-learner-node", type=int, metavar="STEP")
    parser.add_argument("--resume", action="store_true", help="after a lost learner: add a node and continue the run to the end")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides after the tiny ones")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "multinode_sim.json")
    parser.add_argument("--output-root", type=Path, help="where the run folders go (default: the cluster's temp folder, removed at the end)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    events: dict[int, list[str]] = {}
    for action in ("kill_rollout_node", "add_node", "kill_learner_node"):
        step = getattr(args, action)
        if step is not None:
            events.setdefault(step, []).append(action)
    import ray

    start = time.monotonic()
    sim = SimCluster(args.nodes, args.gpus_per_node, args.cpus_per_node)
    report: dict = {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "preset": args.preset, "cluster_start_s": round(time.monotonic() - start, 1)}
    try:
        ray.init(address=sim.cluster.address, logging_level=logging.WARNING)
        config = sim_config(args.preset, args.output_root or Path(sim.temp_dir) / "runs", args.steps, args.set)
        report["config"] = {"rollout": config.rollout.num_workers, "rewards": {r.name: r.num_gpus for r in config.rewards}, "learner": config.learner.num_ranks}
        report["run"] = run_once(config, sim, events, None)
        if report["run"]["outcome"] == "aborted":
            report["resumable"] = resumable(config, Path(report["run"]["run_dir"]))
        if args.resume and report.get("resumable", {}).get("checkpoint"):
            report["resume_added_node"] = sim.add_node()
            report["resumed"] = run_once(config, sim, {}, Path(report["run"]["run_dir"]))
        report["memory_mb_end"] = sim.memory_mb()
    finally:
        ray.shutdown()
        sim.shutdown()
    report["total_s"] = round(time.monotonic() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("cluster_start_s", "total_s")} | {"outcome": report["run"]["outcome"], "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
