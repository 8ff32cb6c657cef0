"""What an algorithm is to the rest of raygrpo: a rollout spec and a loss, nothing of the plumbing.

An algorithm (one file each: ``dancegrpo.py``, ``dgpo.py``) says

* what rollout must record (:class:`RolloutSpec`: sampler, noise sharing, trajectory and log-probs, and with
  an :class:`SdeWindow` which steps are SDE steps; ``Rollout.sde_steps`` says which steps were recorded);
* the random draws of one update (:meth:`Algorithm.draw`: DanceGRPO's timesteps, DGPO's sigmas and noises),
  made for every group of the step in order so that M learner ranks draw what one rank draws;
* the loss of one optimizer step's samples as a stream of :class:`LossTerm` (:meth:`Algorithm.loss_terms`),
  each a scalar the learner scales and backpropagates at once (so one term's activations are alive at a
  time): a differentiable ``loss``, or its value with its gradient in closed form at a tensor it depends on
  (``output``, ``gradient``: DanceGRPO's surrogate reaches the network's velocity that way, :meth:`LossTerm.backward`);
* which weights rollout samples with and which are evaluated/exported (EMA shadows), and what moves
  after each optimizer step.

The learner (``raygrpo/learner/learner.py``) owns everything else: which samples form an optimizer
step's window, the normalisation by the window's sample count over every rank, padding slots (loss
weight 0), FSDP's gradient sync on the window's last backward, gradient clipping, the optimizer step and
the metrics. Its contract with an algorithm, for one window of samples::

    objective = sum_{terms t of the window} loss_t / (real samples of the window over every rank)

so an algorithm writes ``loss_t`` as its per-sample loss summed over the samples the term covers (and
divided by the number of terms each sample gets, e.g. DanceGRPO's trained timesteps).

Offline algorithms (Diffusion-DPO, DCPO: ``dcpo.py``) train on data rather than on samples. The extension is on the
rollout side only: their rollout role (``raygrpo/rollout/preference.py``, chosen by ``rollout_worker_class``) still
samples each group for the reward metrics, and also encodes the group's data record (a preference pair: VAE latents
and caption encodings) into a :class:`~raygrpo.data.preferences.PreferenceRollout`; ``loss_terms`` reads that and
ignores the samples and advantages. A group's one pair is written as its trained members' share (loss times
``len(rows)``), so the learner's normalisation above gives the mean over pairs.

Few-step students (RG-LCD, Diff-Instruct*: ``rg_lcd.py``, ``di_star.py`` on ``distill.py``) fit the protocol as it
is: rollout samples the student with the ``consistency`` sampler (``rollout.num_steps`` 1 for a one-step generator);
``loss_terms`` may train networks of its own before its first term (the latent reward model; the fake score as a
:class:`~raygrpo.learner.ema.ParameterShadow` stepped through the live network while it holds no gradient), and
reaches rewards with gradients through a VAE decoder it loads itself. The advantages feed only the latent reward
model; the samples are the LCD data (RG-LCD) or unused by the loss (Diff-Instruct*: data-free).

Training state (what a checkpoint restores for an exact resume, raygrpo/learner/state.py): an algorithm's
:class:`~raygrpo.learner.ema.ParameterShadow` attributes and its int attributes (step counters) are found and saved
without its help. Anything else it keeps across updates (the latent reward model and its optimizer, the fake score's
AdamW moments) it hands over through the optional hooks of :class:`StatefulAlgorithm`, as an :class:`AlgorithmState`
of two parts: ``sharded``, tensors laid out as the trained parameters (DTensor shards under FSDP: each rank saves and
loads its own shard, with the shadows) and ``replicated``, what every rank holds alike (rank 0 writes it, every rank
reads it back). An algorithm without the hooks has no such state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from raygrpo.contracts import PromptGroup, Rollout, TrainGroup


class SdeWindow(Protocol):
    """Which steps of a group are sampled with the SDE (and recorded); every other step is a deterministic Euler
    step. Flow-GRPO-Fast draws a window per group, MixGRPO slides one along with training. Implementations are
    frozen, picklable dataclasses (rollout workers receive them) and deterministic in the group, so that every
    worker sampling a part of a spread group, or a group generated again, uses the same window."""

    def bounds(self, group: PromptGroup, num_steps: int) -> tuple[int, int]:
        """``[start, stop)`` within ``0..num_steps``: the SDE steps of ``group``."""


class PostWindowOde(Protocol):
    """How the steps after a group's SDE window are taken when not by Euler on the rollout grid (MixGRPO-Flash:
    DPM-Solver++(2M) on a compressed tail). A frozen, picklable dataclass, as :class:`SdeWindow`."""

    solver: str  # one of raygrpo.sampling.ODE_SOLVERS; fed every step of the group (a multistep solver's history)

    def sigmas(self, sigmas: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """The group's grid: ``sigmas`` ``[T+1]`` through the window's end, then the steps after it (recorded in the Rollout)."""


@dataclass(frozen=True)
class RolloutSpec:
    """What rollout must record for an algorithm."""

    sampler: str  # one of raygrpo.sampling.SAMPLERS
    noise_level: float  # eta (dance_sde), a (flow_sde), DDIM's eta (ddim); unused by ODE samplers
    shared_noise: bool  # one initial noise per group
    record_trajectory: bool  # keep x_0..x_T and the per-step log-probs
    sde_window: SdeWindow | None = None  # record_trajectory only: SDE (recorded) steps; None: every step
    post_window: PostWindowOde | None = None  # sde_window only: the steps after the window; None: Euler on the same grid


@dataclass
class StepDraws:
    """The random draws of one update: one entry per group slot of the whole step (every rank's), in order,
    plus what every group shares. The learner hands each group the entry of its global slot."""

    per_group: list[Any]  # [total groups]; an algorithm-specific draw per group (e.g. per-member timesteps)
    shared: Any = None  # e.g. DGPO's training sigmas
    extras: dict[str, float] = field(default_factory=dict)  # step-level statistics of the draws (DGPO: sigma_min)


@dataclass
class WindowGroup:
    """One group's part of an optimizer step's window, as the learner hands it to ``loss_terms``."""

    slot: int  # index of this entry in the window (a LossTerm names it)
    train: TrainGroup  # advantages, reward weights, the trained members
    rollout: Rollout
    rows: np.ndarray  # [n] int64: positions into ``train.members`` that belong to this window
    draw: Any  # this group's entry of StepDraws.per_group
    # A copy filling a short rank's slot (raygrpo/learner/shard.py): the learner weighs its loss terms 0, and whatever
    # else trains on the window (distill.py's latent reward model and fake score) must weigh it 0 too, while still
    # running its forwards and backwards (FSDP needs the same collectives on every rank).
    padding: bool = False


@dataclass
class LossTerm:
    """One backward's worth of loss, and what the metrics need of it.

    Its gradient reaches the network one of two ways, both through :meth:`backward` (the learner's one call):

    * ``loss`` is differentiable and ``output`` None: autograd's gradient of ``loss``;
    * ``output`` (a tensor of the graph, e.g. the network's velocity) with ``gradient`` = d loss / d output, known in
      closed form: backward starts at ``output`` with it, and ``loss`` is then the value (detached), or differentiable
      only in what ``gradient`` does not cover (Flow-GRPO's KL to the reference): the gradient is the sum of both.

    The second skips the operations (and their backward nodes) a differentiable value would cost per term: on small
    latents each small operation is a noticeable share of a forward (DanceGRPO, benchmarks/README.md).

    The statistics are detached tensors, read back once per update (a ``float()`` per term would make the
    CPU wait for the device at every backward)."""

    # scalar: sum over the samples it covers of their per-sample loss share (see the module docstring); only the window's
    # sum counts, so a run of terms may carry its value on its last (DanceGRPO: a window group's surrogate value)
    loss: torch.Tensor
    slot: int  # the WindowGroup it belongs to (the learner weights padding groups 0)
    final: bool  # the window's last term: its backward reduce-scatters the gradients
    ratios: torch.Tensor | None = None  # [n] importance ratios of the term's samples (for clip/ratio metrics); None: none
    # [n] bool, per sample: its loss lost its gradient to the clip; may cover a run of terms ending here (DanceGRPO: its
    # micro-batch's), the clip fraction being the mean over all of them
    clipped: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # 0-dim algorithm statistics, averaged over the real terms giving them
    output: torch.Tensor | None = None  # where backward starts with ``gradient`` (None: from ``loss`` alone)
    gradient: torch.Tensor | None = None  # d loss / d output, of output's shape and dtype, detached

    def backward(self, scale: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss * scale`` (``scale`` 0-dim, the loss's dtype and device) into the leaves."""
        if self.output is None:
            self.loss.backward(scale)  # the gradients of loss * scale, without a multiply and its node
        elif self.loss.requires_grad:
            torch.autograd.backward((self.loss, self.output), (scale, self.gradient * scale))
        else:
            self.output.backward(self.gradient * scale)


class Algorithm(Protocol):
    """The learner half of an algorithm; built from the run config by :func:`raygrpo.algorithms.make_algorithm`."""

    spec: RolloutSpec
    on_policy_ratio: bool  # ratios are pi_theta / pi_old of the samples (exactly 1 before the first step on-policy)

    def setup(self, model: Any, parameters: list[torch.nn.Parameter], lora: bool) -> None:
        """Prepare shadows (EMA, frozen reference) once the trained parameters exist (sharded or not)."""

    def window_samples(self, world_size: int) -> int | None:
        """Samples per rank in one optimizer step's window; None: the whole step is one window."""

    def draw(self, rng: np.random.Generator, total_groups: int, members: int, example: Rollout) -> StepDraws:
        """Every random choice of the update, for ``total_groups`` groups of ``members`` trained members each."""

    def loss_terms(self, policy: Any, window: list[WindowGroup], draws: StepDraws) -> Iterator[LossTerm]:
        """The window's loss, one term per backward; the last one is marked ``final``."""

    def after_optimizer_step(self) -> None:
        """Move what follows the trained weights (DGPO's EMAs); called after every optimizer step."""

    def sampling_weights(self) -> AbstractContextManager:
        """The weights rollout samples with, swapped in for the duration (DGPO: the fast EMA after its switch)."""

    def evaluation_weights(self) -> AbstractContextManager:
        """The weights checkpoints and evaluation use (DGPO: the slow EMA)."""


@dataclass
class AlgorithmState:
    """An algorithm's training state beyond its shadows and counters (see the module docstring)."""

    # Tensors sharded as the trained parameters (a rank's DTensor shard, a plain tensor on one unsharded rank), the live
    # ones: they must exist before a load (built in ``setup``, never lazily), which fills them in place.
    sharded: dict[str, Any]
    # The same on every rank: tensors, numbers, strings and nested dicts/lists of them (``torch.load(weights_only=True)``
    # reads it back); may describe what was built lazily (shapes), so that a load can build it first.
    replicated: dict[str, Any]


@runtime_checkable
class StatefulAlgorithm(Protocol):
    """The optional training-state hooks of an :class:`Algorithm` (raygrpo/learner/state.py calls them when present)."""

    def state_dict(self) -> AlgorithmState:
        """The state as it is now; ``sharded`` holds the live tensors."""

    def load_state_dict(self, state: AlgorithmState) -> None:
        """Restore :meth:`state_dict`'s content (``sharded`` already loaded into the live tensors, or copies of them)."""
