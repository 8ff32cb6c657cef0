"""What only the Wan 2.1 image-to-video adapter does: the conditioning image, the checkpoints it takes or refuses
(Wan 2.2, text-to-video, SkyReels-V2 and its diffusion-forcing and V1 cousins), VAE configs of older diffusers.

Everything every adapter does (loading, encoding, noise, velocity, CFG, decode, sampling against
WanImageToVideoPipeline and SkyReelsV2ImageToVideoPipeline) is in tests/test_adapter_contract.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel, WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image
from transformers import CLIPVisionModelWithProjection

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import ModelNotFoundError, WanI2VModel, load_model, tiny_model_folder
from raygrpo.models.wan import vae_compression

PROMPT = "a red fox running through a snowy forest"


def _image(seed: int, size=(40, 48)) -> np.ndarray:
    """A smooth random picture, not of the output size."""
    small = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size[::-1], Image.Resampling.BILINEAR))


@pytest.fixture(scope="module", params=["wan_i2v", "skyreels_v2_i2v"])
def model(request) -> WanI2VModel:
    return load_model("wan_i2v", str(tiny_model_folder(request.param)), num_frames=5, height=32, width=32, max_sequence_length=32)


def test_tiny_build_is_a_wan_i2v_pipeline():
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_model_folder("wan_i2v"))
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    config, z = pipe.transformer.config, pipe.vae.config.z_dim
    assert config.in_channels == z + 4 + z and config.out_channels == z  # noise + mask + image latents
    assert config.image_dim == pipe.image_encoder.config.hidden_size and config.text_dim == pipe.text_encoder.config.d_model


def test_the_conditioning_image_marks_the_first_frame_and_steers_the_velocity(model):
    image = _image(1)
    cond = model.encode_prompt(PROMPT, image)
    # The mask channels mark the first video frame: the whole first latent frame, nothing after.
    assert (cond.image_latents[:4, 0] == 1).all() and (cond.image_latents[:4, 1:] == 0).all()
    assert model.encode_prompt(PROMPT, image.copy()).image_latents is cond.image_latents  # cached per image content
    latents = model.initial_noise(torch.Generator().manual_seed(1), 2)
    sigmas = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        this = model.velocity(latents, sigmas, ConditioningBatch.of(cond, 2), guidance_scale=1.0)
        other = model.velocity(latents, sigmas, ConditioningBatch.of(model.encode_prompt(PROMPT, _image(3)), 2), guidance_scale=1.0)
        with pytest.raises(ValueError, match="image_latents"):
            model.velocity(latents, sigmas, ConditioningBatch(prompt_embeds=ConditioningBatch.of(cond, 2).prompt_embeds))
    assert not torch.allclose(this, other, atol=1e-4)
    with pytest.raises(ValueError, match="without a conditioning image.*jsonl"):
        model.encode_prompt(PROMPT)
    with pytest.raises(ValueError, match=r"uint8 array \[H, W, 3\]"):
        model.encode_prompt(PROMPT, np.zeros((32, 32), np.uint8))


def test_video_geometry():
    learner = load_model("wan_i2v", "tiny-random", load_text_encoders=False, load_vae=False, num_frames=9, height=64, width=32)
    assert learner.latent_shape == (8, 3, 8, 4)
    with pytest.raises(ValueError, match="4k\\+1"):
        WanI2VModel(learner.transformer, num_frames=4, height=32, width=32)


def test_wan22_and_text_to_video_checkpoints_are_refused(tmp_path):
    # A Wan 2.2 pipeline (two experts, expanded timesteps) is refused before any weights load.
    wan22 = tmp_path / "wan22"
    shutil.copytree(tiny_model_folder("wan_i2v"), wan22)
    index = (wan22 / "model_index.json").read_text().replace('"expand_timesteps": false', '"expand_timesteps": true')
    (wan22 / "model_index.json").write_text(index)
    with pytest.raises(ModelNotFoundError, match="Wan 2.2"):
        WanI2VModel.from_pretrained(str(wan22))
    # A text-to-video transformer (no image cross-attention) is not an i2v model.
    t2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=8,
                                text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1)  # fmt: skip
    with pytest.raises(ValueError, match="text-to-video"):
        WanI2VModel(t2v, num_frames=5, height=32, width=32)


def test_a_wan21_vae_config_without_scale_factors_loads(tmp_path):
    """The Wan 2.1 Diffusers repositories' vae/config.json predate scale_factor_spatial/_temporal: the learner
    view (no VAE weights) derives them from the architecture."""
    folder = tmp_path / "wan21"
    shutil.copytree(tiny_model_folder("wan_i2v"), folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    del config["scale_factor_spatial"], config["scale_factor_temporal"]
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    learner = WanI2VModel.from_pretrained(str(folder), load_text_encoders=False, load_vae=False, num_frames=9, height=64, width=32)
    assert (learner.spatial_compression, learner.temporal_compression) == (8, 4) and learner.latent_shape == (8, 3, 8, 4)
    # Other geometries follow too: no temporal halving in the first two blocks, a patchifying VAE (Wan 2.2's).
    assert vae_compression({"dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, False, True]}) == (8, 2)
    assert vae_compression({"dim_mult": [1, 2, 4], "temperal_downsample": [True, True], "patch_size": 2}) == (8, 4)
    assert vae_compression({}) == (8, 4)  # diffusers' defaults: Wan 2.1's [1, 2, 4, 4] and [False, True, True]
    assert vae_compression({"scale_factor_spatial": 16, "scale_factor_temporal": 4, "dim_mult": [1, 2]}) == (16, 4)


# ------------------------------------------------------------------------------- SkyReels-V2 image-to-video


def test_skyreels_v2_i2v_is_detected_and_its_relatives_refused(tmp_path):
    """A SkyReels-V2 I2V folder loads its own classes; the diffusion-forcing variants and SkyReels-V1
    (HunyuanVideo-based) are refused before any weights load, as is an fps-injecting transformer."""
    folder = tiny_model_folder("skyreels_v2_i2v")
    model = WanI2VModel.from_pretrained(str(folder), load_text_encoders=True, load_vae=False, num_frames=5, height=32, width=32)
    assert model.variant.name == "SkyReels-V2" and model.latent_shape == (8, 2, 4, 4)
    assert type(model.transformer) is SkyReelsV2Transformer3DModel and type(model.image_encoder) is CLIPVisionModelWithProjection
    for name, message in [("SkyReelsV2DiffusionForcingImageToVideoPipeline", "diffusion forcing"),
                          ("HunyuanSkyreelsImageToVideoPipeline", "HunyuanVideo-based")]:  # fmt: skip
        other = tmp_path / name
        shutil.copytree(folder, other)
        index = json.loads((other / "model_index.json").read_text())
        (other / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
        with pytest.raises(ModelNotFoundError, match=message):
            WanI2VModel.from_pretrained(str(other))
    fps = SkyReelsV2Transformer3DModel.from_config({**model.transformer.config, "inject_sample_info": True})
    with pytest.raises(ValueError, match="diffusion-forcing"):
        WanI2VModel(fps, num_frames=5, height=32, width=32)
