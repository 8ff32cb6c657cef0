"""The Wan 2.1 image-to-video adapter and its tiny random build, checked against diffusers' WanImageToVideoPipeline;
its SkyReels-V2 I2V variant against SkyReelsV2ImageToVideoPipeline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from PIL import Image

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import ModelNotFoundError, WanI2VModel, load_model, quantize_timestep, tiny_model_folder

PROMPT = "a red fox running through a snowy forest"
CFG = 5.0



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("raygrpo-cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, cache_dir, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAYGRPO_CACHE", str(cache_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def tiny_folder(cache_dir) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYGRPO_CACHE", str(cache_dir))
        return tiny_model_folder("wan_i2v")


@pytest.fixture(scope="module")
def pipe(tiny_folder) -> WanImageToVideoPipeline:
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(cache_dir, tiny_folder) -> WanI2VModel:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYGRPO_CACHE", str(cache_dir))
        return WanI2VModel.from_pretrained("tiny-random", max_sequence_length=32)


def _image(seed: int, size=(40, 48)) -> np.ndarray:
    """A smooth random picture (not the square output size, so the resize path is exercised)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size[::-1], Image.Resampling.BILINEAR))


def _batch(model: WanI2VModel, batch: int, image: np.ndarray, prompt: str = PROMPT) -> ConditioningBatch:
    return ConditioningBatch.of(model.encode_prompt(prompt, image), batch)


def test_tiny_build_is_a_wan_i2v_pipeline(tiny_folder, pipe):
    assert tiny_folder.name == "tiny-wan_i2v-v1-seed0"
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4
    config = pipe.transformer.config
    z = pipe.vae.config.z_dim
    assert config.in_channels == z + 4 + z and config.out_channels == z  # noise + mask + image latents
    assert config.image_dim == pipe.image_encoder.config.hidden_size and config.text_dim == pipe.text_encoder.config.d_model


def test_from_pretrained_and_learner_view(model, tiny_folder):
    assert model.family == "wan_i2v" and (model.num_frames, model.height, model.width) == (5, 32, 32)
    assert model.latent_shape == (8, 2, 4, 4) and model.guidance_scale == CFG
    for module in (model.transformer, model.vae, model.text_encoder, model.image_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    learner = load_model("wan_i2v", "tiny-random", load_text_encoders=False, load_vae=False, num_frames=9, height=64, width=32)
    assert learner.vae is None and learner.text_encoder is None and learner.latent_shape == (8, 3, 8, 4)
    with pytest.raises(RuntimeError, match="learner view"):
        learner.encode_prompt(PROMPT, _image(0))
    with pytest.raises(RuntimeError, match="load_vae"):
        learner.decode(torch.zeros(1, *learner.latent_shape))
    with pytest.raises(ValueError, match="without a conditioning image.*jsonl"):
        model.encode_prompt(PROMPT)
    with pytest.raises(ValueError, match=r"uint8 array \[H, W, 3\]"):
        model.encode_prompt(PROMPT, np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="4k\\+1"):
        WanI2VModel(learner.transformer, num_frames=4, height=32, width=32)


def test_incomplete_folder_and_wrong_checkpoints_are_clear_errors(tiny_folder, tmp_path, pipe):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial)
    shutil.rmtree(partial / "image_encoder")
    with pytest.raises(ModelNotFoundError, match="no image_encoder/ folder.*incomplete"):
        WanI2VModel.from_pretrained(str(partial))
    # A Wan 2.2 pipeline (two experts) is refused before any weights load.
    wan22 = tmp_path / "wan22"
    shutil.copytree(tiny_folder, wan22)
    index = (wan22 / "model_index.json").read_text().replace('"expand_timesteps": false', '"expand_timesteps": true')
    (wan22 / "model_index.json").write_text(index)
    with pytest.raises(ModelNotFoundError, match="Wan 2.2"):
        WanI2VModel.from_pretrained(str(wan22))
    # A text-to-video transformer (no image cross-attention) is not an i2v model.
    from diffusers import WanTransformer3DModel

    t2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=8,
                                text_dim=32, freq_dim=16, ffn_dim=32, num_layers=1)  # fmt: skip
    with pytest.raises(ValueError, match="text-to-video"):
        WanI2VModel(t2v, num_frames=5, height=32, width=32)


