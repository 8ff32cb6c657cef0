"""RG-LCD, Reward-Guided Latent Consistency Distillation (Li, Feng, Wang, Wang et al., arXiv 2403.11027, TMLR 2024).

Sources: the paper (§3, Algorithm 1; the latent proxy reward model of §3.2) and the released code,
Ji4chenLi/rg-lcd ``train_lcm_distill_sd_wds.py`` (read for facts, diffusers' LCD script extended). Where they
differ the code is followed. Shared machinery (student, teacher, rewards with gradients, LRM): distill.py.

Student and teacher. The student is the trained network (full or LoRA) read as a consistency function in flow
coordinates, ``f_theta(x, sigma) = x - sigma v_theta(x, sigma)`` (LCM's x0-prediction; its c_skip/c_out boundary
scalings are not needed: f(x, 0) = x exactly). The teacher is the frozen start (LoRA switched off, or a frozen
snapshot), with its guidance (``teacher_guidance_scale``: CFG families classifier-free guidance, FLUX the embedded
value). The target network is an EMA of the student (decay ``target_ema_decay``, released 0.95).

Loss (Algorithm 1 with the reward term, per sample; skipping-step k = one step of the teacher's N-level grid, as the
released code's DDIM grid of 50 of 1000 timesteps with k = 20)::

    n ~ U{0..N-1},  sigma_{n+k} = grid[n],  sigma_n = grid[n + 1]          (grid: model.sigma_grid("euler", N), last 0)
    x_{n+k} = (1 - sigma_{n+k}) x0 + sigma_{n+k} eps
    x_n     = x_{n+k} + (sigma_n - sigma_{n+k}) v_teacher(x_{n+k})             (the teacher's DDIM step = Euler in flow coords)
    L       = mean_elements [ sqrt((f_theta(x_{n+k}) - sg f_target(x_n))^2 + c^2) - c ]  -  beta R(f_theta(x_{n+k}), prompt)

with the pseudo-Huber distance (released default, c = 0.001; ``loss_type: l2`` the MSE) and R the reward of the
student's one-step generation. ``reward_source: pixel``: R = sum_k w_k r_k(decode(x0)) through the VAE decoder
(the released ``--direct_optim_expert_reward``); ``latent`` (RG-LCD with LRM, the paper's main variant): R is the
latent reward model's score, and before each student update the LRM takes ``lrm_steps`` steps of::

    L_LRM = mean over pairs i < j of a group  KL( sigmoid((A_i - A_j) / T) || sigmoid(R(x0_i) - R(x0_j)) )

on the rollout samples x0 and their group-normalised pool scores A (the released "distillation" loss: a softmax over
each pair of the expert's logits against the LRM's).

Data. The paper distils on CC12M image latents; here the data are the rollout's samples of the current student
(``consistency`` sampling, ``rollout.num_steps`` 2 or 4), i.e. data-free self-distillation: the teacher's ODE
step defines the target wherever the samples lie. The rollout samples are also what the pools score (metrics,
gallery, the LRM's targets); their advantages are otherwise unused.

Defaults (released script): N 50, pseudo-Huber c 0.001, target EMA 0.95, lr 1e-6 (student), LRM lr 3.3e-6, beta
(``--reward_scale``) 1.0, batch 16 per GPU; teacher SD 2.1 (768 px), HPSv2.1 expert.

Deviations: a fixed teacher guidance (the released student embeds a w ~ U[5, 15] drawn per sample; here the
student has no w-embedding, as LCM-LoRA); the LRM is a small MLP on latent tokens trained from scratch on the
pools' group-normalised scores (released: a latent CLIP initialised from the expert, on raw expert logits of the
student's, the target's and the data's latents); the LRM is fitted before the student's step on this step's
samples (released: after it); rollout and evaluation use the online student (released: both online and target
are saved).

Checkpoints hold everything a resume needs to continue bit-exactly: the student and its AdamW state, the target EMA
(and the frozen teacher of full fine-tuning), the LRM with its AdamW state (distill.py says where each lives on a
multi-rank learner). LoRA: the student is an adapter on the frozen teacher, the target an EMA of the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from raygrpo.algorithms.base import LossTerm, StepDraws, WindowGroup
from raygrpo.algorithms.distill import RewardGradient, StudentAlgorithm, column, fit_weights, noised, seeded_normal, student_x0, teacher_velocities, window_groups
from raygrpo.algorithms.forward_process import base_weights, frozen_snapshot
from raygrpo.config import RGLCDConfig
from raygrpo.contracts import Rollout
from raygrpo.learner.ema import ParameterShadow



def consistency_distance(f: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """Per sample ``mean (sqrt((f - target)^2 + c^2) - c)`` (pseudo-Huber) or ``mean (f - target)^2`` (l2): ``[n]``."""
    diff = f.float() - target.float()  # [n, ...]
    if loss_type == "l2":
        return (diff**2).flatten(1).mean(dim=1)
    return (torch.sqrt(diff**2 + huber_c**2) - huber_c).flatten(1).mean(dim=1)


def teacher_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """The teacher's DDIM step from ``sigma`` to ``sigma_next`` (per sample ``[n]``), Euler in flow coordinates: ``[n, ...]``."""
    return x + column(sigma_next - sigma, x) * v


