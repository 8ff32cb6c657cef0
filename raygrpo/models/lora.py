"""LoRA adapters on a diffusers network (peft through diffusers' ``add_adapter``)."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig

from raygrpo.config import LoraConfig


def add_lora(network: torch.nn.Module, lora: LoraConfig) -> list[torch.nn.Parameter]:
    """Attach an adapter (base weights stay frozen) and return its trainable parameters.

    Rollout workers attach the same adapter so the learner can send the adapter's tensors alone.
    """
    network.requires_grad_(False)
    init = "gaussian" if lora.init == "gaussian" else True
    network.add_adapter(PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights=init, target_modules=lora.target_modules))
    parameters = [p for p in network.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"model.lora.target_modules {lora.target_modules} matched no layer of {type(network).__name__}")
    return parameters
