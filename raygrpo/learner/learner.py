"""The learner: owns the trainable network (full, or a LoRA adapter) and its optimizer, runs the algorithm's update.

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

from raygrpo.algorithms import make_algorithm
from raygrpo.config import Config
from raygrpo.contracts import LearnerMetrics, Rollout, TrainGroup, WeightsMessage
from raygrpo.models import load_model
from raygrpo.models.lora import add_lora
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
            # Training may see the policy without CFG (DGPO on SD3) while rollout uses it.
            guidance_scale=config.model.train_guidance_scale if config.model.train_guidance_scale is not None else config.model.guidance_scale,
            max_sequence_length=config.model.max_sequence_length,
        )
        network = self.model.transformer
        network.train()
        if config.model.lora is not None:
            self.parameters = add_lora(network, config.model.lora)
        else:
            network.requires_grad_(True)
            self.parameters = [p for p in network.parameters() if p.requires_grad]
        # With LoRA only the adapter travels to the rollout side; full fine-tuning sends everything.
        self.synced_names = {n for n, p in network.named_parameters() if p.requires_grad} if config.model.lora else None
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(self.parameters, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        self.algorithm = make_algorithm(config)
        self.algorithm.setup(self.model, self.parameters, lora=config.model.lora is not None)
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
        """The weights rollout should sample with (DGPO: the fast EMA after its switch step)."""
        with self.algorithm.sampling_weights():
            return export_weights(self.model.transformer, self.policy_version, self.synced_names)

    def save(self, folder: str) -> str:
        """Write the evaluation weights (DGPO: the slow EMA) loadable by diffusers.

        Full fine-tuning: ``transformer/`` via ``save_pretrained``. LoRA: ``transformer_lora/`` via
        ``save_lora_adapter`` (the base stays the pretrained one).
        """
        folder_path = Path(folder)
        with self.algorithm.evaluation_weights():
            if self.config.model.lora is not None:
                self.model.transformer.save_lora_adapter(folder_path / "transformer_lora")
            else:
                self.model.transformer.save_pretrained(folder_path / "transformer")
        state = {"policy_version": self.policy_version, "pretrained": self.config.model.pretrained, "algorithm": self.config.algorithm.name}
        (folder_path / "raygrpo_state.json").write_text(json.dumps(state, indent=2))
        return str(folder_path)
