"""Live run metrics through Ray's metrics system (``ray.util.metrics``).

Ray exports them in Prometheus format from every node (``ray start --metrics-export-port``), and Ray's
dashboard / Grafana show them while the run goes on; ``metrics.jsonl`` holds the same numbers per
step for after the run. The controller (the driver) records them once per step:

- ``raygrpo_queue_depth``: prompt groups submitted to rollout and not yet trained;
- ``raygrpo_staleness``: policy versions between the sampling weights and the trained weights (mean, max);
- ``raygrpo_idle_fraction``: per role, the share of the step's wall time its actors were not working;
- ``raygrpo_weight_sync_seconds``: learner export + the slowest rollout worker's load (not time queued behind generation);
- ``raygrpo_reward_latency_seconds``: per reward, the time one group took to score (histogram);
- ``raygrpo_actor_restarts`` (Prometheus: ``ray_raygrpo_actor_restarts_total``): rollout/reward actors that died
  and were restarted.

Ray 2.60's metrics agent drops a gauge value that was not set again within two export intervals
(20 s by default), and a real step takes minutes: the gauges would vanish from Prometheus between
steps. So the last values are set again every few seconds by a daemon thread until :meth:`close`.
"""

from __future__ import annotations

import threading

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_BOUNDARIES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
REFRESH_S = 5.0  # below Ray's gauge time-to-live (2 x metrics_report_interval_ms, at least 2 s)


class RunTelemetry:
    def __init__(self, run_name: str, refresh_s: float = REFRESH_S):
        self.tags = {"run": run_name}
        self.queue_depth = Gauge("raygrpo_queue_depth", "prompt groups in flight (submitted, not yet trained)", tag_keys=("run",))
        self.staleness = Gauge("raygrpo_staleness", "policy versions between sampling and training", tag_keys=("run", "stat"))
        self.idle = Gauge("raygrpo_idle_fraction", "share of the step a role's actors were idle", tag_keys=("run", "role"))
        self.sync_seconds = Gauge("raygrpo_weight_sync_seconds", "seconds of the last weight sync", tag_keys=("run",))
        self.reward_latency = Histogram(
            "raygrpo_reward_latency_seconds", "seconds to score one group", boundaries=_LATENCY_BOUNDARIES, tag_keys=("run", "reward")
        )
        self.restarts = Counter("raygrpo_actor_restarts", "actors restarted after dying", tag_keys=("run", "role"))
        self._last: dict[tuple[str, tuple], tuple[Gauge, float, dict]] = {}  # (gauge, tags) -> the last value set
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, args=(refresh_s,), name="raygrpo-telemetry", daemon=True)
        self._refresher.start()

    def _set(self, gauge: Gauge, value: float, tags: dict) -> None:
        gauge.set(value, tags=tags)
        with self._lock:
            self._last[(gauge.info["name"], tuple(sorted(tags.items())))] = (gauge, value, tags)

    def _refresh(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            with self._lock:
                last = list(self._last.values())
            for gauge, value, tags in last:
                gauge.set(value, tags=tags)

    def record_step(self, record: dict[str, float], queue_depth: int, reward_seconds: dict[str, list[float]]) -> None:
        self._set(self.queue_depth, queue_depth, self.tags)
        for stat in ("mean", "max"):
            if f"staleness/{stat}" in record:
                self._set(self.staleness, record[f"staleness/{stat}"], {**self.tags, "stat": stat})
        for key, value in record.items():
            if key.startswith("idle/"):
                self._set(self.idle, value, {**self.tags, "role": key.removeprefix("idle/")})
        if "time/sync" in record:
            self._set(self.sync_seconds, record["time/sync"], self.tags)
        for name, seconds in reward_seconds.items():
            for s in seconds:
                self.reward_latency.observe(s, tags={**self.tags, "reward": name})

    def restarted(self, role: str) -> None:
        self.restarts.inc(1, tags={**self.tags, "role": role})

    def close(self) -> None:
        """Stop refreshing the gauges (they age out of Prometheus as a finished run's should)."""
        self._stop.set()
        self._refresher.join(timeout=5)


class NullTelemetry:
    """The telemetry of an in-process run (``run.in_process``): no Ray, no Prometheus; metrics.jsonl has it all."""

    def record_step(self, record: dict[str, float], queue_depth: int, reward_seconds: dict[str, list[float]]) -> None:
        pass

    def restarted(self, role: str) -> None:
        pass

    def close(self) -> None:
        pass
