"""The rollout worker: holds one copy of the generator and samples whole prompt groups.

``generate`` returns three objects (Ray ``num_returns=3``) so each goes only where it is needed:
the :class:`Rollout` (latents, trajectory, log-probs) to the learner, the decoded
:class:`GroupMedia` to the reward pools, and a small :class:`RolloutInfo` to the controller.
"""

from __future__ import annotations

import time
import numpy as np
import torch

from raygrpo.algorithms.dancegrpo import RolloutSpec, rollout_spec
from raygrpo.config import Config
from raygrpo.contracts import GroupMedia, PromptGroup, Rollout, RolloutInfo, WeightsMessage, as_tensor
from raygrpo.models import load_model
from raygrpo.runtime import set_torch_threads, torch_dtype
from raygrpo.sampling import predicted_x0, sigma_schedule, step_transition
from raygrpo.weights import load_weights


class RolloutWorker:
    def __init__(self, config: Config):
        set_torch_threads(config.rollout.num_cpus)
        self.config = config
        self.device = torch.device("cuda" if config.rollout.num_gpus > 0 else "cpu")
        self.spec: RolloutSpec = rollout_spec(config)
        self.model = load_model(
            config.model.family,
            config.model.pretrained,
            torch_dtype=torch_dtype(config.model.dtype),
            device=self.device,
            height=config.model.height,
            width=config.model.width,
            guidance_scale=config.model.guidance_scale,
            max_sequence_length=config.model.max_sequence_length,
        )
        self.model.transformer.eval()
        self.policy_version = 0

    def set_weights(self, message: WeightsMessage) -> int:
        load_weights(self.model.transformer, message)
        self.policy_version = message.policy_version
        return self.policy_version

    @torch.no_grad()
    def generate(self, group: PromptGroup) -> tuple[Rollout, GroupMedia, RolloutInfo]:
        """Sample the G members of one group with the algorithm's sampler, recording what it asks for."""
        if group.policy_version != self.policy_version:
            raise RuntimeError(
                f"group {group.group_id} asks for policy version {group.policy_version}, this rollout worker has {self.policy_version}"
            )
        start = time.perf_counter()
        cond = self.model.encode_prompt(group.prompt)  # cached per prompt text
        prompt_embeds = as_tensor(cond.prompt_embeds, self.device)[None]  # [1, L, Dt]
        pooled = as_tensor(cond.pooled_prompt_embeds, self.device)[None]  # [1, Dp]
        g, num_steps, micro = group.group_size, self.config.rollout.num_steps, self.config.rollout.micro_batch_size
        generator = torch.Generator().manual_seed(group.seed)
        if self.spec.shared_noise:
            x = self.model.initial_noise(generator, 1).expand(g, -1, -1).clone()  # [G, S, D]
        else:
            x = self.model.initial_noise(generator, g)  # [G, S, D]
        sigmas = sigma_schedule(num_steps, self.config.rollout.shift).to(self.device)  # [T+1]
        trajectory = torch.empty((g, num_steps + 1, *x.shape[1:]), dtype=torch.float32)  # [G, T+1, S, D]
        log_probs = torch.empty((g, num_steps), dtype=torch.float32)  # [G, T]
        final = torch.empty_like(x, dtype=torch.float32)  # [G, S, D]
        for lo in range(0, g, micro):
            hi = min(lo + micro, g)
            xb = x[lo:hi].to(self.device, torch.float32)  # [b, S, D]
            trajectory[lo:hi, 0] = xb.cpu()
            for i in range(num_steps):
                v = self.model.velocity(xb, sigmas[i].expand(hi - lo), prompt_embeds.expand(hi - lo, -1, -1), pooled.expand(hi - lo, -1))
                if i == num_steps - 1:
                    # DanceGRPO decodes the last step's clean prediction, not the noisy final state.
                    final[lo:hi] = predicted_x0(xb, v, sigmas[i]).cpu()
                step = step_transition(self.spec.sampler, self.spec.noise_level, xb, v, sigmas, i)
                x_next = step.sample(generator)
                log_probs[lo:hi, i] = step.log_prob(x_next).cpu() if self.spec.record_trajectory else 0.0
                trajectory[lo:hi, i + 1] = x_next.cpu()
                xb = x_next
        images = self.model.decode(final.to(self.device))  # [G, H, W, 3] uint8
        rollout = Rollout(
            group=group,
            policy_version=self.policy_version,
            conditioning=cond,
            sigmas=sigmas.cpu().numpy(),
            final_latents=final.numpy(),
            trajectory=trajectory.numpy() if self.spec.record_trajectory else None,
            log_probs=log_probs.numpy() if self.spec.record_trajectory else None,
        )
        info = RolloutInfo(group.group_id, self.policy_version, time.perf_counter() - start, rollout.nbytes)
        return rollout, GroupMedia(group=group, images=np.ascontiguousarray(images)), info
