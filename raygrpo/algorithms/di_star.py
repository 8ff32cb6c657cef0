"""Diff-Instruct*, a one-step generator aligned with human preference against a reference diffusion model
(Luo, Zhang, Zhang, Geng, arXiv 2410.20898, "Diff-Instruct*: Towards Human-Preferred One-step Text-to-image
Generative Models"; v3 "David and Goliath: Small One-step Model Beats Large Diffusion with Score Post-training").

Sources: the paper (the score-based divergence objective and its tractable gradient, which it takes from Score
Implicit Matching, Luo et al., arXiv 2410.16794, Theorem 3.1). The released repository (pkulwj1994/diff_instruct_star)
holds inference notebooks and weights only, no training code, so nothing here could be checked against code.
Shared machinery (generator, reference, rewards with gradients): distill.py.

Objective (image-data-free RLHF with a score-based regulariser), generator g_theta(z, c) one step::

    max_theta  E_{z, c} [ alpha r(g_theta(z, c), c) ]  -  D(p_theta, p_ref)
    D = int w(t) E_{x_t ~ p_theta,t} d( s_theta,t(x_t) - s_ref,t(x_t) ) dt,    d(y) = sqrt(||y||^2 + c^2) - c  (pseudo-Huber)

s_ref is the reference diffusion model's score (with its CFG, ``reference_guidance_scale``: the paper's "implicit
reward" of guidance), s_theta the generator's own marginal score, unknown, so approximated by a fake score network
s_psi trained online by denoising score matching on the generator's samples, alternating with the generator.

Tractable gradient (SIM): with x0 = g_theta(z), x_t = (1 - t) x0 + t eps and y_t = sg(s_psi(x_t) - s_ref(x_t)),
grad_theta D = grad_theta of ``E [ -d'(y_t)^T ( s_psi(x_t) - grad_{x_t} log q_t(x_t | x0) ) ]`` whose only theta
path is the conditional score's x0, ``grad log q_t(x_t|x0) = -(sg(x_t) - (1 - t) x0) / t^2``. In flow coordinates
(score = -eps_hat / t, eps_hat = x_t + (1 - t) v) ``y_t = -(1 - t) / t (v_psi - v_ref)``; with the weight
``w(t) = t^2 / (1 - t)`` the generator's per-sample loss is::

    L_g = < sg(d'(y_t)), x0 >  -  alpha r(x0),      d'(y) = y / sqrt(||y||^2 + c^2),  c = huber_c sqrt(dim x0)

so each sample's divergence gradient is d'(y_t), of norm below 1, pointing from the fake's denoised image toward
the reference's (DMD's direction, pseudo-Huber-normalised). The fake score's loss (flow matching = DSM)::

    L_psi = mean_elements ( v_psi(x_t) - (eps - sg(x0)) )^2,    t ~ U[t_min, t_max]

one step of it (``fake_steps``) before each generator step, on this step's generator samples. The generator is the
trained network read at the grid's first level, ``g(z) = z - sigma_0 v_theta(z, sigma_0)`` (sigma_0 = 1 for flow
families): initialised as the reference's one-step prediction; rollout samples it with ``consistency`` at
``rollout.num_steps: 1``. The fake score starts as the reference (the same starting weights), as the paper's.

Where the extra network lives: the fake score is a second set of the trained parameters' values
(:class:`~raygrpo.learner.ema.ParameterShadow`: with LoRA a second adapter's values on the same frozen base; for
full fine-tuning a whole copy), swapped into the network for its forwards; FSDP shards it (and its AdamW moments)
exactly as the trained parameters, and checkpoints save it and its AdamW state (moments and step count, each rank its
shard) with them, so a resume continues bit-exactly.

With LoRA the fake score is therefore the frozen reference plus an adapter of ``model.lora``'s rank and targets (its
own values, starting as the generator's initial adapter, i.e. as the reference), where the paper trains a whole copy
of the reference network. A deviation, judged acceptable: a full copy would cost the network's size three times over
(values and two AdamW moments), which LoRA runs exist to avoid, and the generator itself departs from the reference
only through a low-rank adapter, so its marginal score is expected (not guaranteed) to stay near the reference's
within a same-rank adapter's reach. The cost is capacity: a fake score that cannot follow the generator stays closer
to the reference and understates the divergence (tiny preset: ``score_gap`` about 1e-4 after two steps with a rank-4
adapter, 0.7 with full fine-tuning). A larger ``model.lora`` rank gives both more.

Defaults: the weight w(t) and c are this file's choices (the paper's released settings could not be read); alpha
(``reward_scale``) 1.0; t in [0.02, 0.98]; one fake step per generator step. The paper trains SD 1.5 / PixArt-alpha
(v1) and SDXL-DMD2 (v3) generators with PickScore / ImageReward / HPS; here: cluster/sd15_di_star.yaml.

Deviations: the generator's noise comes from the learner's draws (rollout's own samples are for the metrics and the
gallery only; their advantages are unused); with LoRA an adapter-sized fake score (above); the paper's CFG-based
implicit reward enters only through the reference's guidance; w(t), c as above.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from raygrpo.algorithms.base import AlgorithmState, LossTerm, StepDraws, WindowGroup
from raygrpo.algorithms.distill import RewardGradient, StudentAlgorithm, ShadowOptimizer, column, fit_weights, noised, seeded_normal, student_x0, teacher_velocities, window_groups
from raygrpo.algorithms.forward_process import GroupTensors, base_weights, frozen_snapshot
from raygrpo.config import DiffInstructStarConfig
from raygrpo.contracts import Rollout
from raygrpo.learner.ema import ParameterShadow



def score_direction(v_fake: torch.Tensor, v_ref: torch.Tensor, t: torch.Tensor, huber_c: float) -> torch.Tensor:
    """``d'(y_t) = y / sqrt(||y||^2 + c^2)``, ``y = -(1 - t) / t (v_fake - v_ref)`` per sample, detached: ``[n, ...]``."""
    y = -column((1 - t) / t, v_fake) * (v_fake.float() - v_ref.float())  # [n, ...] s_fake - s_ref
    c = huber_c * y[0].numel() ** 0.5
    norm = torch.sqrt((y**2).flatten(1).sum(dim=1) + c**2)  # [n]
    return (y / column(norm, y)).detach()


