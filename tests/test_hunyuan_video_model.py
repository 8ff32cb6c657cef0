"""The HunyuanVideo adapter and its tiny random build, checked against diffusers' HunyuanVideoPipeline."""

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
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import HunyuanVideoModel, ModelNotFoundError, load_model, quantize_timestep, tiny_model_folder

PROMPT = "a red fox running through a snowy forest"
GUIDANCE = 6.0



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
        return tiny_model_folder("hunyuan_video")


@pytest.fixture(scope="module")
def template(tiny_folder) -> dict:
    return json.loads((tiny_folder / "raygrpo_tiny.json").read_text())["prompt_template"]


@pytest.fixture(scope="module")
def pipe(tiny_folder) -> HunyuanVideoPipeline:
    pipe = HunyuanVideoPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(cache_dir, tiny_folder) -> HunyuanVideoModel:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYGRPO_CACHE", str(cache_dir))
        return HunyuanVideoModel.from_pretrained("tiny-random", max_sequence_length=32)


def _batch(model: HunyuanVideoModel, batch: int, prompt: str = PROMPT) -> ConditioningBatch:
    return ConditioningBatch.of(model.encode_prompt(prompt), batch)


def test_tiny_build_is_a_hunyuan_video_pipeline(tiny_folder, pipe, template):
    assert tiny_folder.name == "tiny-hunyuan_video-v1-seed0"
    assert tiny_model_folder("hunyuan_video") == tiny_folder  # reused, not rebuilt
    assert pipe.vae_scale_factor_spatial == 8 and pipe.vae_scale_factor_temporal == 4  # the real geometry
    assert pipe.transformer.config.guidance_embeds
    assert pipe.transformer.config.text_embed_dim == pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder_2.config.hidden_size
    # crop_start is where the user prompt starts inside the chat template, for this tokenizer.
    ids = pipe.tokenizer(template["template"].format(PROMPT))["input_ids"]
    crop = template["crop_start"]
    assert pipe.tokenizer.decode(ids[crop:]).startswith(PROMPT)
    assert PROMPT.split()[0] not in pipe.tokenizer.decode(ids[:crop]).split("\n")[-1]


def test_from_pretrained_tiny_random_and_learner_view(model, tiny_folder):
    assert model.family == "hunyuan_video" and (model.num_frames, model.height, model.width) == (5, 32, 32)
    assert model.latent_shape == (4, 2, 4, 4)  # 5 frames -> 2 latent frames, 32 px -> 4 latent px
    for module in (model.transformer, model.vae, model.text_encoder, model.text_encoder_2):
        assert not module.training and not any(p.requires_grad for p in module.parameters())

    learner = load_model("hunyuan_video", "tiny-random", load_text_encoders=False, load_vae=False, height=64, width=48, num_frames=9)
    assert isinstance(learner, HunyuanVideoModel) and learner.vae is None and learner.text_encoder is None
    assert learner.latent_shape == (4, 3, 8, 6)
    assert load_model("hunyuan_video", str(tiny_folder), num_frames=None).num_frames == 53  # a real folder: the recipe's 53
    with pytest.raises(RuntimeError, match="load_text_encoders"):
        learner.encode_prompt("x")
    with pytest.raises(RuntimeError, match="load_vae"):
        learner.decode(torch.zeros(1, *learner.latent_shape))
    with pytest.raises(ValueError, match="4k\\+1.*use 5 or 9"):
        HunyuanVideoModel(learner.transformer, num_frames=6, height=32, width=32)
    with pytest.raises(ValueError, match="multiples of 16"):
        HunyuanVideoModel(learner.transformer, num_frames=5, height=40, width=32)
    with pytest.raises(ValueError, match="text-to-video"):
        model.encode_prompt(PROMPT, np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="video families"):
        load_model("flux", "tiny-random", num_frames=5)


def test_incomplete_folder_is_a_clear_error(tiny_folder, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelNotFoundError, match="no vae/ folder.*incomplete"):
        HunyuanVideoModel.from_pretrained(str(partial))
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        HunyuanVideoModel.from_pretrained(str(partial / "transformer"))


def test_learner_view_of_a_vae_config_without_compression_ratios(tiny_folder, tmp_path):
    """A vae/config.json without the compression ratios (left to the class defaults) still gives the learner its geometry."""
    folder = tmp_path / "trimmed"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    del config["spatial_compression_ratio"], config["temporal_compression_ratio"]
    (folder / "vae" / "config.json").write_text(json.dumps(config))
    learner = HunyuanVideoModel.from_pretrained(str(folder), load_text_encoders=False, load_vae=False, num_frames=9, height=64, width=48)
    assert (learner.spatial_compression, learner.temporal_compression) == (8, 4) and learner.latent_shape == (4, 3, 8, 6)


