"""The learner: owns the trainable network and its optimizer, runs the algorithm's update.

One rank for now (the multi-rank FSDP2 group builds on this class). Runs as a Ray actor, or in
process for tests (``Learner(config)``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import ray
import torch

from raygrpo.algorithms.dancegrpo import DanceGRPO
from raygrpo.config import Config
from raygrpo.contracts import LearnerMetrics, Rollout, TrainGroup, WeightsMessage
from raygrpo.models import load_model
from raygrpo.runtime import set_torch_threads, torch_dtype
from raygrpo.weights import export_weights

logger = logging.getLogger(__name__)


class Learner:
    def __init__(self, config: Config):
        set_torch_threads(config.learner.num_cpus)
        self.config = config
        self.device = torch.device("cuda" if config.learner.num_gpus > 0 else "cpu")
        self.model = load_model(
            config.model.family,
            config.model.pretrained,
            torch_dtype=torch_dtype(config.model.dtype),
            device=self.device,
            load_text_encoders=False,
            load_vae=False,
            height=config.model.height,
            width=config.model.width,
            guidance_scale=config.model.guidance_scale,
            max_sequence_length=config.model.max_sequence_length,
        )
        network = self.model.transformer
        network.train()
        network.requires_grad_(True)
        self.parameters = [p for p in network.parameters() if p.requires_grad]
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(self.parameters, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        self.algorithm = DanceGRPO(config)
        self.rng = np.random.default_rng(config.run.seed + 1)
        self.policy_version = 0

    def update(self, batch: list[TrainGroup]) -> LearnerMetrics:
        """One training step on whole groups; the rollouts are fetched here, never on the controller."""
        rollouts: list[Rollout] = ray.get([group.rollout for group in batch]) if batch else []
        self.policy_version += 1
        return self.algorithm.update(
            self.model, self.parameters, self.optimizer, list(zip(batch, rollouts)), self.rng, self.policy_version
        )

    def export_weights(self) -> WeightsMessage:
        return export_weights(self.model.transformer, self.policy_version)

    def save(self, folder: str) -> str:
        """Write the trained network with ``save_pretrained`` (loadable as the pipeline's transformer)."""
        folder_path = Path(folder)
        self.model.transformer.save_pretrained(folder_path / "transformer")
        state = {"policy_version": self.policy_version, "pretrained": self.config.model.pretrained}
        (folder_path / "raygrpo_state.json").write_text(json.dumps(state, indent=2))
        return str(folder_path)
