"""The few-step student methods' learner step on fake tensors (RG-LCD, Diff-Instruct*: raygrpo/algorithms/distill.py).

Their learner step is not a repetition of one loss term: before the first term, once per step, Diff-Instruct*
trains its fake score (flow-matching DSM over every group of the window, one backward over all of them, then
its own AdamW step) and draws the generator's samples, the latent reward model (``reward_source: latent``)
takes its steps over the window's latents, and the teacher / reference (with its guidance: CFG as one batched
forward of twice the rows), RG-LCD's EMA target and Diff-Instruct*'s fake score run without gradients for
every group; then one term per group (the student's forward, the reward through the VAE decoder or the
latent reward model, the backward). So the planner runs the algorithm's own ``loss_terms`` on a window of
the rank, fake groups of zeros at the config's sizes, and a backward per term as the learner does
(raygrpo/learner/learner.py ``_train_window``): memory and FLOPs are those of the step's code itself, whatever
the algorithm holds between its phases (the fake score's graphs over all groups at once, the teacher's
outputs kept for every group). Windows of one and two groups are run and extrapolated to the step's
``groups_per_step / num_ranks`` (raygrpo/plan/measure.py ``student_learner`` says how, and where it is exact).
The rollout side needs nothing of its own: the student's few-step (``consistency``) sampling is one network
forward per step without CFG, which the rollout measurement runs like any ODE sampler.

What the rank keeps across steps besides the trained shards and their AdamW states: the algorithm's
:class:`~raygrpo.learner.ema.ParameterShadow` copies (RG-LCD's target, Diff-Instruct*'s fake score, the frozen
base without LoRA; the planner counts them with every algorithm's shadows), the fake score's AdamW moments and
the reward decoder's float32 VAE (``reward_source: pixel``; :func:`stand_in_decoder` hands the algorithm a fake
one): :func:`held_tensors`. The latent reward model and its AdamW states are built inside the window (their first
use), so the peak holds them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily

from raygrpo.algorithms.base import StepDraws, WindowGroup
from raygrpo.algorithms.distill import StudentAlgorithm
from raygrpo.config import Config, DiffInstructStarConfig, RGLCDConfig
from raygrpo.contracts import PromptGroup, Rollout, TrainGroup
from raygrpo.plan.architecture import Architecture, build_component
from raygrpo.plan.fake import conditioning

# Any prompt does (the values never matter); a colour reward read from the prompt (reward/differentiable.py) needs
# one that names a colour.
PROMPT = "a red apple"


def is_student(config: Config) -> bool:
    """Whether ``config`` trains one of the few-step student methods this module plans."""
    return isinstance(config.algorithm, RGLCDConfig | DiffInstructStarConfig)


def window_groups_of(config: Config) -> int:
    """The groups of one learner rank's window: the student methods train a step's groups in one window."""
    return config.algorithm.groups_per_step // config.learner.num_ranks


@contextmanager
def stand_in_decoder(arch: Architecture, fake: FakeTensorMode) -> Iterator[None]:
    """Around ``algorithm.setup``: the VAE the reward decoder loads (distill.PixelDecoder, through
    ``raygrpo.models.hub.load_component``) is built from ``arch`` on fake tensors in ``fake``, as float32 as the
    learner loads it; no weights are read and no hub is asked."""

    def load_component(source, cls_, subfolder, device, torch_dtype=torch.float32, **kwargs):
        with fake:
            return build_component(arch, subfolder, torch_dtype)

    with mock.patch("raygrpo.models.hub.load_component", load_component), mock.patch("raygrpo.models.hub.pretrained_source", lambda *a: ""):
        yield


def held_tensors(algorithm: StudentAlgorithm) -> dict[str, list[torch.Tensor]]:
    """What the student algorithm keeps on the rank across steps outside its parameter shadows, by part name:
    the fake score's AdamW states (distill.ShadowOptimizer makes them at construction, so they are there before the
    first step) and the pixel reward's VAE. Call inside the fake mode, before the window."""
    held = {}
    fake_score = getattr(algorithm, "fake_optimizer", None)  # Diff-Instruct*'s ShadowOptimizer
    if fake_score is not None:
        optimizer = fake_score.optimizer
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")) and not isinstance(state["step"], FakeTensor):
                # Made at construction, outside the fake mode: AdamW reads it with item(), which a fake tensor
                # answers only for a constant made inside the mode.
                with unset_fake_temporarily():
                    count = float(state["step"])
                state["step"] = torch.tensor(count)
        states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        held["fake score AdamW states"] = [t for t in states if t.dim()]  # the moments; not the 0-dim step counts
    decoder = getattr(algorithm.reward, "decoder", None)  # reward_source: pixel
    if decoder is not None:
        held["reward VAE (float32)"] = [*decoder.vae.parameters(), *decoder.vae.buffers()]
    return held


def fake_window(
    config: Config, arch: Architecture, algorithm: StudentAlgorithm, adapter, groups: int
) -> tuple[list[WindowGroup], StepDraws]:
    """A window of learner rank 0 of ``groups`` whole groups and their draws: every member, latents and conditioning
    of zeros at the config's shapes, the algorithm's own draws."""
    algo = config.algorithm
    members = algo.group_size
    spec = algorithm.spec
    sigmas = np.asarray(adapter.sigma_grid(spec.sampler, config.rollout.num_steps, config.rollout.shift), np.float32)  # [T+1]
    cond = conditioning(config, arch, adapter)
    latents = np.zeros((members, *adapter.latent_shape), np.float32)  # [G, ...]
    rollouts = [Rollout(PromptGroup(k, k, PROMPT, members, k, 0), 0, cond, sigmas, latents) for k in range(groups)]
    draws = algorithm.draw(np.random.default_rng(config.run.seed), groups, members, rollouts[0])
    advantages = np.zeros((len(config.rewards), members), np.float32)  # [K, G]
    weights = np.ones(len(config.rewards), np.float32)  # [K]
    rows = np.arange(members)
    trains = [TrainGroup(rollout, k, advantages, weights, rows) for k, rollout in enumerate(rollouts)]
    return [WindowGroup(k, train, train.rollout, rows, draws.per_group[k]) for k, train in enumerate(trains)], draws


def train_window(algorithm: StudentAlgorithm, adapter, window: list[WindowGroup], draws: StepDraws) -> None:
    """The learner's optimizer step up to its AdamW step: every loss term of the window, a backward each
    (raygrpo/learner/learner.py ``_train_window``). FSDP's gradient sync stays as the caller set it: off, as the
    planner measures every algorithm's terms (a rank holding whole float32 gradients before the window's
    reduce-scatter, more than after it); so the fake score's DSM backward leaves its gradients unsharded and its
    AdamW step has none to apply (its states are held all the same: :func:`held_tensors`)."""
    for term in algorithm.loss_terms(adapter, window, draws):
        term.loss.backward()


@contextmanager
def each_forward(adapter, before: Callable[[], None], no_grad: Callable[[Callable], torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``before()`` runs before each of the adapter's network forwards (the memory tracker
    takes one root forward per iteration: its per-module statistics are reset between them), and the forwards
    without gradients run through ``no_grad`` (which counts their FLOPs)."""
    velocity = adapter.velocity

    def tracked(*args, **kwargs):
        before()
        if torch.is_grad_enabled():
            return velocity(*args, **kwargs)
        return no_grad(lambda: velocity(*args, **kwargs))

    with mock.patch.object(adapter, "velocity", tracked):
        yield


__all__ = ["each_forward", "fake_window", "held_tensors", "is_student", "stand_in_decoder", "train_window", "window_groups_of"]
