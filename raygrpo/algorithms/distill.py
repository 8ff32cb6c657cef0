"""What the few-step student methods share (RG-LCD: rg_lcd.py, Diff-Instruct*: di_star.py): a student generator
trained against the frozen teacher with a reward term whose gradient reaches the student in the learner.

Pieces, each used by both:

* the student's clean prediction :func:`student_x0`, ``f(x_sigma) = x_sigma - sigma v(x_sigma)``: the consistency
  function of an LCM and the one-step generator of Diff-Instruct* in flow coordinates (exact at sigma = 0, so the
  consistency boundary condition f(x, 0) = x holds without LCM's c_skip/c_out scalings);
* the teacher / reference: the frozen base weights (the network with its LoRA adapter switched off, or a frozen
  snapshot of the start for full fine-tuning: :func:`~raygrpo.algorithms.forward_process.base_weights`) swapped in,
  evaluated with the teacher's guidance (CFG families: classifier-free guidance in one batched forward; FLUX: the
  embedded value), once per window for every group (:func:`teacher_velocities`);
* the reward with gradients (:class:`RewardGradient`): ``reward_source: pixel`` decodes the student's latents with
  the VAE decoder loaded into the learner (:class:`PixelDecoder`) and scores them with
  :func:`raygrpo.reward.differentiable.differentiable_reward`; ``reward_source: latent`` scores latents with a
  latent reward model (:class:`LatentRewardModel`, RG-LCD's LRM) trained online on the reward pools' scores;
* an extra trained network with an optimizer of its own (:class:`AuxiliaryOptimizer`: the LRM; Diff-Instruct*'s
  fake score uses :class:`ShadowOptimizer`, a second set of the trained parameters' values).

Sharding (FSDP2 learner group): the VAE decoder (frozen) and the LRM (a few thousand parameters) are replicated on
every rank; the LRM's gradients are averaged over the ranks before each of its steps, so every replica stays equal.
The fake score network is a :class:`~raygrpo.learner.ema.ParameterShadow` of the trained parameters, so it is
sharded exactly as they are (a rank holds its DTensor shard of the values and of their AdamW moments); it is
trained by swapping its values into the live network, whose FSDP backward reduce-scatters its gradient.

Checkpoints (raygrpo/learner/state.py through :meth:`StudentAlgorithm.state_dict`): the shadows (target EMA, frozen
start, fake score) and ``optimizer_steps`` as every algorithm's; the fake score's AdamW moments and step count as
sharded state (each rank its shard, like the shadows: :class:`ShadowOptimizer` creates them at construction so that
a resume has tensors to load into); the LRM (its sizes, weights and AdamW state) as replicated state, written once by
rank 0 (every replica is equal) and rebuilt from the saved sizes on every rank of a resume before it is loaded. Nothing
else persists across updates: every draw comes from the learner's generator, which the checkpoint restores.

LoRA (``model.lora``): the trained parameters are the adapter's, so the teacher / reference is the network with the
adapter switched off, the target EMA and the fake score are adapter-sized shadows on the same frozen base (the fake
score is base + an adapter of the same rank, starting as the reference: a deviation from Diff-Instruct*'s full-network
fake score, see di_star.py).

Rollout samples the student with ``consistency`` (raygrpo/sampling/ode.py: LCM's multistep sampling; one step for a
one-step generator); the reward pools score those samples for the metrics, the gallery and the LRM's targets.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from raygrpo.algorithms.base import AlgorithmState, RolloutSpec, WindowGroup
from raygrpo.algorithms.forward_process import GroupTensors, group_tensors
from raygrpo.config import Config
from raygrpo.learner.ema import ParameterShadow
from raygrpo.learner.shard import global_sums
from raygrpo.reward.differentiable import differentiable_reward

PIXEL_FAMILIES = ("flux", "sd3", "sd")  # families whose latents PixelDecoder turns into images


def rollout_spec(config: Config) -> RolloutSpec:
    """The student's multistep consistency sampling (one step for a one-step generator); final latents only."""
    return RolloutSpec(sampler="consistency", noise_level=0.0, shared_noise=config.algorithm.shared_noise, record_trajectory=False)


