"""Diversity of the guard's held-out samples: within each prompt's samples and across prompts.

A collapsing policy (every image of every prompt the same smooth pattern) shows here before any reward
says so. Two feature spaces, the same distance:

* ``latent``: the final latents as the sampler left them (before decoding), flattened;
* ``pixels``: a downsampled-pixel embedding of the decoded media: each image (each frame of a video)
  area-averaged to ``EMBED_SIZE x EMBED_SIZE`` RGB, values / 255, flattened (16 x 16 x 3 = 768 numbers per
  image). Fixed, model-free and deterministic, so rounds and runs compare; it sees layout and colour, not
  fine texture. (No learned embedding: none ships offline here, and a reward-model embedding could be
  fooled by the very hacking the guard is meant to catch.)

The distance of two feature vectors ``a, b`` of ``D`` numbers is their RMS difference
``d(a, b) = ||a - b||_2 / sqrt(D)`` (independent of the resolution). For ``P`` prompts of ``N`` samples:

    within = mean over prompts p of  mean_{i < j} d(x_pi, x_pj)          (needs N >= 2)
    across = mean over pairs of samples of different prompts of d(x_pi, x_qj)   (needs P >= 2)

NaN when there are no such pairs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

EMBED_SIZE = 16


def pixel_embedding(media: np.ndarray, size: int = EMBED_SIZE) -> np.ndarray:
    """``[P, N, D]`` features of ``media`` ``[P, N, H, W, 3]`` (or videos ``[P, N, F, H, W, 3]``) uint8:
    each image area-averaged to ``size x size`` RGB in [0, 1], a video's frames one after another."""
    p, n = media.shape[:2]
    h, w = media.shape[-3:-1]
    images = torch.from_numpy(np.ascontiguousarray(media)).reshape(-1, h, w, 3).permute(0, 3, 1, 2).float() / 255.0  # [M, 3, H, W]
    small = F.adaptive_avg_pool2d(images, (min(size, h), min(size, w)))  # [M, 3, s, s]
    return small.reshape(p, n, -1).numpy().astype(np.float64)  # [P, N, D] (frames of one sample concatenated)


def pairwise_distances(features: np.ndarray) -> np.ndarray:
    """``[M, M]`` RMS distances ``||a - b|| / sqrt(D)`` between the rows of ``features`` ``[M, D]``."""
    x = np.asarray(features, np.float64)
    # Row by row, from the differences: exact 0 for equal samples (a Gram-matrix form cancels to rounding noise),
    # and M x D memory, not M x M x D (a FLUX latent is 262k numbers).
    return np.stack([np.sqrt(np.mean((x - row) ** 2, axis=1)) for row in x])  # [M, M]


def diversity(features: np.ndarray) -> tuple[float, float]:
    """``(within, across)`` of ``features`` ``[P, N, ...]`` (see the module docstring)."""
    p, n = features.shape[:2]
    flat = np.asarray(features, np.float64).reshape(p * n, -1)  # [P*N, D]
    d = pairwise_distances(flat)  # [P*N, P*N]
    prompt = np.repeat(np.arange(p), n)  # [P*N] each sample's prompt
    same = prompt[:, None] == prompt[None, :]
    upper = np.triu(np.ones_like(same), k=1)
    within_pairs = same & upper
    within = float("nan") if n < 2 else float(np.mean([d[within_pairs & (prompt[:, None] == q)].mean() for q in range(p)]))
    across_pairs = ~same & upper
    across = float(d[across_pairs].mean()) if across_pairs.any() else float("nan")
    return within, across


def diversity_signals(latents: np.ndarray, media: np.ndarray) -> dict[str, float]:
    """The four diversity signals of one guard round (raygrpo.config.GUARD_DIVERSITY_SIGNALS)."""
    signals = {}
    for space, features in (("latent", latents), ("pixels", pixel_embedding(media))):
        signals[f"diversity/{space}/within"], signals[f"diversity/{space}/across"] = diversity(features)
    return signals
