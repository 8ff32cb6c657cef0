"""A tiny random FLUX.1 Kontext pipeline: the tiny FLUX.1 build's components as a ``FluxKontextPipeline``.

FLUX.1 Kontext [dev] is FLUX.1's 12B transformer fine-tuned for editing from a FLUX.1 text-to-image checkpoint,
with FLUX.1's VAE, CLIP and T5 (Black Forest Labs, arXiv 2506.15742); diffusers' ``FluxKontextPipeline`` takes
exactly ``FluxPipeline``'s components. So the tiny Kontext build is :func:`raygrpo.models.tiny.build_tiny_flux`'s
folder loaded back as a ``FluxKontextPipeline`` (which checks that the FLUX folder loads as one) and saved
with that pipeline's ``model_index.json``, so that ``model.family: flux_kontext`` finds the class it expects.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from raygrpo.models.tiny import build_tiny_flux, save_tiny_build

TINY_KONTEXT_VERSIONS = {"flux_kontext": "v1"}


def build_tiny_flux_kontext(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random FLUX.1-Kontext-like pipeline into ``folder`` (kept as is if already built).

    The sizes of :func:`~raygrpo.models.tiny.build_tiny_flux` (1 double + 1 single block, 2 heads x 16,
    guidance embedding, a 4-channel x8 VAE, CLIP and T5 of width 32), the same weights for the same
    ``seed``, in a ``FluxKontextPipeline`` folder. Deterministic given ``seed``.
    """
    folder = Path(folder).expanduser()
    if (folder / "model_index.json").is_file():
        return folder  # built already: skip the FLUX build below

    def make(seed_: int):
        from diffusers import FluxKontextPipeline

        # Built outside save_tiny_build's lock (build_tiny_flux takes it too), in a folder of its own.
        return FluxKontextPipeline.from_pretrained(flux_folder), {"from_build": "flux"}

    with tempfile.TemporaryDirectory(prefix="raygrpo-tiny-flux-") as tmp:
        flux_folder = build_tiny_flux(Path(tmp) / "flux", seed=seed)
        return save_tiny_build(folder, seed, "flux_kontext", TINY_KONTEXT_VERSIONS["flux_kontext"], make)


# Registered with the other builds in raygrpo.models.hub (TINY_BUILDERS, TINY_VERSIONS).
TINY_KONTEXT_BUILDERS = {"flux_kontext": build_tiny_flux_kontext}

__all__ = ["TINY_KONTEXT_BUILDERS", "TINY_KONTEXT_VERSIONS", "build_tiny_flux_kontext"]