class StudentAlgorithm:
    """The protocol's parts both student methods answer alike: no likelihood ratio (a distillation loss), rollout
    and evaluation use the trained weights, one optimizer step per training step. Subclasses add setup, draw,
    loss_terms and after_optimizer_step."""

    on_policy_ratio = False
    reward: RewardGradient  # set by the subclass's setup

    def __init__(self, config: Config):
        self.config = config
        self.algo = config.algorithm
        self.spec = rollout_spec(config)
        self.optimizer_steps = 0

    def sampling_weights(self) -> AbstractContextManager:
        return nullcontext()

    def evaluation_weights(self) -> AbstractContextManager:
        return nullcontext()

    def window_samples(self, world_size: int) -> None:
        return None

    def state_dict(self) -> AlgorithmState:
        """What a checkpoint needs beyond the shadows and ``optimizer_steps``: the reward's LRM (replicated: every rank
        holds the same); subclasses add their sharded state."""
        return AlgorithmState(sharded={}, replicated={"reward": self.reward.state_dict()})

    def load_state_dict(self, state: AlgorithmState) -> None:
        self.reward.load_state_dict(state.replicated["reward"])


def column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[n] -> [n, 1, ...]`` to broadcast per-sample values over ``like``'s elements."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def noised(x0: torch.Tensor, eps: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The forward process ``(1 - sigma) x0 + sigma eps`` with per-sample ``sigmas [n]``: ``[n, ...]``."""
    s = column(sigmas, x0)
    return (1 - s) * x0 + s * eps


def student_x0(model, x_t: torch.Tensor, sigmas: torch.Tensor, cond, guidance_scale: float | None = None) -> torch.Tensor:
    """The clean prediction ``x_t - sigma v(x_t, sigma)`` of the live weights (gradients when enabled): ``[n, ...]``."""
    v = model.velocity(x_t, sigmas, cond, guidance_scale=guidance_scale)  # [n, ...]
    return x_t - column(sigmas, x_t) * v


def teacher_velocities(
    model, weights: AbstractContextManager, groups: list[GroupTensors], x_t: list[torch.Tensor], sigmas: list[torch.Tensor], guidance: float | None
) -> list[torch.Tensor]:
    """Per group ``v [n, ...]`` under ``weights`` (swapped in once for every group), without gradients."""
    with torch.no_grad(), weights:
        return [model.velocity(x, s, g.cond, guidance_scale=guidance) for g, x, s in zip(groups, x_t, sigmas)]


def window_groups(window: list[WindowGroup], device: torch.device | str) -> tuple[list[GroupTensors], list[list[str]]]:
    """Each window group's rows (rollout latents, combined advantages, conditioning) and their prompts."""
    groups = [group_tensors(wg, device) for wg in window]
    prompts = [[wg.rollout.group.prompt] * len(wg.rows) for wg in window]
    return groups, prompts


def fit_weights(window: list[WindowGroup]) -> list[float]:
    """Each window group's weight in an auxiliary fit's loss (the LRM's, the fake score's): ``M / N`` for a real group,
    N the real groups of the window over every rank and M the ranks, 0 for padding (``WindowGroup.padding``).

    The fits' gradients are averaged over the ranks (the LRM's all-reduce, the fake score's FSDP reduce-scatter), so
    rank r's ``sum_g w_g l_g`` averages to the mean of ``l_g`` over every real group of the step, what one rank holding
    them all fits; padding, a copy of a real group, adds nothing but still runs every forward and backward (the
    collectives stay matched). One all-reduce (of N): every rank calls it at the same point of its window."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    ranks = torch.distributed.get_world_size() if distributed else 1
    (real,) = global_sums([float(sum(not wg.padding for wg in window))], ranks)
    return [0.0 if wg.padding else ranks / real for wg in window]


def seeded_normal(seed: int, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """``N(0, I)`` of ``shape`` from a CPU generator seeded with ``seed`` (the same on every rank and device)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


