"""What only the HunyuanVideo adapter does: the tiny build's chat template, video geometry, default frames.

Everything every adapter does (loading, encoding, noise, velocity with its embedded guidance, decode,
sampling against HunyuanVideoPipeline) is in tests/test_adapter_contract.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from diffusers import HunyuanVideoPipeline

from raygrpo.models import HunyuanVideoModel, load_model, tiny_model_folder

PROMPT = "a red fox running through a snowy forest"


def test_tiny_build_crops_its_own_chat_template():
    folder = tiny_model_folder("hunyuan_video")
    template = json.loads((folder / "raygrpo_tiny.json").read_text())["prompt_template"]
    pipe = HunyuanVideoPipeline.from_pretrained(folder)
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4  # the real geometry
    assert pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.text_embed_dim == pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder_2.config.hidden_size
    # crop_start is where the user prompt starts inside the chat template, for this tokenizer.
    ids = pipe.tokenizer(template["template"].format(PROMPT))["input_ids"]
    crop = template["crop_start"]
    assert pipe.tokenizer.decode(ids[crop:]).startswith(PROMPT)
    assert PROMPT.split()[0] not in pipe.tokenizer.decode(ids[:crop]).split("\n")[-1]
    # The adapter reads that template: its mask marks the prompt's tokens first, then padding.
    mask = load_model("hunyuan_video", "tiny-random", max_sequence_length=32).encode_prompt(PROMPT).prompt_mask
    assert 0 < mask.sum() < 32 and mask[0] == 1 and not mask[int(mask.sum()) :].any()


def test_video_geometry_and_default_frames():
    folder = tiny_model_folder("hunyuan_video")
    learner = load_model("hunyuan_video", "tiny-random", load_text_encoders=False, load_vae=False, height=64, width=48, num_frames=9)
    assert learner.latent_shape == (4, 3, 8, 6)  # 9 frames -> 3 latent frames, 64x48 px -> 8x6 latent px
    real = load_model("hunyuan_video", str(folder), load_text_encoders=False, load_vae=False, num_frames=None)
    assert real.num_frames == 53 and real.height == 480  # a real folder: DanceGRPO's recipe
    with pytest.raises(ValueError, match="4k\\+1.*use 5 or 9"):
        HunyuanVideoModel(learner.transformer, num_frames=6, height=32, width=32)


def test_learner_view_of_a_vae_config_without_compression_ratios(tmp_path):
    """A vae/config.json without the compression ratios (left to the class defaults) still gives the learner its geometry."""
    folder = tmp_path / "trimmed"
    shutil.copytree(tiny_model_folder("hunyuan_video"), folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    del config["spatial_compression_ratio"], config["temporal_compression_ratio"]
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    learner = HunyuanVideoModel.from_pretrained(str(folder), load_text_encoders=False, load_vae=False, num_frames=9, height=64, width=48)
    assert (learner.spatial_compression, learner.temporal_compression) == (8, 4) and learner.latent_shape == (4, 3, 8, 6)