def test_encode_prompt_matches_pipeline_and_is_cached(model, pipe, template):
    first = model.encode_prompt(PROMPT)
    assert model.encode_prompt(PROMPT) is first
    assert first.prompt_embeds.shape == (32, 32) and first.prompt_embeds.dtype == np.float32
    assert first.prompt_mask.shape == (32,) and first.prompt_mask.dtype == np.int64
    assert 0 < first.prompt_mask.sum() < 32 and first.prompt_mask[0] == 1  # real tokens first, then padding
    assert first.pooled_prompt_embeds.shape == (16,)
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(PROMPT, prompt_template=template, max_sequence_length=32)
    np.testing.assert_allclose(first.prompt_embeds, embeds[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(first.prompt_mask, mask[0].numpy())
    np.testing.assert_allclose(first.pooled_prompt_embeds, pooled[0].numpy(), atol=1e-6)


def test_initial_noise_is_pipeline_noise(model, pipe):
    noise = model.initial_noise(torch.Generator().manual_seed(3), 2)
    reference = pipe.prepare_latents(2, 4, 32, 32, 5, torch.float32, "cpu", torch.Generator().manual_seed(3))
    assert noise.shape == (2, 4, 2, 4, 4) and torch.equal(noise, reference)


def test_velocity_is_the_pipeline_transformer_call_with_quantised_timestep(model, pipe):
    cond = _batch(model, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(0), 2)
    sigmas = torch.tensor([0.5371, 0.25])

    def direct(timestep, guidance):
        return pipe.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.prompt_mask.float(), pooled_projections=cond.pooled_prompt_embeds,
            guidance=torch.full((2,), guidance * 1000.0), return_dict=False,
        )[0]  # fmt: skip

    with torch.no_grad():
        velocity = model.velocity(latents, sigmas, cond, guidance_scale=GUIDANCE)
        expected = direct(torch.tensor([537.0, 250.0]), GUIDANCE)
        unquantised = direct(sigmas * 1000, GUIDANCE)
        other_guidance = model.velocity(latents, sigmas, cond, guidance_scale=1.0)
        assert torch.equal(model.velocity(latents, sigmas, cond), velocity)  # None: the model's 6.0
    assert velocity.shape == (2, 4, 2, 4, 4) and velocity.dtype == torch.float32
    torch.testing.assert_close(velocity, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(velocity, unquantised, atol=1e-7)
    assert not torch.allclose(velocity, other_guidance, atol=1e-5)  # the guidance embedding is live
    with pytest.raises(ValueError, match="per sample"):
        model.velocity(latents[:, :, :1], sigmas, cond)


def test_euler_sampling_and_decode_match_the_pipeline(model, pipe, template):
    # Shift 1 keeps the pipeline's custom sigmas as given; dyadic sigmas make sigma*1000 exact, so the
    # pipeline's timesteps equal the quantised ones.
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    steps = 4
    sigmas = torch.linspace(1, 0, steps + 1)
    assert torch.equal(quantize_timestep(sigmas) * 1000, sigmas * 1000)
    noise = model.initial_noise(torch.Generator().manual_seed(11), 2)
    cond = _batch(model, 2)
    latents = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in itertools.pairwise(sigmas):
            latents = latents + (sigma_next - sigma) * model.velocity(latents, sigma.expand(2), cond)
    videos = model.decode(latents)

    kwargs = {
        "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": steps, "sigmas": sigmas[:-1].tolist(),
        "guidance_scale": GUIDANCE, "num_videos_per_prompt": 2, "prompt_template": template, "max_sequence_length": 32,
    }  # fmt: skip
    reference_latents = pipe(PROMPT, latents=noise.clone(), output_type="latent", **kwargs).frames
    reference = pipe(PROMPT, latents=noise.clone(), output_type="np", **kwargs).frames
    torch.testing.assert_close(latents, reference_latents, atol=1e-5, rtol=1e-5)
    assert videos.shape == (2, 5, 32, 32, 3) and videos.dtype == np.uint8
    expected = (np.asarray(reference) * 255).round().astype(np.uint8)
    assert np.abs(videos.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(model.decode(latents, batch_size=2).astype(int) - videos.astype(int)).max() <= 1


def test_velocity_is_differentiable(tiny_folder, model):
    policy = HunyuanVideoModel.from_pretrained(
        str(tiny_folder), load_text_encoders=False, load_vae=False, num_frames=5, height=32, width=32
    )
    policy.transformer.requires_grad_(True)
    latents = policy.initial_noise(torch.Generator().manual_seed(0), 1)
    loss = policy.velocity(latents, torch.tensor([0.8]), _batch(model, 1)).square().mean()
    loss.backward()
    grads = [p.grad for p in policy.transformer.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0


def test_tiny_video_builds_are_deterministic_per_seed(tmp_path, tiny_folder):
    from safetensors.torch import load_file

    from raygrpo.models.tiny_video import build_tiny_hunyuan_video

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return {f"{f.parent.name}.{k}": v for f in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(f).items()}

    again, other, reference = (
        weights(build_tiny_hunyuan_video(tmp_path / "a", 0)),
        weights(build_tiny_hunyuan_video(tmp_path / "b", 1)),
        weights(tiny_folder),
    )
    assert again.keys() == reference.keys() == other.keys()
    assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= {k.split(".")[0] for k in reference}
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    assert not torch.equal(other["transformer.proj_out.weight"], reference["transformer.proj_out.weight"])
