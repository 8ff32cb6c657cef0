"""Padding groups (a short rank's slots filled with copies, raygrpo/learner/shard.py) weigh nothing in what the student
methods train besides their loss terms: RG-LCD's latent reward model fit and Diff-Instruct*'s fake-score step
(raygrpo/algorithms/distill.py ``fit_weights``). Each fit with one real and one padded group equals the fit with the
real group alone, and the padded group still runs its forward and backward (FSDP's collectives stay matched)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from raygrpo.algorithms.base import WindowGroup
from raygrpo.algorithms.di_star import DiffInstructStar
from raygrpo.algorithms.distill import RewardGradient, ShadowOptimizer, fit_weights
from raygrpo.config import load_config
from raygrpo.contracts import TrainGroup
from raygrpo.learner.ema import ParameterShadow
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import split_batch

from .conftest import ROOT

G = 4


def window_group(slot: int, padding: bool, t_fake: np.ndarray | None = None) -> WindowGroup:
    """A window entry carrying only what the auxiliary fits read of it (the padding flag, rows, the fake's levels)."""
    return WindowGroup(slot, None, None, np.arange(G), SimpleNamespace(t_fake=t_fake), padding=padding)


def latents_group(seed: int) -> SimpleNamespace:
    """A group's tensors as distill.window_groups hands them to the LRM fit: latents [G, C, h, w], text, advantages."""
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        x0=torch.randn(G, 4, 4, 4, generator=g), cond=SimpleNamespace(prompt_embeds=torch.randn(G, 3, 8, generator=g)),
        advantages=torch.randn(G, generator=g),
    )  # fmt: skip


def test_the_learner_marks_a_short_ranks_filler_slots_as_padding():
    groups = [TrainGroup(None, k, np.zeros((1, G), np.float32), np.ones(1, np.float32), np.arange(G)) for k in range(3)]
    learner = SimpleNamespace(algorithm=SimpleNamespace(window_samples=lambda world_size: None), world_size=2)
    parts = split_batch(groups, 2)
    flags = [[wg.padding for wg in window] for part in parts for window in Learner._windows(learner, part, [None] * 2, [None] * 2)]
    assert flags == [[False, False], [False, True]]  # 3 groups on 2 ranks: rank 1's second slot is a copy


def test_the_latent_reward_model_fit_leaves_padding_out():
    config = load_config(ROOT / "cluster" / "tiny_rg_lcd.yaml")
    assert config.algorithm.reward_source == "latent"
    real, other = latents_group(1), latents_group(2)

    def fitted(groups: list, padding: list[bool]) -> dict[str, torch.Tensor]:
        reward = RewardGradient(config, None, "cpu")  # the same seeded LRM each time
        loss = reward.fit(groups, fit_weights([window_group(k, p) for k, p in enumerate(padding)]), steps=3)
        assert loss is not None and torch.isfinite(loss)
        return reward.lrm.state_dict()

    alone = fitted([real], [False])
    padded = fitted([real, other], [False, True])
    both = fitted([real, other], [False, False])
    assert all(torch.equal(alone[k], padded[k]) for k in alone)
    assert any(not torch.allclose(alone[k], both[k]) for k in alone)  # the second group, real, does move the LRM


def test_the_fake_score_step_leaves_padding_out():
    """Diff-Instruct*'s fake-score DSM step (ShadowOptimizer through the live network) on a toy velocity network."""
    torch.manual_seed(0)
    network = torch.nn.Conv2d(4, 4, 3, padding=1)
    g = torch.Generator().manual_seed(3)
    x0 = [torch.randn(G, 4, 4, 4, generator=g) for _ in range(2)]  # the generator's samples per group
    eps = [torch.randn(2, G, 4, 4, 4, generator=g) for _ in range(2)]  # [2, G, ...]: the divergence's, the fake's
    t_fake = [np.linspace(0.2, 0.8, G), np.linspace(0.1, 0.9, G)]
    algorithm = DiffInstructStar.__new__(DiffInstructStar)  # _fake_loss reads the model and the device alone
    algorithm.model = SimpleNamespace(velocity=lambda x, t, cond: network(x) * t.reshape(-1, 1, 1, 1))
    algorithm.device = "cpu"
    start = [p.detach().clone() for p in network.parameters()]

    def stepped(groups: list[int], padding: list[bool]) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, value in zip(network.parameters(), start):
                p.copy_(value)
        shadow = ParameterShadow(list(network.parameters()))  # the fake score, starting as the network
        optimizer = ShadowOptimizer(shadow, lr=0.1, betas=(0.9, 0.999), max_grad_norm=10.0)
        window = [window_group(slot, p, t_fake[k]) for slot, (k, p) in enumerate(zip(groups, padding))]
        weights = fit_weights(window)
        tensors = [SimpleNamespace(cond=None)] * len(groups)  # the conditioning, unused by the toy network
        loss = optimizer.step(lambda: algorithm._fake_loss(window, tensors, [x0[k] for k in groups], [eps[k] for k in groups], weights))
        assert torch.isfinite(loss)
        return [v.clone() for v in shadow.values]

    alone = stepped([0], [False])
    padded = stepped([0, 1], [False, True])
    both = stepped([0, 1], [False, False])
    assert all(torch.equal(a, b) for a, b in zip(alone, padded))
    assert not all(torch.allclose(a, b) for a, b in zip(alone, both))
    assert all(torch.equal(p, s) for p, s in zip(network.parameters(), start))  # the live weights are untouched
