"""The SD3 adapter and the tiny random SD3 build, checked against diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors.torch import load_file

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import MODEL_FAMILIES, SD3Model, build_tiny_sd3, load_model, quantize_timestep, tiny_model_folder

PROMPT = "A photo of an astronaut riding a horse on the moon, highly detailed"
CFG = 4.5



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("raygrpo-cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, cache_dir, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAYGRPO_CACHE", str(cache_dir))
    # An empty HF cache, so an SD3 cached on this machine cannot change the outcome.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def tiny_folder(cache_dir) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYGRPO_CACHE", str(cache_dir))
        return tiny_model_folder("sd3")


@pytest.fixture(scope="module")
def pipe(tiny_folder) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def model(cache_dir, tiny_folder) -> SD3Model:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYGRPO_CACHE", str(cache_dir))
        return SD3Model.from_pretrained("tiny-random")


def _conditioning(model: SD3Model, batch: int, prompt: str = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    cond = model.encode_prompt(prompt)
    embeds = torch.from_numpy(cond.prompt_embeds)[None].expand(batch, -1, -1)
    pooled = torch.from_numpy(cond.pooled_prompt_embeds)[None].expand(batch, -1)
    return embeds, pooled


def test_tiny_sd3_is_a_loadable_sd3_pipeline(tiny_folder, pipe):
    assert (tiny_folder / "model_index.json").is_file()
    assert tiny_folder.name == "tiny-sd3-v1-seed0"
    stamp = (tiny_folder / "model_index.json").stat().st_mtime_ns
    assert tiny_model_folder("sd3") == tiny_folder  # reused, not rebuilt
    assert (tiny_folder / "model_index.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="'flux'.*'sd3'"):
        tiny_model_folder("no-such-family")
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
    out = pipe("a red cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)  # the pipeline's default size: sample_size 8 x vae factor 8
    assert np.isfinite(out.images).all() and out.images.std() > 0


def test_from_pretrained_tiny_random_and_learner_view(model):
    assert model.family == "sd3" and model.height == model.width == 64 and model.guidance_scale == CFG
    assert model.latent_shape == (16, 8, 8)
    for module in (model.transformer, model.vae, model.text_encoder, model.text_encoder_2, model.text_encoder_3):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())

    learner = load_model("sd3", "tiny-random", load_text_encoders=False, load_vae=False, height=128, width=96)
    assert isinstance(learner, MODEL_FAMILIES["sd3"])
    assert learner.vae is None and learner.text_encoder_3 is None and learner.latent_shape == (16, 16, 12)
    with pytest.raises(RuntimeError, match="load_text_encoders"):
        learner.encode_prompt("x")
    with pytest.raises(RuntimeError, match="load_vae"):
        learner.decode(torch.zeros(1, 16, 16, 12))
    with pytest.raises(ValueError, match="multiples of 16"):
        SD3Model(learner.transformer, height=72, width=64)
    with pytest.raises(ValueError, match="256 px"):
        SD3Model(learner.transformer, height=512, width=64)


def test_encode_prompt_matches_pipeline_and_is_cached(tiny_folder, pipe):
    model = SD3Model.from_pretrained(str(tiny_folder))
    calls = []
    model.text_encoder_3.register_forward_hook(lambda *args: calls.append(1))
    first = model.encode_prompt(PROMPT)
    assert model.encode_prompt(PROMPT) is first and len(calls) == 1
    model.encode_prompt("another prompt")
    assert len(calls) == 2

    assert first.prompt_embeds.shape == (77 + 256, 64) and first.prompt_embeds.dtype == np.float32
    assert first.pooled_prompt_embeds.shape == (48,) and first.pooled_prompt_embeds.dtype == np.float32
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None, max_sequence_length=256)
    np.testing.assert_allclose(first.prompt_embeds, embeds[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(first.pooled_prompt_embeds, pooled[0].numpy(), atol=1e-6)
    # The CFG negative is the pipeline's default negative (the empty prompt), encoded once.
    empty = model.negative_conditioning
    assert model.negative_conditioning is empty and len(calls) == 3
    np.testing.assert_allclose(empty.prompt_embeds, negative[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(empty.pooled_prompt_embeds, negative_pooled[0].numpy(), atol=1e-6)


def test_initial_noise_is_pipeline_noise(model, pipe):
    noise = model.initial_noise(torch.Generator().manual_seed(3), 2)
    reference = pipe.prepare_latents(2, 16, 64, 64, torch.float32, "cpu", torch.Generator().manual_seed(3))
    assert noise.shape == (2, 16, 8, 8) and noise.dtype == torch.float32
    assert torch.equal(noise, reference)


def _direct(transformer, latents, timestep, embeds, pooled):
    return transformer(
        hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled,
        return_dict=False,
    )[0]  # fmt: skip


def test_velocity_without_cfg_is_a_pipeline_style_transformer_call(model, pipe):
    embeds, pooled = _conditioning(model, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(0), 2)
    sigmas = torch.tensor([0.5371, 0.25])
    with torch.no_grad():
        velocity = model.velocity(latents, sigmas, ConditioningBatch(embeds, pooled), guidance_scale=1.0)
        direct = _direct(pipe.transformer, latents, torch.tensor([537.0, 250.0]), embeds, pooled)
        unquantised = _direct(pipe.transformer, latents, sigmas * 1000, embeds, pooled)
        assert torch.equal(model.velocity(latents, sigmas, ConditioningBatch(embeds, pooled), 0.0), velocity)  # <= 1: no CFG
    assert velocity.shape == (2, 16, 8, 8) and velocity.dtype == torch.float32
    torch.testing.assert_close(velocity, direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(velocity, unquantised, atol=1e-7)  # the quantisation is really applied
    with pytest.raises(ValueError, match="per sample"):
        model.velocity(latents[:, :, :4], sigmas, ConditioningBatch(embeds, pooled))


def test_velocity_with_cfg_is_one_batched_forward_of_both_branches(model):
    embeds, pooled = _conditioning(model, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(1), 2)
    sigmas = torch.tensor([0.9, 0.3])
    forwards = []
    hook = model.transformer.register_forward_hook(lambda module, args, output: forwards.append(1))
    try:
        with torch.no_grad():
            guided = model.velocity(latents, sigmas, ConditioningBatch(embeds, pooled), guidance_scale=CFG)
            assert len(forwards) == 1
            default = model.velocity(latents, sigmas, ConditioningBatch(embeds, pooled))  # None: the model's guidance_scale, 4.5
    finally:
        hook.remove()
    negative_embeds, negative_pooled = _conditioning(model, 2, prompt="")
    with torch.no_grad():
        conditional = model.velocity(latents, sigmas, ConditioningBatch(embeds, pooled), guidance_scale=1.0)
        unconditional = model.velocity(latents, sigmas, ConditioningBatch(negative_embeds, negative_pooled), guidance_scale=1.0)
    torch.testing.assert_close(guided, unconditional + CFG * (conditional - unconditional), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default, guided, atol=0, rtol=0)
    assert not torch.allclose(guided, conditional, atol=1e-4)


def test_cfg_without_text_encoders_needs_a_negative(model, tiny_folder):
    learner = SD3Model.from_pretrained(str(tiny_folder), load_text_encoders=False, load_vae=False, guidance_scale=1.0)
    embeds, pooled = _conditioning(model, 1)
    latents = model.initial_noise(torch.Generator().manual_seed(2), 1)
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        learner.velocity(latents, sigma, ConditioningBatch(embeds, pooled))  # no CFG: fine
        with pytest.raises(RuntimeError, match="load_text_encoders=False.*set_negative_conditioning"):
            learner.velocity(latents, sigma, ConditioningBatch(embeds, pooled), guidance_scale=CFG)
        learner.set_negative_conditioning(model.negative_conditioning)
        torch.testing.assert_close(
            learner.velocity(latents, sigma, ConditioningBatch(embeds, pooled), guidance_scale=CFG),
            model.velocity(latents, sigma, ConditioningBatch(embeds, pooled)),
        )


def test_a_cfg_learner_encodes_the_negative_once_and_keeps_no_text_encoder(model, tiny_folder):
    """Training with CFG (Flow-GRPO's SD3 recipe): the learner loads without text encoders but still guides."""
    learner = SD3Model.from_pretrained(str(tiny_folder), load_text_encoders=False, load_vae=False, guidance_scale=CFG)
    assert learner.text_encoder is None and learner.text_encoder_2 is None and learner.text_encoder_3 is None
    embeds, pooled = _conditioning(model, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(4), 2)
    with torch.no_grad():
        torch.testing.assert_close(
            learner.velocity(latents, torch.tensor([0.7, 0.3]), ConditioningBatch(embeds, pooled)),
            model.velocity(latents, torch.tensor([0.7, 0.3]), ConditioningBatch(embeds, pooled)),
        )


@pytest.mark.parametrize("guidance_scale", [1.0, CFG])
def test_velocity_is_differentiable(tiny_folder, model, guidance_scale):
    policy = SD3Model.from_pretrained(str(tiny_folder), load_text_encoders=False, load_vae=False)
    policy.set_negative_conditioning(model.negative_conditioning)
    embeds, pooled = _conditioning(model, 1)
    policy.transformer.requires_grad_(True)
    latents = policy.initial_noise(torch.Generator().manual_seed(0), 1)
    loss = policy.velocity(latents, torch.tensor([0.8]), ConditioningBatch(embeds, pooled), guidance_scale=guidance_scale).square().mean()
    loss.backward()
    grads = [p.grad for p in policy.transformer.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_euler_sampling_with_cfg_and_decode_match_sd3_pipeline(model, tiny_folder):
    # The pipeline shifts custom sigmas by the scheduler's ``shift``; shift 1 keeps them as given. Dyadic
    # sigmas are exact in float32, so the pipeline's timesteps sigma*1000 equal the quantised ones * 1000.
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    steps = 4
    sigmas = torch.linspace(1, 0, steps + 1)
    assert torch.equal(quantize_timestep(sigmas) * 1000, sigmas * 1000)
    noise = model.initial_noise(torch.Generator().manual_seed(11), 2)

    embeds, pooled = _conditioning(model, 2)
    latents = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            velocity = model.velocity(latents, sigma.expand(2), ConditioningBatch(embeds, pooled), guidance_scale=CFG)
            latents = latents + (sigma_next - sigma) * velocity
    images = model.decode(latents)

    kwargs = dict(num_inference_steps=steps, sigmas=sigmas[:-1].tolist(), guidance_scale=CFG,
                  latents=noise.clone(), num_images_per_prompt=2, height=64, width=64)  # fmt: skip
    reference_latents = pipe(PROMPT, output_type="latent", **kwargs).images
    reference = pipe(PROMPT, output_type="np", **kwargs).images
    torch.testing.assert_close(latents, reference_latents, atol=1e-5, rtol=1e-5)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    expected = (reference * 255).round().astype(np.uint8)
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    # Chunked decoding gives the same pixels up to float rounding of batched convolutions.
    assert np.abs(model.decode(latents, batch_size=1).astype(int) - images.astype(int)).max() <= 1


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*/*.safetensors")):
        tensors.update({f"{file.parent.name}.{k}": v for k, v in load_file(file).items()})
    return tensors


def test_build_is_deterministic_per_seed(tmp_path, tiny_folder):
    again = _weights(build_tiny_sd3(tmp_path / "again", seed=0))
    other = _weights(build_tiny_sd3(tmp_path / "other", seed=1))
    reference = _weights(tiny_folder)
    assert again.keys() == reference.keys() == other.keys()
    parts = {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert parts <= {k.split(".")[0] for k in reference}
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    assert not torch.equal(other["transformer.proj_out.weight"], reference["transformer.proj_out.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no temp folders left behind
