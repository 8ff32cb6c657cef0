"""Diffusion-DPO (Wallace et al., arXiv 2311.12908, CVPR 2024) and DCPO, Dual Caption Preference Optimization
(Saeidi, Luo et al., arXiv 2502.06023, TMLR 2025): offline preference optimisation on pairs, one code path.

Sources: the papers (Diffusion-DPO eq. 14; DCPO §3, eq. 6 and Figure 2) and the released Diffusion-DPO code
(SalesforceAIResearch/DiffusionDPO ``train.py``, ``launchers/sd15.sh``; read for facts). Where paper and code differ
the code is followed. No DCPO training code was found to check; DCPO's recipe numbers below are Diffusion-DPO's.

Data (raygrpo/data/preferences.py): pairs (prompt c, preferred image x^w, rejected image x^l) and, for DCPO, a
caption per image, z^w and z^l. Diffusion-DPO trains both images with the prompt (z^w = z^l = c); DCPO gives each image
its own caption, from a captioner (DCPO-c: z^w, z^l), by perturbing the prompt (DCPO-p: c, perturbed c) or both
(DCPO-h: z^w, perturbed z^l), ``algorithm.captions``. The rollout role VAE-encodes both images and both captions
(raygrpo/rollout/preference.py, the learner holds no VAE or text encoder) and ships them with the group.

Loss, per pair, at one noise level t shared by both images with one noise eps shared by both (the released code
draws t and eps per pair and repeats them for x^l)::

    x_t^*  = (1 - sigma_t) x0^* + sigma_t eps                                  * in {w, l}, flow coordinates
    l^*    = w(sigma_t) mean_elements (v* - v_theta(x_t^*, t, z^*))^2,          v* = eps - x0^*
    l_ref* = the same with the frozen reference v_ref
    L      = -log sigmoid( -beta / 2 [ (l^w - l_ref^w) - (l^l - l_ref^l) ] )

``loss_space`` picks w: ``epsilon``, w = (1 - sigma)^2, which makes l exactly the paper's ||eps - eps_theta(x_t)||^2
(in flow coordinates eps_theta - eps = (1 - sigma)(v_theta - v*)), the form for epsilon/VP models (family ``sd``,
SD 1.5/2.1, whose adapter works in flow coordinates); ``velocity``, w = 1, the flow-matching form for flow families
(FLUX, SD3): the same objective with the rectified-flow denoising loss in place of the epsilon loss, as the released
code's flow ports do. ``auto`` picks epsilon for ``sd`` and velocity otherwise. The paper's T w(t) factor and the
code's 1/2 are constants absorbed in beta; this file keeps the code's beta/2 so the released beta (5000) means the same.

Noise levels: sigma_t uniform over ``train_timesteps`` levels of the model's own grid (``sigma_grid("euler", 1000)``
minus its final 0): for ``sd`` the 1000 DDPM timesteps, so t ~ U{0..999} as released; for flow families the shifted
linear grid (``rollout.shift``). Reference: the frozen base (LoRA disabled, or a frozen snapshot of the starting
weights for full fine-tuning), as forward_process.py provides it. At the start policy = reference, so L = log 2.

Defaults (released ``launchers/sd15.sh``): beta 5000, effective batch 2048 pairs (``groups_per_step``), lr 1e-8 x
2048 (``--scale_lr``) = 2.048e-5 with 500 warm-up steps, 2000 steps, AdamW. DCPO fine-tunes SD 2.1 on 20,000 pairs of
Pick-Double Caption (its paper); its other settings we could not verify, so cluster/sd15_dcpo.yaml uses these.

How it sits on the online machinery (the protocol extension, base.py): each prompt group is one pair (the group's
``prompt_id`` indexes the data file) plus ``group_size`` evaluation samples of the current policy, which the rewards
score for the metrics and the gallery; advantages are computed and ignored. Each pair's term is its loss times the
group's trained-member count, so the learner's division by samples gives the mean over pairs.

Evaluation (:func:`evaluates`): sampling G images per pair costs far more than the loss at real size (2048 pairs a
step). ``algorithm.eval_groups`` = k lets only the step's first k pairs sample, on every ``eval_every``-th step (and
steps 1 and last); the other pairs are only encoded (raygrpo/rollout/preference.py), their members are placeholders,
and the rewards answer them with ``Scores.not_evaluated``: no reward metric, gallery or ``samples/generated`` counts
them; ``groups/not_evaluated`` says how many there were. The loss is the same whichever pairs are evaluated.

Deviations: no learning-rate warm-up (the learner has none); the VAE latent is sampled with the group's seed (the
released code samples it unseeded); one optimizer step per training step over ``groups_per_step`` pairs (set it to the
effective batch; the learner accumulates one backward per pair).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from raygrpo.algorithms.base import LossTerm, RolloutSpec, StepDraws, WindowGroup
from raygrpo.algorithms.dgpo import denoising_loss
from raygrpo.algorithms.forward_process import GroupTensors, base_weights, frozen_snapshot, velocities, velocity
from raygrpo.config import VP_FAMILIES, Config, DiffusionDPOConfig
from raygrpo.contracts import ConditioningBatch, PromptGroup, Rollout


def evaluates(group: PromptGroup, algo: DiffusionDPOConfig, steps: int) -> bool:
    """Whether the pair of ``group`` also samples evaluation images: on step 1, the last step and every ``eval_every``-th,
    its first ``eval_groups`` pairs (all when None). The scheduler numbers groups step by step (``group_id = (step - 1)
    x groups_per_step + k``, restored on resume), so every worker decides the same from the group alone."""
    step, k = divmod(group.group_id, algo.groups_per_step)
    step += 1
    on_step = step in (1, steps) or (step - 1) % algo.eval_every == 0
    return on_step and (algo.eval_groups is None or k < algo.eval_groups)


def rollout_spec(config: Config) -> RolloutSpec:
    """The evaluation samples: deterministic ODE, final latents only (the loss never reads them)."""
    algo = config.algorithm
    return RolloutSpec(sampler=algo.sampler, noise_level=0.0, shared_noise=algo.shared_noise, record_trajectory=False)


def loss_space(config: Config) -> str:
    """``epsilon`` or ``velocity`` (``auto``: epsilon for the VP family sd, velocity for flow families)."""
    space = config.algorithm.loss_space
    return space if space != "auto" else ("epsilon" if config.model.family == "sd" else "velocity")


def squared_error(v: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, space: str) -> torch.Tensor:
    """``w(sigma) mean (v - target)^2`` per sample, ``w = (1 - sigma)^2`` for epsilon, 1 for velocity: ``[B, ...] -> [B]``."""
    error = denoising_loss(v, target)  # [B]
    return error * (1 - sigma.float()) ** 2 if space == "epsilon" else error


def dpo_logit(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    """``-beta/2 [(l^w - l_ref^w) - (l^l - l_ref^l)]`` per pair, ``[P]``; positive when the policy prefers x^w more than the reference."""
    return -0.5 * beta * ((err_w - ref_w.detach()) - (err_l - ref_l.detach()))


def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float) -> torch.Tensor:
    """``-log sigmoid(dpo_logit)`` per pair, ``[P]``, gradients through the policy's errors only."""
    return -torch.nn.functional.logsigmoid(dpo_logit(err_w, err_l, ref_w, ref_l, beta))


