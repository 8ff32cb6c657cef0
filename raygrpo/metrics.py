"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, plus a short log line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, float]] = []

    def write(self, record: dict[str, float]) -> None:
        self.records.append(record)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        rewards = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in record.items() if k.startswith("reward/") and k.endswith("/mean"))
        logger.info("step %d  %s  loss=%.3g  %.1fs", record["step"], rewards, record.get("learner/loss", float("nan")), record["time/step"])
