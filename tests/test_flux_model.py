"""What only the FLUX adapter does: packed latents, default sizes, the tiny build's layout.

Everything every adapter does (loading, encoding, noise, velocity, decode, sampling against FluxPipeline)
is in tests/test_adapter_contract.py.
"""

from __future__ import annotations

from diffusers import FluxPipeline

from raygrpo.models import FluxModel, tiny_model_folder


def test_tiny_flux_is_guidance_distilled_with_the_real_vae_geometry():
    pipe = FluxPipeline.from_pretrained(tiny_model_folder("flux"))
    assert pipe.transformer.config.guidance_embeds  # as FLUX.1-dev: the guidance enters an embedding
    assert pipe.vae_scale_factor == 8


def test_latents_are_2x2_packed_tokens_and_sizes_default_per_source():
    folder = tiny_model_folder("flux")
    learner = FluxModel.from_pretrained(str(folder), load_text_encoders=False, load_vae=False, height=128, width=96)
    # 128x96 px -> 16x12 latent pixels of 4 channels -> 8x6 tokens of 2x2x4 values.
    assert learner.unpacked_latent_shape == (4, 16, 12) and learner.latent_shape == (8 * 6, 16)
    assert FluxModel.from_pretrained(str(folder), load_text_encoders=False, load_vae=False).height == 512  # a real folder: 512 px
    assert FluxModel.from_pretrained("tiny-random", load_text_encoders=False, load_vae=False).width == 64  # the tiny build: 64 px