@dataclass
class PairDraw:
    """One pair's draws: its noise level (index into the training grid) and the seed of its shared noise."""

    level: int
    noise_seed: int


class DiffusionDPO:
    """The learner half of Diffusion-DPO and DCPO (the captions differ in the data, not here). ``setup`` keeps the
    frozen reference; rollout, evaluation and checkpoints use the trained weights."""

    on_policy_ratio = False  # offline: no importance ratio

    def __init__(self, config: Config):
        self.config = config
        self.algo: DiffusionDPOConfig = config.algorithm
        self.spec = rollout_spec(config)
        self.space = loss_space(config)

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        self.model, self.device = model, parameters[0].device
        self.frozen = frozen_snapshot(parameters, lora)  # None with LoRA: the reference is the adapter switched off
        if self.config.model.family in VP_FAMILIES:
            # A VP model trains on its DDPM levels t = 0..T_train-1 (Diffusion-DPO's t ~ U{0..999}); a DDIM grid of
            # T_train steps would start past the table (leading spacing with steps_offset 1 gives t = 1000).
            levels = model.train_sigmas[: self.algo.train_timesteps]
        else:
            levels = model.sigma_grid("euler", self.algo.train_timesteps, self.config.rollout.shift)[:-1]  # last (0) dropped
        self.levels = levels.float().to(self.device)  # [T]

    def sampling_weights(self) -> AbstractContextManager:
        return nullcontext()

    def evaluation_weights(self) -> AbstractContextManager:
        return nullcontext()

    def window_samples(self, world_size: int) -> None:
        return None  # one optimizer step per training step

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """Per pair of the step, in order: a noise level and a noise seed."""
        levels = rng.integers(len(self.levels), size=total_groups)
        seeds = rng.integers(2**62, size=total_groups)
        return StepDraws([PairDraw(int(t), int(s)) for t, s in zip(levels, seeds)])

    def after_optimizer_step(self) -> None:
        pass

    def loss_terms(self, policy, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """One term per pair; the reference is swapped in once for every pair of the window first."""
        pairs = [self._pair(wg) for wg in window]
        refs = velocities(self.model, base_weights(self.model, self.frozen), [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs], None)
        for k, (wg, (group, x_t, sigmas, target), v_ref) in enumerate(zip(window, pairs, refs)):
            v = velocity(self.model, group, x_t, sigmas, slice(None))  # [2, ...] with gradients
            err = squared_error(v, target, sigmas, self.space)  # [2]: l^w, l^l
            ref = squared_error(v_ref, target, sigmas, self.space)  # [2]
            loss = diffusion_dpo_loss(err[:1], err[1:], ref[:1], ref[1:], self.algo.beta)  # [1]
            logit = dpo_logit(err[:1], err[1:], ref[:1], ref[1:], self.algo.beta).detach()  # [1]
            yield LossTerm(
                loss=loss.sum() * len(wg.rows),  # the learner divides by trained members: G per pair
                slot=wg.slot,
                final=k == len(window) - 1,
                extras={
                    "implicit_acc": (logit > 0).float().mean(),
                    "dpo_logit": logit.mean(),
                    "error_preferred": err[0].detach(),
                    "error_rejected": err[1].detach(),
                },
            )

    def _pair(self, wg: WindowGroup) -> tuple[GroupTensors, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A pair as a two-row group (x^w, x^l with their captions), noised at its level with one shared noise:
        ``(group, x_t [2, ...], sigmas [2], target v* [2, ...])``."""
        pair = wg.rollout.pair
        if pair is None:
            raise RuntimeError(f"group {wg.train.group_id} carries no preference pair: Diffusion-DPO/DCPO need the preference rollout worker")
        device = self.device
        x0 = torch.as_tensor(np.array(pair.latents, copy=True), device=device)  # [2, ...]
        cond = ConditioningBatch.concat([ConditioningBatch.of(pair.preferred, 1, device), ConditioningBatch.of(pair.rejected, 1, device)])
        group = GroupTensors(x0, torch.zeros(2, device=device), cond)
        generator = torch.Generator().manual_seed(wg.draw.noise_seed)
        eps = torch.randn((1, *x0.shape[1:]), generator=generator).to(device).expand_as(x0)  # [2, ...] shared
        sigmas = self.levels[wg.draw.level].expand(2)  # [2]
        column = sigmas.reshape(-1, *([1] * (x0.ndim - 1)))
        return group, (1 - column) * x0 + column * eps, sigmas, eps - x0