def divergence_loss(x0: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``<sg(d'(y_t)), x0>`` per sample, gradients through the generator's ``x0`` only: ``[n]``."""
    return (direction * x0.float()).flatten(1).sum(dim=1)


def fake_score_loss(v: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Flow-matching DSM of the fake score on generator samples: ``mean (v - (eps - x0))^2`` over all elements, scalar."""
    return ((v.float() - (eps - x0).float()) ** 2).mean()


@dataclass
class DiStarDraw:
    """One group's draws: seeds of the generator's noise z, of the divergence's (t, eps) and of the fake's (t, eps)."""

    z_seed: int
    t: np.ndarray  # [members] divergence levels in [t_min, t_max]
    t_fake: np.ndarray  # [members] the fake score's DSM levels
    eps_seed: int


class DiffInstructStar(StudentAlgorithm):
    """The learner half. ``setup`` keeps the frozen reference, the fake score (a shadow) and its optimizer."""

    algo: DiffInstructStarConfig

    def setup(self, model, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        self.model, self.device = model, parameters[0].device
        self.frozen = frozen_snapshot(parameters, lora)  # None with LoRA: the reference is the adapter switched off
        self.fake = ParameterShadow(parameters)  # s_psi, starting as the reference
        opt = self.config.optimizer
        self.fake_optimizer = ShadowOptimizer(self.fake, self.algo.fake_lr or opt.lr, opt.betas, opt.max_grad_norm)
        self.sigma_start = float(model.sigma_grid("consistency", 1, self.config.rollout.shift)[0])  # the generator's level
        self.reward = RewardGradient(self.config, model, self.device)

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        algo = self.algo
        t = rng.uniform(algo.t_min, algo.t_max, size=(2, total_groups, members))
        seeds = rng.integers(2**62, size=(2, total_groups))
        return StepDraws([DiStarDraw(int(seeds[0, k]), t[0, k], t[1, k], int(seeds[1, k])) for k in range(total_groups)])

    def loss_terms(self, policy, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """The fake score's (and the LRM's) steps on this window's generator samples, then the reference and the
        fake swapped in once each for every group, then one generator term per group."""
        algo, model, device = self.algo, self.model, self.device
        groups, prompts = window_groups(window, device)
        weights = fit_weights(window)  # [groups] padding 0
        lrm_loss = self.reward.fit(groups, weights, algo.lrm_steps)
        rows = [torch.as_tensor(wg.rows) for wg in window]
        z = [seeded_normal(wg.draw.z_seed, (len(wg.draw.t), *g.x0.shape[1:]), device)[r] for wg, g, r in zip(window, groups, rows)]
        start = [torch.full((len(x),), self.sigma_start, device=device) for x in z]  # [n] each
        with torch.no_grad():
            x0 = [student_x0(model, x, s, g.cond) for x, s, g in zip(z, start, groups)]  # [n, ...] each, this step's samples
        eps = [seeded_normal(wg.draw.eps_seed, (2, len(wg.draw.t), *g.x0.shape[1:]), device)[:, r] for wg, g, r in zip(window, groups, rows)]
        fake_loss = torch.zeros((), device=device)
        for _ in range(algo.fake_steps):
            fake_loss = self.fake_optimizer.step(lambda: self._fake_loss(window, groups, x0, eps, weights))
        t = [torch.as_tensor(wg.draw.t[wg.rows], dtype=torch.float32, device=device) for wg in window]  # [n] each
        x_t = [noised(x, e[0], s) for x, e, s in zip(x0, eps, t)]  # [n, ...] each
        v_ref = teacher_velocities(model, base_weights(model, self.frozen), groups, x_t, t, algo.reference_guidance_scale)
        v_fake = teacher_velocities(model, self.fake.swapped(), groups, x_t, t, None)
        for k, (wg, group) in enumerate(zip(window, groups)):
            sample = student_x0(model, z[k], start[k], group.cond)  # [n, ...] with gradients
            divergence = divergence_loss(sample, score_direction(v_fake[k], v_ref[k], t[k], algo.huber_c))  # [n]
            reward = self.reward(sample, group.cond, prompts[k]) if algo.reward_scale else torch.zeros_like(divergence)  # [n]
            extras = {"fake_dsm": fake_loss, "reward_grad_source": reward.detach().mean(), "score_gap": (v_fake[k] - v_ref[k]).pow(2).mean()}
            if lrm_loss is not None:
                extras["lrm_loss"] = lrm_loss
            yield LossTerm(loss=(divergence - algo.reward_scale * reward).sum(), slot=wg.slot, final=k == len(window) - 1, extras=extras)

    def _fake_loss(
        self, window: list[WindowGroup], groups: list[GroupTensors], x0: list[torch.Tensor], eps: list[torch.Tensor], weights: list[float]
    ) -> torch.Tensor:
        """The fake score's DSM over the window's generator samples, each group's weighted by ``weights`` (distill.py
        ``fit_weights``: padding 0, its forward and backward still run for FSDP's collectives); called with the fake's
        values swapped in. On one rank the mean over its real groups."""
        losses = []
        for wg, g, x, e in zip(window, groups, x0, eps):
            t = torch.as_tensor(wg.draw.t_fake[wg.rows], dtype=torch.float32, device=self.device)  # [n]
            v = self.model.velocity(noised(x, e[1], t), t, g.cond)  # [n, ...] with gradients into the fake's values
            losses.append(fake_score_loss(v, e[1], x))
        return (torch.stack(losses) * torch.tensor(weights, device=self.device)).sum()

    def state_dict(self) -> AlgorithmState:
        """The students' state (the LRM of the latent source) and the fake score's AdamW state (sharded: its values are a
        shadow, saved as every shadow is)."""
        state = super().state_dict()
        state.sharded["fake_optimizer"] = self.fake_optimizer.state_dict()
        return state

    def load_state_dict(self, state: AlgorithmState) -> None:
        super().load_state_dict(state)
        self.fake_optimizer.load_state_dict(state.sharded["fake_optimizer"])

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1
