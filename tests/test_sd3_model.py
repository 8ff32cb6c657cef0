"""What only the SD3 adapter does: the tiny build's encoder widths, the position table's size limit, and a
learner without text encoders that is asked for CFG.

Everything every adapter does (loading, encoding, noise, velocity, CFG, decode, sampling against
StableDiffusion3Pipeline) is in tests/test_adapter_contract.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import SD3Model, load_model, tiny_model_folder

CFG = 4.5


def test_tiny_sd3_combines_its_encoders_as_sd3_does():
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_folder("sd3"))
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    # The widths encode_prompt combines: CLIP-L and CLIP-G hidden states side by side, zero-padded to
    # the T5 width, which is the transformer's text width; the pooled vector is both CLIP projections.
    clip_sum = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    config = pipe.transformer.config
    assert clip_sum < pipe.text_encoder_3.config.d_model == config.joint_attention_dim  # the padding is exercised
    projections = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert config.pooled_projection_dim == projections
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    assert pipe.tokenizer_2.pad_token == "!"  # SD3's CLIP-G tokenizer quirk


def test_sizes_default_to_the_native_size_and_stop_at_the_position_table():
    assert load_model("sd3", "tiny-random", load_text_encoders=False, load_vae=False).height == 64  # min(512, native 64)
    learner = load_model("sd3", "tiny-random", load_text_encoders=False, load_vae=False, height=128, width=96, guidance_scale=1.0)
    assert learner.latent_shape == (16, 16, 12)
    with pytest.raises(ValueError, match="256 px"):
        SD3Model(learner.transformer, height=512, width=64)


def test_cfg_without_text_encoders_needs_a_negative():
    rollout = load_model("sd3", "tiny-random")
    learner = SD3Model.from_pretrained(str(tiny_model_folder("sd3")), load_text_encoders=False, load_vae=False, guidance_scale=1.0)
    cond = ConditioningBatch.of(rollout.encode_prompt("a red cat"), 1)
    latents = rollout.initial_noise(torch.Generator().manual_seed(2), 1)
    with torch.no_grad():
        learner.velocity(latents, torch.tensor([0.6]), cond)  # no CFG: fine
        with pytest.raises(RuntimeError, match="load_text_encoders=False.*set_negative_conditioning"):
            learner.velocity(latents, torch.tensor([0.6]), cond, guidance_scale=CFG)
