"""The FLUX.1 Kontext adapter against diffusers' FluxKontextPipeline, on the tiny build loaded back with from_pretrained.

What it adds to FLUX.1 (raygrpo/models/flux_kontext.py): the reference image's packed VAE latents in the conditioning,
appended to the sequence with RoPE ids whose first axis is 1, the velocity read off the noisy tokens. Each is checked
against the pipeline's own computation; the whole Euler loop and decode against the pipeline's output.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from PIL import Image

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import FluxKontextModel, ModelNotFoundError, load_model, tiny_model_folder

PROMPT = "make the ball blue"
SIZE = 64  # the tiny build's default: 8x8 latent pixels of 4 channels, 16 packed tokens of 16 values


def _picture(seed: int, size=(40, 48)) -> np.ndarray:
    """A smooth random picture not of the output size, so the resize to it is exercised."""
    small = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size[::-1], Image.Resampling.BILINEAR))


REFERENCE = _picture(0)


@pytest.fixture(scope="module")
def folder():
    return tiny_model_folder("flux_kontext")


@pytest.fixture(scope="module")
def model(folder) -> FluxKontextModel:
    return FluxKontextModel.from_pretrained(str(folder), height=SIZE, width=SIZE)


@pytest.fixture(scope="module")
def pipe(folder) -> FluxKontextPipeline:
    """The pipeline over the same folder, with a shift-1 Euler scheduler (custom sigmas stay as given)."""
    loaded = FluxKontextPipeline.from_pretrained(folder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(loaded.scheduler.config, shift=1.0)
    pipe = FluxKontextPipeline(**{**loaded.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_reference(pipe: FluxKontextPipeline) -> Image.Image:
    """The reference as the adapter sizes it (the pipeline's own resize to the output size): the pipeline called with it,
    ``_auto_resize=False`` and ``max_area=H*W`` computes what the adapter does (see the adapter's module docstring)."""
    return pipe.image_processor.resize(Image.fromarray(REFERENCE), SIZE, SIZE)


def test_the_tiny_build_is_the_tiny_flux_in_a_kontext_pipeline(folder, model):
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    flux = load_model("flux", "tiny-random", load_text_encoders=False, load_vae=False)
    for (name, kontext), (_, plain) in zip(model.transformer.state_dict().items(), flux.transformer.state_dict().items()):
        assert torch.equal(kontext, plain), name  # the same seed's FLUX weights: one tiny architecture, two pipelines
    assert model.latent_shape == (16, 16) and model.guidance_scale == 3.5  # the pipeline's default embedded guidance


def test_a_text_to_image_flux_folder_is_refused_before_loading():
    with pytest.raises(ModelNotFoundError, match="holds a FluxPipeline.*model.family flux\\).*FLUX.1-Kontext-dev"):
        FluxKontextModel.from_pretrained(str(tiny_model_folder("flux")))


def test_encode_prompt_is_the_pipelines_text_and_reference_encoding(model, pipe):
    cond = model.encode_prompt(PROMPT, REFERENCE)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=512)
        pixels = pipe.image_processor.preprocess(_pipeline_reference(pipe), SIZE, SIZE)
        _, reference, _, _ = pipe.prepare_latents(pixels, 1, 4, SIZE, SIZE, torch.float32, "cpu", None)
    np.testing.assert_allclose(cond.prompt_embeds, embeds[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(cond.pooled_prompt_embeds, pooled[0].numpy(), atol=1e-6)
    assert cond.image_latents.shape == (16, 16) and cond.image_latents.dtype == np.float32
    np.testing.assert_allclose(cond.image_latents, reference[0].numpy(), atol=1e-6)
    again = model.encode_prompt("another edit", REFERENCE.copy())
    assert again.image_latents is cond.image_latents  # cached per image content, whatever the prompt
    assert not np.allclose(model.encode_prompt(PROMPT, _picture(1)).image_latents, cond.image_latents)


def test_an_edit_without_a_usable_reference_is_a_clear_error(model):
    with pytest.raises(ValueError, match="without a conditioning image.*jsonl"):
        model.encode_prompt(PROMPT)
    with pytest.raises(ValueError, match="uint8 array"):
        model.encode_prompt(PROMPT, REFERENCE.astype(np.float32))
    with pytest.raises(ValueError, match="image_latents"):
        model.velocity(model.initial_noise(None, 1), torch.tensor([0.5]), ConditioningBatch.of(replace(model.encode_prompt(PROMPT, REFERENCE), image_latents=None), 1))


def test_velocity_is_the_pipelines_network_call_on_the_appended_sequence(folder, model, pipe):
    cond = ConditioningBatch.of(model.encode_prompt(PROMPT, REFERENCE), 2)
    latents = model.initial_noise(torch.Generator().manual_seed(0), 2)
    sigmas = torch.tensor([0.5371, 0.25])
    with torch.no_grad():
        _, _, latent_ids, image_ids = pipe.prepare_latents(torch.zeros(1, 4, 8, 8), 1, 4, SIZE, SIZE, torch.float32, "cpu", None)
        expected = pipe.transformer(
            hidden_states=torch.cat([latents, cond.image_latents], dim=1),
            timestep=torch.tensor([int(s * 1000) / 1000 for s in sigmas.tolist()]),  # DanceGRPO's quantised timestep
            guidance=torch.full([2], model.guidance_scale), pooled_projections=cond.pooled_prompt_embeds,
            encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3),
            img_ids=torch.cat([latent_ids, image_ids]), return_dict=False,
        )[0][:, :16]  # fmt: skip
        velocity = model.velocity(latents, sigmas, cond)
        other = ConditioningBatch.of(model.encode_prompt(PROMPT, _picture(1)), 2)
        assert not torch.allclose(model.velocity(latents, sigmas, other), velocity, atol=1e-6)  # the reference is seen
    assert velocity.shape == (2, 16, 16) and velocity.dtype == torch.float32
    torch.testing.assert_close(velocity, expected, atol=1e-5, rtol=1e-5)
    # The learner's view: the network alone, the reference arriving encoded; gradients flow through it.
    learner = load_model("flux_kontext", str(folder), load_text_encoders=False, load_vae=False, height=SIZE, width=SIZE)
    with pytest.raises(RuntimeError, match="load_text_encoders=False or load_vae=False"):
        learner.encode_prompt(PROMPT, REFERENCE)
    learner.transformer.requires_grad_(True)
    trained = learner.velocity(latents, sigmas, cond)
    torch.testing.assert_close(trained.detach(), velocity)
    trained.square().mean().backward()
    assert all(p.grad is not None for p in learner.transformer.parameters())


def test_euler_sampling_and_decode_match_the_pipeline(model, pipe):
    """The adapter's whole loop (Euler on its own grid, embedded guidance, decode) against FluxKontextPipeline's."""
    grid = model.sigma_grid("ode", 4, 1.0)  # dyadic sigmas: the pipeline's sigma * 1000 is the quantised timestep
    noise = model.initial_noise(torch.Generator().manual_seed(11), 2)
    cond = ConditioningBatch.of(model.encode_prompt(PROMPT, REFERENCE), 2)
    x = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            x = x + (sigma_next - sigma) * model.velocity(x, sigma.expand(2), cond)
        kwargs = dict(
            image=_pipeline_reference(pipe), prompt=PROMPT, height=SIZE, width=SIZE, max_area=SIZE * SIZE, _auto_resize=False,
            num_inference_steps=4, sigmas=grid[:-1].tolist(), guidance_scale=model.guidance_scale, num_images_per_prompt=2,
        )  # fmt: skip
        expected = pipe(latents=noise.clone(), output_type="latent", **kwargs).images
        pixels = pipe(latents=noise.clone(), output_type="np", **kwargs).images
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)
    decoded = model.decode(x)
    assert decoded.shape == (2, SIZE, SIZE, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - (pixels * 255).round().astype(int)).max() <= 1