@dataclass
class LcdDraw:
    """One group's draws: each member's level index n into the teacher grid, and the seed of its noise."""

    levels: np.ndarray  # [members] int64 in 0..N-1
    noise_seed: int


class RGLCD(StudentAlgorithm):
    """The learner half. ``setup`` keeps the frozen teacher, the EMA target and the reward (decoder or LRM)."""

    algo: RGLCDConfig

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        self.model, self.device = model, parameters[0].device
        self.frozen = frozen_snapshot(parameters, lora)  # None with LoRA: the teacher is the adapter switched off
        self.target = ParameterShadow(parameters)
        grid = model.sigma_grid("euler", self.algo.num_ddim_timesteps, self.config.rollout.shift)  # [N+1], last 0
        self.grid = grid.float().to(self.device)
        self.reward = RewardGradient(self.config, model, self.device)

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        levels = rng.integers(self.algo.num_ddim_timesteps, size=(total_groups, members))
        seeds = rng.integers(2**62, size=total_groups)
        return StepDraws([LcdDraw(levels[k], int(seeds[k])) for k in range(total_groups)])

    def loss_terms(self, policy, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """The LRM's steps first (latent source), then the teacher and the target swapped in once each for every
        group, then one term per group: ``sum_i [d_i - beta R_i]``."""
        algo, model = self.algo, self.model
        groups, prompts = window_groups(window, self.device)
        weights = fit_weights(window)  # [groups] padding 0
        lrm_loss = self.reward.fit(groups, weights, algo.lrm_steps)
        index = [torch.as_tensor(wg.draw.levels[wg.rows], device=self.device) for wg in window]  # [n] each
        start = [self.grid[i] for i in index]  # [n] sigma_{n+k}
        end = [self.grid[i + 1] for i in index]  # [n] sigma_n
        eps = [seeded_normal(wg.draw.noise_seed, (len(wg.draw.levels), *g.x0.shape[1:]), self.device)[torch.as_tensor(wg.rows)]
               for wg, g in zip(window, groups)]  # fmt: skip
        x_start = [noised(g.x0, e, s) for g, e, s in zip(groups, eps, start)]  # [n, ...] each
        v_teacher = teacher_velocities(model, base_weights(model, self.frozen), groups, x_start, start, algo.teacher_guidance_scale)
        x_end = [teacher_step(x, v, s, e) for x, v, s, e in zip(x_start, v_teacher, start, end)]  # [n, ...] each
        with torch.no_grad(), self.target.swapped():
            targets = [student_x0(model, x, s, g.cond) for x, s, g in zip(x_end, end, groups)]  # [n, ...] each
        for k, (wg, group) in enumerate(zip(window, groups)):
            f = student_x0(model, x_start[k], start[k], group.cond)  # [n, ...] with gradients
            distance = consistency_distance(f, targets[k], algo.loss_type, algo.huber_c)  # [n]
            reward = self.reward(f, group.cond, prompts[k]) if algo.reward_scale else torch.zeros_like(distance)  # [n]
            extras = {"distill": distance.detach().mean(), "reward_grad_source": reward.detach().mean()}
            if lrm_loss is not None:
                extras["lrm_loss"] = lrm_loss
            yield LossTerm(loss=(distance - algo.reward_scale * reward).sum(), slot=wg.slot, final=k == len(window) - 1, extras=extras)

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
        self.target.update(self.algo.target_ema_decay)