# ------------------------------------------------------------------------------------------ pixels
class PixelDecoder:
    """The family's VAE decoder in the learner, differentiable: clean latents ``[n, ...]`` to pixels ``[n, 3, H, W]``
    in [0, 1] (the pipelines' output path before the uint8 rounding). Frozen, float32, loaded next to the network."""

    def __init__(self, config: Config, model, device: torch.device | str):
        from diffusers import AutoencoderKL

        from raygrpo.models.hub import load_component, pretrained_source

        family = config.model.family
        if family not in PIXEL_FAMILIES:
            raise ValueError(f"reward_source: pixel decodes images of model.family {PIXEL_FAMILIES}, not {family!r}: use reward_source: latent")
        self.family, self.model = family, model
        self.vae = load_component(pretrained_source(family, config.model.pretrained), AutoencoderKL, "vae", device, torch_dtype=torch.float32)

    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.float()
        if self.family == "flux":
            from diffusers import FluxPipeline

            z = FluxPipeline._unpack_latents(z, self.model.height, self.model.width, self.model.vae_scale_factor)  # [n, C, h, w]
        z = z / vae.config.scaling_factor
        if self.family != "sd":
            z = z + vae.config.shift_factor
        decoded = vae.decode(z, return_dict=False)[0]  # [n, 3, H, W] in about [-1, 1]
        return (decoded / 2 + 0.5).clamp(0, 1)


