"""Live run metrics through Ray's metrics system (``ray.util.metrics``).

Ray exports them in Prometheus format from every node (``ray start --metrics-export-port``), and Ray's
dashboard / Grafana show them while the run goes on; ``metrics.jsonl`` holds the same numbers per
step for after the run. The controller (the driver) records them once per step:

- ``raygrpo_queue_depth``: prompt groups submitted to rollout and not yet trained;
- ``raygrpo_staleness``: policy versions between the sampling weights and the trained weights (mean, max);
- ``raygrpo_idle_fraction``: per role, the share of the step's wall time its actors were not working;
- ``raygrpo_weight_sync_seconds``: learner export + every rollout worker's load;
- ``raygrpo_reward_latency_seconds``: per reward, the time one group took to score (histogram);
- ``raygrpo_actor_restarts``: rollout/reward actors that died and were restarted.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BOUNDARIES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]


class RunTelemetry:
    def __init__(self, run_name: str):
        self.tags = {"run": run_name}
        self.queue_depth = Gauge("raygrpo_queue_depth", "prompt groups in flight (submitted, not yet trained)", tag_keys=("run",))
        self.staleness = Gauge("raygrpo_staleness", "policy versions between sampling and training", tag_keys=("run", "stat"))
        self.idle = Gauge("raygrpo_idle_fraction", "share of the step a role's actors were idle", tag_keys=("run", "role"))
        self.sync_seconds = Gauge("raygrpo_weight_sync_seconds", "seconds of the last weight sync", tag_keys=("run",))
        self.reward_latency = Histogram(
            "raygrpo_reward_latency_seconds", "seconds to score one group", boundaries=_LATENCY_BOUNDARIES, tag_keys=("run", "reward")
        )
        self.restarts = Counter("raygrpo_actor_restarts", "actors restarted after dying", tag_keys=("run", "role"))

    def record_step(self, record: dict[str, float], queue_depth: int, reward_seconds: dict[str, list[float]]) -> None:
        self.queue_depth.set(queue_depth, tags=self.tags)
        for stat in ("mean", "max"):
            if f"staleness/{stat}" in record:
                self.staleness.set(record[f"staleness/{stat}"], tags={**self.tags, "stat": stat})
        for key, value in record.items():
            if key.startswith("idle/"):
                self.idle.set(value, tags={**self.tags, "role": key.removeprefix("idle/")})
        if "time/sync" in record:
            self.sync_seconds.set(record["time/sync"], tags=self.tags)
        for name, seconds in reward_seconds.items():
            for s in seconds:
                self.reward_latency.observe(s, tags={**self.tags, "reward": name})

    def restarted(self, role: str) -> None:
        self.restarts.inc(1, tags={**self.tags, "role": role})