def test_encode_prompt_matches_pipeline(model, pipe):
    image = _image(1)
    cond = model.encode_prompt(PROMPT, image)
    assert cond.prompt_embeds.shape == (32, 32) and cond.prompt_mask is None and cond.pooled_prompt_embeds is None
    assert cond.image_embeds.shape == (17, 16)  # 16 patches + class token, penultimate layer
    assert cond.image_latents.shape == (4 + 8, 2, 4, 4)
    assert model.encode_prompt(PROMPT, image).image_latents is cond.image_latents  # cached per image content
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)
        image_embeds = pipe.encode_image(Image.fromarray(image), "cpu")
        pixels = pipe.video_processor.preprocess(Image.fromarray(image), height=32, width=32).float()
        _, condition = pipe.prepare_latents(pixels, 1, 8, 32, 32, 5, torch.float32, "cpu", None, torch.zeros(1, 8, 2, 4, 4))
    np.testing.assert_allclose(cond.prompt_embeds, embeds[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(cond.image_embeds, image_embeds[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(cond.image_latents, condition[0].numpy(), atol=1e-6)
    # The mask channels mark the first video frame: the whole first latent frame, nothing after.
    assert (cond.image_latents[:4, 0] == 1).all() and (cond.image_latents[:4, 1:] == 0).all()


def test_cfg_is_one_batched_forward_and_the_image_matters(model):
    cond = _batch(model, 2, _image(2))
    latents = model.initial_noise(torch.Generator().manual_seed(1), 2)
    sigmas = torch.tensor([0.9, 0.3])
    forwards = []
    hook = model.transformer.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        with torch.no_grad():
            guided = model.velocity(latents, sigmas, cond)  # None: the model's CFG 5.0
    finally:
        hook.remove()
    assert len(forwards) == 1
    negative = ConditioningBatch(
        prompt_embeds=torch.from_numpy(model.negative_conditioning)[None].expand(2, -1, -1),
        image_embeds=cond.image_embeds,
        image_latents=cond.image_latents,
    )
    with torch.no_grad():
        conditional = model.velocity(latents, sigmas, cond, guidance_scale=1.0)
        unconditional = model.velocity(latents, sigmas, negative, guidance_scale=1.0)
        other_image = model.velocity(latents, sigmas, _batch(model, 2, _image(3)), guidance_scale=1.0)
    torch.testing.assert_close(guided, unconditional + CFG * (conditional - unconditional), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, conditional, atol=1e-4)
    assert not torch.allclose(conditional, other_image, atol=1e-4)  # the conditioning image changes the velocity
    with pytest.raises(ValueError, match="image_latents"):
        model.velocity(latents, sigmas, ConditioningBatch(prompt_embeds=cond.prompt_embeds))


def test_learner_gets_the_cfg_negative_without_its_text_encoder(model, tiny_folder):
    learner = WanI2VModel.from_pretrained(str(tiny_folder), load_text_encoders=False, load_vae=False, num_frames=5, height=32, width=32,
                                          max_sequence_length=32)  # fmt: skip
    assert learner.text_encoder is None
    np.testing.assert_allclose(learner.negative_conditioning, model.negative_conditioning, atol=1e-6)
    assert learner.text_encoder is None  # loaded for the negative only, then dropped
    cond = _batch(model, 1, _image(4))
    latents = model.initial_noise(torch.Generator().manual_seed(2), 1)
    with torch.no_grad():
        torch.testing.assert_close(learner.velocity(latents, torch.tensor([0.6]), cond), model.velocity(latents, torch.tensor([0.6]), cond))
    learner.transformer.requires_grad_(True)
    learner.velocity(latents, torch.tensor([0.6]), cond).square().mean().backward()
    assert all(p.grad is not None for p in learner.transformer.parameters())


def test_euler_sampling_with_cfg_and_decode_match_the_pipeline(model, tiny_folder):
    # The i2v pipeline takes no custom sigmas, so its scheduler is handed the grid: shift 1 keeps it as given,
    # and dyadic sigmas make the pipeline's timesteps sigma*1000 equal the quantised ones.
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    steps = 4
    sigmas = torch.linspace(1, 0, steps + 1)
    assert torch.equal(quantize_timestep(sigmas) * 1000, sigmas * 1000)
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda num_steps, device=None: set_timesteps(sigmas=sigmas[:-1].tolist(), device=device)
    image = _image(5)
    noise = model.initial_noise(torch.Generator().manual_seed(11), 2)
    cond = _batch(model, 2, image)
    latents = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas):
            latents = latents + (sigma_next - sigma) * model.velocity(latents, sigma.expand(2), cond)
    videos = model.decode(latents)

    kwargs = {
        "image": Image.fromarray(image), "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": steps,
        "guidance_scale": CFG, "max_sequence_length": 32,
    }  # fmt: skip
    # Two prompts rather than num_videos_per_prompt=2: the pipeline repeats the image states per prompt only.
    reference_latents = pipe(prompt=[PROMPT, PROMPT], latents=noise.clone(), output_type="latent", **kwargs).frames
    reference = pipe(prompt=[PROMPT, PROMPT], latents=noise.clone(), output_type="np", **kwargs).frames
    assert torch.equal(pipe.scheduler.sigmas, sigmas)  # the pipeline really sampled on this grid
    torch.testing.assert_close(latents, reference_latents, atol=1e-5, rtol=1e-5)
    assert videos.shape == (2, 5, 32, 32, 3) and videos.dtype == np.uint8
    expected = (np.asarray(reference) * 255).round().astype(np.uint8)
    assert np.abs(videos.astype(int) - expected.astype(int)).max() <= 1


# ------------------------------------------------------------------------------- VAE configs of older diffusers


def test_a_wan21_vae_config_without_scale_factors_loads(tiny_folder, tmp_path):
    """The Wan 2.1 Diffusers repositories' vae/config.json predate scale_factor_spatial/_temporal: the learner
    view (no VAE weights) derives them from the architecture."""
    from raygrpo.models.wan import vae_compression

    folder = tmp_path / "wan21"
    shutil.copytree(tiny_folder, folder)
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


@pytest.fixture(scope="module")
def skyreels_folder(cache_dir) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYGRPO_CACHE", str(cache_dir))
        return tiny_model_folder("skyreels_v2_i2v")


def test_skyreels_v2_i2v_is_served_by_the_wan_adapter(skyreels_folder, tmp_path):
    """A SkyReels-V2 I2V folder loads its own classes, conditions as its pipeline does, and the image steers it."""
    from diffusers import SkyReelsV2ImageToVideoPipeline, SkyReelsV2Transformer3DModel
    from transformers import CLIPVisionModelWithProjection

    sizes = {"num_frames": 5, "height": 32, "width": 32, "max_sequence_length": 32}
    model = WanI2VModel.from_pretrained(str(skyreels_folder), **sizes)
    assert model.variant.name == "SkyReels-V2" and model.latent_shape == (8, 2, 4, 4)
    assert type(model.transformer) is SkyReelsV2Transformer3DModel and type(model.image_encoder) is CLIPVisionModelWithProjection
    pipe = SkyReelsV2ImageToVideoPipeline.from_pretrained(skyreels_folder)
    image = _image(6)
    cond = model.encode_prompt(PROMPT, image)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)
        image_embeds = pipe.encode_image(Image.fromarray(image), "cpu")  # through its CLIPProcessor
        pixels = pipe.video_processor.preprocess(Image.fromarray(image), height=32, width=32).float()
        _, condition = pipe.prepare_latents(pixels, 1, 8, 32, 32, 5, torch.float32, "cpu", None, torch.zeros(1, 8, 2, 4, 4))
    np.testing.assert_allclose(cond.prompt_embeds, embeds[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(cond.image_embeds, image_embeds[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(cond.image_latents, condition[0].numpy(), atol=1e-6)
    latents = model.initial_noise(torch.Generator().manual_seed(3), 2)
    sigmas = torch.tensor([0.8, 0.4])
    learner = WanI2VModel.from_pretrained(str(skyreels_folder), load_text_encoders=False, load_vae=False, **sizes)
    with torch.no_grad():
        guided = model.velocity(latents, sigmas, ConditioningBatch.of(cond, 2))
        other_image = model.velocity(latents, sigmas, _batch(model, 2, _image(7)))
        torch.testing.assert_close(learner.velocity(latents, sigmas, ConditioningBatch.of(cond, 2)), guided)
    assert guided.shape == (2, 8, 2, 4, 4) and not torch.allclose(guided, other_image, atol=1e-4)
    # The diffusion-forcing variants and SkyReels-V1 (HunyuanVideo-based) are refused before any weights load.
    for name, message in [("SkyReelsV2DiffusionForcingImageToVideoPipeline", "diffusion forcing"),
                          ("HunyuanSkyreelsImageToVideoPipeline", "HunyuanVideo-based")]:  # fmt: skip
        other = tmp_path / name
        shutil.copytree(skyreels_folder, other)
        index = json.loads((other / "model_index.json").read_text())
        (other / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
        with pytest.raises(ModelNotFoundError, match=message):
            WanI2VModel.from_pretrained(str(other))
    fps = SkyReelsV2Transformer3DModel.from_config({**model.transformer.config, "inject_sample_info": True})
    with pytest.raises(ValueError, match="diffusion-forcing"):
        WanI2VModel(fps, num_frames=5, height=32, width=32)