# ----------------------------------------------------------------------------- latent reward model
class LatentRewardModel(torch.nn.Module):
    """RG-LCD's latent proxy reward model at toy scale: a reward of clean latents and the prompt, learnt online.

    Any latent layout is read as tokens ``[n, N, F]`` (FLUX's packed ``[S, D]`` as it is; ``[C, h, w]`` and video
    ``[C, F, h, w]`` as their spatial positions with C features). Each token goes through an MLP; their mean and
    standard deviation over the tokens, plus a projection of the prompt's mean text embedding, go through a head
    to one score. The released LRM is a latent ViT / ResNet CLIP (open_clip, initialised from the expert's); this
    one is small enough to learn from a few hundred pool scores.
    """

    def __init__(self, features: int, text_features: int, hidden: int = 64):
        super().__init__()
        self.sizes = {"features": features, "text_features": text_features, "hidden": hidden}  # what a resume rebuilds
        self.tokens = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden))
        self.text = torch.nn.Linear(text_features, 2 * hidden)
        self.head = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(2 * hidden, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1))

    @staticmethod
    def as_tokens(latents: torch.Tensor) -> torch.Tensor:
        """``[n, S, D]`` as it is; ``[n, C, ...]`` to ``[n, positions, C]``."""
        return latents if latents.ndim == 3 else latents.flatten(2).transpose(1, 2)

    def forward(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``latents [n, ...]``, ``text [n, L, D_text]`` -> ``[n]``."""
        h = self.tokens(self.as_tokens(latents.float()))  # [n, N, hidden]
        pooled = torch.cat([h.mean(dim=1), h.std(dim=1)], dim=1)  # [n, 2 hidden]
        return self.head(pooled + self.text(text.float().mean(dim=1))).squeeze(-1)  # [n]


def lrm_pair_loss(scores: torch.Tensor, advantages: torch.Tensor, temperature: float) -> torch.Tensor:
    """The released code's "distillation" loss of the LRM over every pair of a group's samples, with the pools'
    group-normalised scores in place of the expert's logits: ``mean_{i<j} KL(p_ij || q_ij)`` where
    ``p_ij = sigmoid((A_i - A_j) / temperature)`` (the pools' preference) and ``q_ij = sigmoid(s_i - s_j)`` (the
    LRM's). ``scores`` and ``advantages``: ``[n]``; returns a scalar, 0 exactly when s_i - s_j = (A_i - A_j) / T."""
    i, j = torch.triu_indices(len(scores), len(scores), offset=1)
    logits = scores[i] - scores[j]  # [pairs]
    target = torch.sigmoid((advantages[i] - advantages[j]).float() / temperature)  # [pairs]
    entropy = torch.nn.functional.binary_cross_entropy(target, target, reduction="none")  # [pairs] H(p)
    return (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none") - entropy).mean()


# ----------------------------------------------------------------------------------- optimizers
class AuxiliaryOptimizer:
    """AdamW on a small network replicated on every learner rank (the LRM): gradients averaged over the ranks
    (torch.distributed, when a process group is up), clipped to ``max_grad_norm``, then one step. Every rank steps
    together (the all-reduce), a rank whose groups are all padding with its zero-weighted loss."""

    def __init__(self, parameters: list[torch.nn.Parameter], lr: float, max_grad_norm: float):
        self.parameters = parameters
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            for p in self.parameters:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class ShadowOptimizer:
    """AdamW on a :class:`ParameterShadow`'s values, trained through the live network: ``backward`` under the
    shadow's values swapped in, the live parameters' gradients moved onto the shadow, then one step.

    It must run while the live parameters hold no gradient of their own (at the start of a window, before any
    policy term: the learner zeroes gradients before each window), and it leaves them without one.

    Under FSDP the backward reduce-scatters the fake score's gradient over the ranks like any other: gradient sync is on
    at the start of a window (the learner's previous window ended on its syncing last term, or none ran yet).

    The AdamW state exists from construction (AdamW's own first-step initialisation, done early: step 0, zero
    moments shaped and sharded as the shadow's values), so that a checkpoint always has it and a resume loads into it.
    """

    def __init__(self, shadow: ParameterShadow, lr: float, betas: tuple[float, float], max_grad_norm: float):
        self.shadow = shadow
        for value in shadow.values:
            value.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(shadow.values, lr=lr, betas=betas, weight_decay=0.0)
        for value in shadow.values:
            # The keys and values torch's AdamW gives a parameter at its first step (not capturable, not fused).
            self.optimizer.state[value] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(value), "exp_avg_sq": torch.zeros_like(value)}
        self.max_grad_norm = max_grad_norm

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The live AdamW tensors by ``<value index>.<key>`` (DTensor shards under FSDP, the 0-dim step replicated)."""
        return {f"{i}.{key}": tensor for i, value in enumerate(self.shadow.values) for key, tensor in self.optimizer.state[value].items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state_dict()
        if mine.keys() != state.keys():
            raise ValueError(f"the fake score's optimizer state holds {sorted(state)[:4]}..., this one {sorted(mine)[:4]}...: not the same parameters")
        for key, tensor in mine.items():
            if state[key] is not tensor:  # a checkpoint load fills the live tensors in place
                tensor.copy_(state[key])

    def step(self, loss_fn) -> torch.Tensor:
        """``loss_fn()`` -> a scalar evaluated inside the swap (gradients on); returns its detached value."""
        live = self.shadow.parameters
        if any(p.grad is not None for p in live):
            raise RuntimeError("ShadowOptimizer.step needs the live parameters without gradients (start of a window)")
        with self.shadow.swapped():
            loss = loss_fn()
            loss.backward()
        for value, p in zip(self.shadow.values, live):
            value.grad, p.grad = p.grad, None
        grads = [v for v in self.shadow.values if v.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# --------------------------------------------------------------------------------------- rewards
class RewardGradient:
    """The reward the student maximises, with gradients through its clean latents ``x0 [n, ...]``.

    ``pixel``: ``sum_k w_k r_k(decode(x0))``, the config's rewards in torch (raygrpo/reward/differentiable.py);
    ``latent``: the LRM's score, the LRM trained by :meth:`fit` on the pools' scores of rollout samples.
    """

    def __init__(self, config: Config, model, device: torch.device | str):
        algo = config.algorithm
        self.config, self.device = config, device
        self.source, self.temperature = algo.reward_source, algo.lrm_temperature
        self.lrm: LatentRewardModel | None = None  # latent source: built at its first use, from the latents' shapes
        if self.source == "pixel":
            self.score_pixels = differentiable_reward(config.rewards)
            self.decoder = PixelDecoder(config, model, device)

    def _latent_model(self, x0: torch.Tensor, text: torch.Tensor) -> LatentRewardModel:
        if self.lrm is None:
            self._build_lrm(LatentRewardModel.as_tokens(x0).shape[-1], text.shape[-1])
        return self.lrm

    def _build_lrm(self, features: int, text_features: int) -> None:
        algo = self.config.algorithm
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.run.seed)  # the same LRM on every rank
            self.lrm = LatentRewardModel(features, text_features, algo.lrm_hidden).to(self.device)
        self.optimizer = AuxiliaryOptimizer(list(self.lrm.parameters()), algo.lrm_lr, self.config.optimizer.max_grad_norm)

    def state_dict(self) -> dict:
        """The LRM once built (its sizes, weights, AdamW state); empty before its first use and for the pixel source."""
        if self.lrm is None:
            return {}
        return {"sizes": self.lrm.sizes, "lrm": self.lrm.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Rebuild the LRM from the saved sizes (it is otherwise built at its first use), then load it."""
        if not state:
            self.lrm = None
            return
        sizes, hidden = state["sizes"], self.config.algorithm.lrm_hidden
        if sizes["hidden"] != hidden:
            raise ValueError(f"the saved latent reward model has lrm_hidden={sizes['hidden']}, the config algorithm.lrm_hidden={hidden}: resume with the saved value")
        self._build_lrm(sizes["features"], sizes["text_features"])
        self.lrm.load_state_dict(state["lrm"])
        self.optimizer.load_state_dict(state["optimizer"])

    def __call__(self, x0: torch.Tensor, cond, prompts: list[str]) -> torch.Tensor:
        """``[n]`` rewards of clean latents ``x0 [n, ...]`` with gradients through them."""
        if self.source == "pixel":
            return self.score_pixels(self.decoder.pixels(x0), prompts)
        return self._latent_model(x0, cond.prompt_embeds)(x0, cond.prompt_embeds)

    def fit(self, groups: list[GroupTensors], weights: list[float], steps: int) -> torch.Tensor | None:
        """Latent source: ``steps`` LRM steps on the groups' rollout latents and advantages, each group's pair loss
        weighted by ``weights`` (:func:`fit_weights`: padding 0); returns this rank's last weighted loss (on one rank
        the mean over its real groups). A window's groups all have the same members, so every rank has pairs or
        none, and every rank takes the same steps."""
        if self.source == "pixel" or not groups or len(groups[0].x0) < 2:
            return None
        lrm = self._latent_model(groups[0].x0, groups[0].cond.prompt_embeds)
        loss = None
        for _ in range(steps):
            losses = [lrm_pair_loss(lrm(g.x0, g.cond.prompt_embeds), g.advantages, self.temperature) for g in groups]
            loss = (torch.stack(losses) * torch.tensor(weights, device=losses[0].device)).sum()  # padding: 0 x its loss
            self.optimizer.step(loss)
        return loss.detach()


__all__ = [
    "AuxiliaryOptimizer",
    "LatentRewardModel",
    "PixelDecoder",
    "RewardGradient",
    "ShadowOptimizer",
    "StudentAlgorithm",
    "column",
    "fit_weights",
    "lrm_pair_loss",
    "noised",
    "rollout_spec",
    "seeded_normal",
    "student_x0",
    "teacher_velocities",
    "window_groups",
]
