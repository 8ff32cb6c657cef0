"""The FLUX adapter and the tiny random FLUX build, checked against diffusers' FluxPipeline."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer, T5TokenizerFast

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import (
    MODEL_FAMILIES,
    FluxModel,
    ModelNotFoundError,
    build_tiny_flux,
    load_model,
    quantize_timestep,
    resolve_pretrained,
    tiny_model_folder,
)
from raygrpo.models.tiny import build_clip_tokenizer, build_t5_tokenizer

PROMPT = "A photo of an astronaut riding a horse on the moon, highly detailed"



@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("raygrpo-cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, cache_dir, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAYGRPO_CACHE", str(cache_dir))
    # An empty HF cache, so a FLUX.1-dev cached on this machine cannot change the outcome.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def tiny_folder(cache_dir) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYGRPO_CACHE", str(cache_dir))
        return tiny_model_folder("flux")


@pytest.fixture(scope="module")
def pipe(tiny_folder) -> FluxPipeline:
    return FluxPipeline.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def model(tiny_folder) -> FluxModel:
    return FluxModel.from_pretrained(str(tiny_folder), height=64, width=64)


def test_tiny_flux_is_a_loadable_flux_pipeline(tiny_folder, pipe):
    assert (tiny_folder / "model_index.json").is_file()
    assert tiny_folder.name == "tiny-flux-v1-seed0"
    assert pipe.transformer.config.guidance_embeds
    assert pipe.vae_scale_factor == 8
    out = pipe("a red cat", height=64, width=64, num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    image = out.images
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_tiny_model_folder_reuses_and_rejects_unknown_family(tiny_folder):
    stamp = (tiny_folder / "model_index.json").stat().st_mtime_ns
    assert tiny_model_folder("flux") == tiny_folder
    assert (tiny_folder / "model_index.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="flux"):
        tiny_model_folder("no-such-family")


def test_concurrent_builders_publish_one_complete_folder(tmp_path):
    target = tmp_path / "shared"
    results, errors = [], []

    def build():
        try:
            results.append(build_tiny_flux(target, seed=5))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == [target] * 3
    assert (target / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temp folders left behind


@pytest.mark.parametrize("subfolder, loader", [("tokenizer", CLIPTokenizer), ("tokenizer_2", T5TokenizerFast)])
def test_tokenizers_tokenise_english_and_reload_identically(tiny_folder, subfolder, loader):
    built = build_clip_tokenizer() if subfolder == "tokenizer" else build_t5_tokenizer()
    loaded = loader.from_pretrained(tiny_folder, subfolder=subfolder)
    ids = built(PROMPT).input_ids
    assert loaded(PROMPT).input_ids == ids
    # CLIP's unknown token is <|endoftext|>, so look at the prompt's pieces without the specials.
    pieces = built(PROMPT, add_special_tokens=False).input_ids
    assert len(pieces) >= 10 and built.unk_token_id not in pieces
    # Listed words stay whole, so different prompts give clearly different ids.
    assert built("a dog in the snow").input_ids != built("a cat on the beach").input_ids


def test_from_pretrained_folder_and_tiny_random(tiny_folder, model):
    assert model.height == model.width == 64 and model.guidance_scale == 3.5
    assert model.latent_shape == (16, 16) and model.unpacked_latent_shape == (4, 8, 8)
    for module in (model.transformer, model.vae, model.text_encoder, model.text_encoder_2):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())

    tiny = FluxModel.from_pretrained("tiny-random")
    assert tiny.height == 64
    learner = FluxModel.from_pretrained("tiny-random", load_text_encoders=False, load_vae=False)
    assert learner.vae is None and learner.text_encoder is None and learner.latent_shape == (16, 16)
    with pytest.raises(RuntimeError, match="load_text_encoders"):
        learner.encode_prompt("x")
    assert isinstance(load_model("flux", "tiny-random", load_vae=False), MODEL_FAMILIES["flux"])


def test_encode_prompt_matches_pipeline_and_is_cached(tiny_folder, pipe):
    model = FluxModel.from_pretrained(str(tiny_folder))
    calls = []
    model.text_encoder_2.register_forward_hook(lambda *args: calls.append(1))
    first = model.encode_prompt(PROMPT)
    assert model.encode_prompt(PROMPT) is first and len(calls) == 1
    model.encode_prompt("another prompt")
    assert len(calls) == 2

    assert first.prompt_embeds.shape == (512, 32) and first.prompt_embeds.dtype == np.float32
    assert first.pooled_prompt_embeds.shape == (32,) and first.pooled_prompt_embeds.dtype == np.float32
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=512)
    np.testing.assert_allclose(first.prompt_embeds, embeds[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(first.pooled_prompt_embeds, pooled[0].numpy(), atol=1e-6)


def test_quantize_timestep_follows_dancegrpo():
    sigmas = torch.linspace(1, 0, 17)
    expected = torch.tensor([int(s * 1000) / 1000 for s in sigmas])
    assert torch.equal(quantize_timestep(sigmas), expected)
    assert quantize_timestep(torch.tensor([0.7])).item() == pytest.approx(0.7)  # float32, not 0.699


def test_initial_noise_is_pipeline_noise(model, pipe):
    noise = model.initial_noise(torch.Generator().manual_seed(3), 2)
    reference, _ = pipe.prepare_latents(2, 4, 64, 64, torch.float32, "cpu", torch.Generator().manual_seed(3))
    assert noise.shape == (2, 16, 16) and noise.dtype == torch.float32
    assert torch.equal(noise, reference)


def _conditioning(model, batch):
    cond = model.encode_prompt(PROMPT)
    embeds = torch.from_numpy(cond.prompt_embeds)[None].expand(batch, -1, -1)
    pooled = torch.from_numpy(cond.pooled_prompt_embeds)[None].expand(batch, -1)
    return embeds, pooled


def test_velocity_matches_direct_transformer_call(model, pipe):
    embeds, pooled = _conditioning(model, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(0), 2)
    sigmas = torch.tensor([0.5371, 0.25])
    with torch.no_grad():
        velocity = model.velocity(latents, sigmas, ConditioningBatch(embeds, pooled))
        direct = pipe.transformer(
            hidden_states=latents,
            timestep=torch.tensor([0.537, 0.25]),
            guidance=torch.full([2], 3.5),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(512, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
            return_dict=False,
        )[0]
        unquantised = model.transformer(
            hidden_states=latents, timestep=sigmas, guidance=torch.full([2], 3.5), pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=torch.zeros(512, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32), return_dict=False,
        )[0]
    assert velocity.shape == (2, 16, 16) and velocity.dtype == torch.float32
    torch.testing.assert_close(velocity, direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(velocity, unquantised, atol=1e-7)  # the quantisation is really applied


def test_velocity_is_differentiable(tiny_folder):
    model = FluxModel.from_pretrained(str(tiny_folder), height=64, width=64)
    embeds, pooled = _conditioning(model, 1)
    model.transformer.requires_grad_(True)
    latents = model.initial_noise(torch.Generator().manual_seed(0), 1)
    loss = model.velocity(latents, torch.tensor([0.8]), ConditioningBatch(embeds, pooled)).square().mean()
    loss.backward()
    grads = [p.grad for p in model.transformer.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_euler_sampling_and_decode_match_flux_pipeline(model, tiny_folder):
    # FluxPipeline shifts custom sigmas by the scheduler's ``shift``; shift 1 keeps them as given. Dyadic
    # sigmas are exact in float32, so the pipeline's timestep sigma*1000/1000 equals the quantised one.
    pipe = FluxPipeline.from_pretrained(tiny_folder)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    steps = 4
    sigmas = torch.linspace(1, 0, steps + 1)
    assert torch.equal(quantize_timestep(sigmas), sigmas)
    noise = model.initial_noise(torch.Generator().manual_seed(11), 2)

    embeds, pooled = _conditioning(model, 2)
    latents = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            latents = latents + (sigma_next - sigma) * model.velocity(latents, sigma.expand(2), ConditioningBatch(embeds, pooled))
    images = model.decode(latents)

    kwargs = dict(height=64, width=64, num_inference_steps=steps, sigmas=sigmas[:-1].tolist(),
                  guidance_scale=3.5, latents=noise.clone(), num_images_per_prompt=2)
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
    again = _weights(build_tiny_flux(tmp_path / "again", seed=0))
    other = _weights(build_tiny_flux(tmp_path / "other", seed=1))
    reference = _weights(tiny_folder)
    assert again.keys() == reference.keys() == other.keys()
    assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= {k.split(".")[0] for k in reference}
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    assert not torch.equal(other["transformer.proj_out.weight"], reference["transformer.proj_out.weight"])


def test_resolve_pretrained_folders(tmp_path, tiny_folder):
    assert resolve_pretrained(tiny_folder) == str(tiny_folder.resolve())
    assert resolve_pretrained("tiny-random") == str(tiny_folder)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        resolve_pretrained(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        FluxModel.from_pretrained(str(tmp_path / "empty"))


def test_resolve_pretrained_hub_id_offline_fails_fast_with_a_fix():
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_pretrained("black-forest-labs/FLUX.1-dev")
    assert time.monotonic() - start < 5
    message = str(info.value)
    for needle in ("black-forest-labs/FLUX.1-dev", "HF_HUB_OFFLINE", "hf download black-forest-labs/FLUX.1-dev",
                   "huggingface-cli download", "hf auth login", "model.pretrained=DIR"):
        assert needle in message


def test_resolve_pretrained_unreachable_hub_fails_fast(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Port 9 (discard) on localhost: refused at once, without touching the real network.
    template = "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="could not be reached"):
        resolve_pretrained("black-forest-labs/FLUX.1-dev", timeout=2)
    assert time.monotonic() - start < 5
