"""FLUX.2 (family flux2) against its diffusers pipelines, on the tiny [klein] base and [dev] builds.

The whole adapter contract of tests/test_adapter_contract.py runs here on the two FLUX.2 cases: its test
functions and fixtures are imported, and this module's ``case`` fixture hands them the FLUX.2 cases
(loading through ``from_pretrained`` of the saved folder, encoding, noise, the network call, guidance,
decode, and Euler sampling against ``Flux2KleinPipeline`` / ``Flux2Pipeline``). Below them, what only
FLUX.2 does: variants told apart by model_index.json, the step-distilled klein that ignores guidance.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

from raygrpo.config import ModelConfig
from raygrpo.contracts import ConditioningBatch
from raygrpo.models import Flux2Model, ModelNotFoundError, tiny_model_folder
from raygrpo.models.flux2 import DEV, KLEIN, KLEIN_BASE, pipeline_variant

from .test_adapter_contract import *  # noqa: F403  (the contract's tests and fixtures, run on the cases below)
from .test_adapter_contract import PROMPT, STEPS, Case, _timestep, _uint8

TOKENS = 64  # max_sequence_length of both cases: the chat templates take 28 (klein) and 44 (dev) tiny tokens


class Flux2Case(Case):
    """Both FLUX.2 pipelines: text through a chat template, 2x2-patchified noise packed to tokens, 4-axis ids."""

    def pipeline_conditioning(self, model, pipe, prompt, image):
        return {"prompt_embeds": pipe.encode_prompt(prompt, device="cpu", max_sequence_length=TOKENS)[0][0]}

    def pipeline_negative(self, model, pipe):
        return {"prompt_embeds": pipe.encode_prompt("", device="cpu", max_sequence_length=TOKENS)[0][0]}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        return pipe.prepare_latents(num, 4, 64, 64, torch.float32, "cpu", generator)[0]

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        _, latent_ids = pipe.prepare_latents(len(latents), 4, 64, 64, torch.float32, "cpu", None, torch.zeros(len(latents), 16, 4, 4))
        embedded = pipe.transformer.config.guidance_embeds  # [dev]: the guidance value enters an embedding
        return pipe.transformer(
            hidden_states=latents, timestep=_timestep(sigmas, quantize) * 1000 / 1000,  # the scheduler's t, fed as t / 1000
            guidance=torch.full([len(latents)], model.guidance_scale) if embedded else None,
            encoder_hidden_states=cond.prompt_embeds, txt_ids=pipe._prepare_text_ids(cond.prompt_embeds), img_ids=latent_ids,
            return_dict=False,
        )[0]  # fmt: skip

    def pipeline_sample(self, model, pipe, noise, grid):
        # Without the pipelines' resolution-dependent shift (mu), so that the custom sigmas stay as given.
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)
        pipe = type(pipe)(**{**pipe.components, "scheduler": scheduler})
        pipe.set_progress_bar_config(disable=True)
        start = noise.transpose(1, 2).reshape(len(noise), 16, 4, 4)  # tokens back to [B, 4C, h, w], what prepare_latents takes
        kwargs = {"prompt": PROMPT, "latents": start, "height": 64, "width": 64, "num_inference_steps": STEPS, "sigmas": grid[:-1].tolist(),
                  "guidance_scale": model.guidance_scale, "num_images_per_prompt": len(noise), "max_sequence_length": TOKENS}  # fmt: skip
        latents = pipe(output_type="latent", **kwargs).images
        if latents.ndim == 4:  # the klein pipeline returns VAE latents: patchify, normalise and pack them back to tokens
            bn = pipe.vae.bn
            patches = pipe._patchify_latents(latents)
            latents = pipe._pack_latents((patches - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4))
        return latents, _uint8(pipe(output_type="np", **kwargs).images)


SIZE = {"height": 64, "width": 64, "max_sequence_length": TOKENS}
FLUX2_CASES = [
    Flux2Case("flux2", "flux2", Flux2KleinPipeline, SIZE, (16, 16), (64, 64, 3), {"prompt_embeds": (TOKENS, 48)}, "text_encoder",
              {"Qwen3": TOKENS}, 4.0, cfg=True),
    Flux2Case("flux2_dev", "flux2", Flux2Pipeline, SIZE, (16, 16), (64, 64, 3), {"prompt_embeds": (TOKENS, 48)}, "text_encoder",
              {"Mistral3": TOKENS}, 4.0, cfg=False),
]  # fmt: skip


@pytest.fixture(scope="module", params=FLUX2_CASES, ids=[c.build for c in FLUX2_CASES])
def case(request) -> Case:
    return request.param


# ------------------------------------------------------------------------------------ what only FLUX.2 does
def test_the_variant_comes_from_model_index(tmp_path):
    assert Flux2Model.from_pretrained("tiny-random", load_text_encoders=False, load_vae=False, guidance_scale=1.0).variant is KLEIN_BASE
    dev = Flux2Model.from_pretrained(str(tiny_model_folder("flux2_dev")), load_text_encoders=False, load_vae=False)
    assert dev.variant is DEV and dev.transformer.config.guidance_embeds
    other = tmp_path / "kv"
    shutil.copytree(tiny_model_folder("flux2"), other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "Flux2KleinKVPipeline"}))
    with pytest.raises(ModelNotFoundError, match="Flux2KleinKVPipeline.*does not load"):
        Flux2Model.from_pretrained(str(other))


def test_step_distilled_klein_ignores_guidance(tmp_path):
    """is_distilled: true (FLUX.2-klein-4B/9B): the pipeline ignores guidance_scale; one conditional forward whatever it is."""
    folder = tmp_path / "distilled"
    shutil.copytree(tiny_model_folder("flux2"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    model = Flux2Model.from_pretrained(str(folder), **SIZE)
    learner = Flux2Model.from_pretrained(str(folder), load_text_encoders=False, load_vae=False, **SIZE)
    assert model.variant is KLEIN and learner.text_encoder is None  # no negative prompt to encode
    assert model.guidance == learner.guidance == "none"
    cond = ConditioningBatch.of(model.encode_prompt(PROMPT), 2)
    x = model.initial_noise(torch.Generator().manual_seed(0), 2)
    sigmas = torch.tensor([0.75, 0.5])
    calls = []
    hook = model.transformer.register_forward_hook(lambda module, args, output: calls.append(output[0].shape[0]))
    with torch.no_grad():
        guided, plain = model.velocity(x, sigmas, cond), model.velocity(x, sigmas, cond, guidance_scale=1.0)
    hook.remove()
    assert calls == [2, 2] and torch.equal(guided, plain)
    with torch.no_grad():
        torch.testing.assert_close(learner.velocity(x, sigmas, cond), guided)


def test_the_config_reads_the_variant_as_the_adapter_does(tmp_path):
    """ModelConfig.guidance_kind reads model_index.json before anything loads (the CFG-free algorithms' checks); it must
    name the guidance of the variant the adapter loads, for each of the three variants and for tiny-random."""
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    index = json.loads((tiny_model_folder("flux2") / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    klein_base, dev = tiny_model_folder("flux2"), tiny_model_folder("flux2_dev")
    cases = [("tiny-random", klein_base, KLEIN_BASE), (str(klein_base), klein_base, KLEIN_BASE), (str(dev), dev, DEV)]
    for pretrained, folder, variant in [*cases, (str(distilled), distilled, KLEIN)]:
        assert pipeline_variant(str(folder)) is variant
        assert ModelConfig(family="flux2", pretrained=pretrained).guidance_kind() == variant.guidance, pretrained
