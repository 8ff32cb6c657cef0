"""The guard's held-out samples, drawn on a rollout worker with the weights it holds (the current policy).

Sampling is raygrpo.eval's (:func:`raygrpo.eval.sample_final`): a deterministic ODE over the whole grid, with
held-out prompt ``p``'s ``N`` initial noises from ``SeedSequence([seed, p])`` (:func:`raygrpo.eval.prompt_generator`),
the same in every guard round, so two rounds differ only by the network's weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from raygrpo.eval import prompt_generator, sample_final


@dataclass(frozen=True)
class HeldOutRequest:
    """Held-out prompts for one rollout worker to sample."""

    prompts: list[str]
    prompt_ids: list[int]  # each prompt's index in the guard's prompt set: it fixes the prompt's noise
    samples_per_prompt: int
    seed: int
    sampler: str  # one of raygrpo.sampling.ODE_SOLVERS
    num_steps: int
    shift: float
    batch_size: int
    images: list[np.ndarray] | None = None  # each prompt's conditioning image [H0, W0, 3] uint8 (editing, i2v); None: text only


@dataclass
class HeldOutSamples:
    """What a worker sampled: ``latents [P, N, ...]`` float32 and ``media [P, N, H, W, 3]`` uint8 (videos
    ``[P, N, F, H, W, 3]``), made with the weights of ``policy_version``."""

    policy_version: int
    latents: np.ndarray
    media: np.ndarray


def sample_held_out(model, request: HeldOutRequest, policy_version: int) -> HeldOutSamples:
    """Sample every prompt of ``request`` with ``model`` (a family adapter holding the current weights)."""
    sigmas = model.sigma_grid(request.sampler, request.num_steps, request.shift).to(model.device)  # [T+1]
    latents, media = [], []
    for i, (prompt_id, prompt) in enumerate(zip(request.prompt_ids, request.prompts)):
        noise = model.initial_noise(prompt_generator(request.seed, prompt_id), request.samples_per_prompt)  # [N, ...]
        image = request.images[i] if request.images is not None else None
        final, images = sample_final(model, prompt, noise, sigmas, request.sampler, request.batch_size, image)
        latents.append(final.numpy())  # [N, ...]
        media.append(images)  # [N, H, W, 3]
    return HeldOutSamples(policy_version, np.stack(latents), np.stack(media))


def split_request(request: HeldOutRequest, parts: int) -> list[HeldOutRequest]:
    """``request`` as up to ``parts`` requests of consecutive prompts (one per rollout worker), none empty."""
    bounds = np.linspace(0, len(request.prompts), min(parts, len(request.prompts)) + 1).round().astype(int)
    parts = zip(bounds[:-1], bounds[1:])
    images = request.images  # each prompt's conditioning image goes with it
    return [
        dataclasses.replace(
            request, prompts=request.prompts[a:b], prompt_ids=request.prompt_ids[a:b], images=None if images is None else images[a:b]
        )
        for a, b in parts
    ]
