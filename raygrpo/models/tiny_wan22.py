"""Tiny, randomly initialised Wan 2.2 pipelines: the two-expert A14B text- and image-to-video layouts and TI2V-5B.

As :mod:`raygrpo.models.tiny_video` (with its tiny Wan 2.1 sizes): the real checkpoints' diffusers
classes and pipeline layouts, saved with ``save_pretrained`` and used only through ``from_pretrained``.

- ``wan_t2v`` (Wan2.2-T2V-A14B's layout): ``WanPipeline`` with ``transformer`` (high-noise expert) and
  ``transformer_2`` (low-noise expert), two independently initialised ``WanTransformer3DModel`` of one
  architecture (no image cross-attention, ``in_channels`` = the VAE's 8 latent channels), ``boundary_ratio``
  0.875 (``wan/configs/wan_t2v_A14B.py``: ``boundary = 0.875``), the Wan 2.1 VAE geometry (x8 space, x4 time);
- ``wan22_i2v`` (Wan2.2-I2V-A14B's layout, a build of the ``wan_i2v`` family): ``WanImageToVideoPipeline``
  with the two experts taking noise + 4 mask + image-latent channels, no CLIP image encoder (Wan 2.2 conditions
  on the image latents alone: its transformers have ``image_dim`` None), ``boundary_ratio`` 0.9
  (``wan_i2v_A14B.py``: ``boundary = 0.900``);
- ``wan22_ti2v`` (Wan2.2-TI2V-5B's layout, a build of ``wan_t2v``): ``WanPipeline`` with one transformer,
  ``expand_timesteps`` True (a timestep per token) and the Wan 2.2 VAE geometry: a residual VAE behind a 2x2
  patchify (x16 space, x4 time; ``is_residual``, ``patch_size`` 2, ``scale_factor_spatial`` 16).

Each ``transformer`` / ``transformer_2`` pair shares its architecture with the tiny Wan 2.1 transformer (2
blocks, 2 heads x 8 dims). Deterministic given the seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raygrpo.models.tiny import build_t5_tokenizer, save_tiny_build, tiny_t5_config

TINY_WAN22_VERSIONS = {"wan_t2v": "v1", "wan22_i2v": "v1", "wan22_ti2v": "v1"}
T2V_BOUNDARY = 0.875  # Wan2.2-T2V-A14B (wan/configs/wan_t2v_A14B.py)
I2V_BOUNDARY = 0.9  # Wan2.2-I2V-A14B (wan/configs/wan_i2v_A14B.py)


def _expert(seed: int, in_channels: int, out_channels: int):
    """One tiny ``WanTransformer3DModel`` of the A14B experts' architecture (no image cross-attention)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()


def _text_and_vae(seed: int) -> dict:
    """Tokenizer, UMT5 encoder (width 32) and Wan 2.1 VAE (8 latent channels, x8 space, x4 time) of the sizes of the
    tiny Wan 2.1 build (raygrpo.models.tiny_video): the A14B models keep Wan 2.1's VAE."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer, z = build_t5_tokenizer(), 8
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1 * (i - z / 2) for i in range(z)],
        latents_std=[1.0 + 0.25 * i for i in range(z)],
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(tiny_t5_config(UMT5Config, tokenizer, 32)).eval()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}


def _scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _build_t2v_a14b(seed: int):
    from diffusers import WanPipeline

    parts = _text_and_vae(seed)
    z = parts["vae"].config.z_dim
    experts = {"transformer": _expert(seed + 10, z, z), "transformer_2": _expert(seed + 11, z, z)}
    # Shift 12: Wan2.2-T2V-A14B's sample_shift (config only here: raygrpo samples on rollout.shift).
    return WanPipeline(scheduler=_scheduler(12.0), boundary_ratio=T2V_BOUNDARY, **experts, **parts), {}


def _build_i2v_a14b(seed: int):
    from diffusers import WanImageToVideoPipeline

    parts = _text_and_vae(seed)
    z = parts["vae"].config.z_dim
    experts = {"transformer": _expert(seed + 10, z + 4 + z, z), "transformer_2": _expert(seed + 11, z + 4 + z, z)}
    pipeline = WanImageToVideoPipeline(
        scheduler=_scheduler(5.0), boundary_ratio=I2V_BOUNDARY, image_encoder=None, image_processor=None, **experts, **parts
    )
    return pipeline, {}


def _build_ti2v_5b(seed: int):
    from diffusers import AutoencoderKLWan, WanPipeline

    parts = _text_and_vae(seed)
    z = 12  # the real 48, scaled down as the Wan 2.1 build's 8 stands for 16
    torch.manual_seed(seed + 3)
    parts["vae"] = AutoencoderKLWan(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,  # Wan 2.2's VAE: residual up/down blocks ...
        in_channels=12,  # ... behind a 2x2 patchify of the 3 colour channels
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.05 * (i - z / 2) for i in range(z)],
        latents_std=[1.0 + 0.1 * i for i in range(z)],
    ).eval()
    return WanPipeline(scheduler=_scheduler(5.0), transformer=_expert(seed + 10, z, z), expand_timesteps=True, **parts), {}


def build_tiny_wan_t2v(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Wan2.2-T2V-A14B-layout pipeline (two experts, boundary 0.875) into ``folder`` (kept if built)."""
    return save_tiny_build(folder, seed, "wan_t2v", TINY_WAN22_VERSIONS["wan_t2v"], _build_t2v_a14b)


def build_tiny_wan22_i2v(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Wan2.2-I2V-A14B-layout pipeline (two experts, boundary 0.9, no CLIP) into ``folder``."""
    return save_tiny_build(folder, seed, "wan22_i2v", TINY_WAN22_VERSIONS["wan22_i2v"], _build_i2v_a14b)


def build_tiny_wan22_ti2v(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Wan2.2-TI2V-5B-layout pipeline (one transformer, expanded timesteps, x16 VAE) into ``folder``."""
    return save_tiny_build(folder, seed, "wan22_ti2v", TINY_WAN22_VERSIONS["wan22_ti2v"], _build_ti2v_5b)


# Keyed by tiny build ("wan22_i2v" is a build of wan_i2v, "wan22_ti2v" of wan_t2v); raygrpo.models.hub caches them.
TINY_WAN22_BUILDERS = {"wan_t2v": build_tiny_wan_t2v, "wan22_i2v": build_tiny_wan22_i2v, "wan22_ti2v": build_tiny_wan22_ti2v}

__all__ = [
    "I2V_BOUNDARY",
    "T2V_BOUNDARY",
    "TINY_WAN22_BUILDERS",
    "TINY_WAN22_VERSIONS",
    "build_tiny_wan22_i2v",
    "build_tiny_wan22_ti2v",
    "build_tiny_wan_t2v",
]
