"""Qwen-Image and Qwen-Image-Edit (raygrpo/models/qwen_image.py) against their diffusers pipelines, on the tiny builds.

The model-adapter contract of tests/test_adapter_contract.py runs here on both builds: its tests are imported and
find this module's ``case``, ``folder``, ``pipe`` and ``model`` fixtures. Left out are the three that assume plain
CFG with one negative for every group (Qwen's true CFG renormalises, and Qwen-Image-Edit reads its negative with
each group's image); their Qwen versions are below, with what only these families do: the padded text and its
mask, the reference image's tokens, the pipeline's dynamic shift.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from PIL import Image
from transformers import Qwen2Tokenizer

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import MODEL_FAMILIES, ModelNotFoundError, tiny_model_folder
from raygrpo.models.hub import tiny_stamp
from raygrpo.models.qwen_image import NEGATIVE_PROMPT, cfg_renormalized
from raygrpo.models.qwen_processor import QwenImageTextProcessor

from . import test_adapter_contract as contract
from .test_adapter_contract import (  # noqa: F401  (collected here, run on this module's cases)
    IMAGE,
    PROMPT,
    STEPS,
    Case,
    test_a_folder_without_a_component_or_index_is_a_clear_error,
    test_decode_gives_uint8_pixels_whatever_the_chunking,
    test_encode_prompt_is_the_pipelines_encoding,
    test_encode_prompt_runs_the_text_encoder_once_per_text,
    test_encode_prompt_takes_an_image_exactly_where_the_family_is_image_conditioned,
    test_euler_sampling_and_decode_match_the_pipeline,
    test_from_pretrained_takes_the_keywords_load_model_passes,
    test_initial_noise_is_the_pipelines_and_fixed_per_seed_and_member,
    test_loads_from_a_saved_tiny_folder_reading_its_components,
    test_sigma_grid_runs_from_about_one_down_to_zero,
    test_the_learner_view_is_the_network_alone,
    test_tiny_random_is_the_familys_own_tiny_build,
    test_velocity_is_the_pipelines_network_call,
)

LENGTH = 512  # model.max_sequence_length: QwenImagePipeline's default


def _pad(embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's ``[1, n, D]`` states zero-padded to ``[LENGTH, D]``, and the mask of the real ``n``."""
    n = embeds.shape[1]
    return torch.cat([embeds[0], embeds.new_zeros(LENGTH - n, embeds.shape[2])]), (torch.arange(LENGTH) < n).long()


def _real(cond_embeds: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """A batch of one prompt's padded states cut back to its real tokens, as the pipeline holds them."""
    return cond_embeds[:, : int(cond_mask[0].sum())]


def _euler(pipe):
    """The pipeline with a plain shift-1 Euler scheduler: no dynamic shift, no terminal stretch (custom sigmas as given)."""
    config = dict(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None)
    euler = type(pipe)(**{**pipe.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(config)})
    euler.prompt_template_encode_start_idx = pipe.prompt_template_encode_start_idx  # the tiny tokenizer's count, not the real one
    euler.set_progress_bar_config(disable=True)
    return euler


class QwenImageCase(Case):
    def pipeline_conditioning(self, model, pipe, prompt, image):
        embeds, mask = _pad(pipe.encode_prompt(prompt, max_sequence_length=LENGTH)[0])
        return {"prompt_embeds": embeds, "prompt_mask": mask}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        return pipe.prepare_latents(num, 4, 64, 64, torch.float32, "cpu", generator)

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        return pipe.transformer(
            hidden_states=latents, timestep=contract._timestep(sigmas, quantize),
            encoder_hidden_states=_real(cond.prompt_embeds, cond.prompt_mask), img_shapes=[[(1, 4, 4)]] * len(latents), return_dict=False,
        )[0]  # fmt: skip

    def pipeline_sample(self, model, pipe, noise, grid):
        kwargs = {"height": 64, "width": 64, "num_inference_steps": STEPS, "sigmas": grid[:-1].tolist(), "negative_prompt": NEGATIVE_PROMPT,
                  "true_cfg_scale": model.guidance_scale, "num_images_per_prompt": len(noise)}  # fmt: skip
        pipe = _euler(pipe)
        latents = pipe(PROMPT, latents=noise.clone(), output_type="latent", **kwargs).images
        return latents, contract._uint8(pipe(PROMPT, latents=noise.clone(), output_type="np", **kwargs).images)


class QwenImageEditCase(Case):
    """The edit pipeline sizes the reference for 1024 x 1024 px outputs; the adapter (and flow_grpo's recipe) for the output
    size: ``calculate_dimensions`` is given this output's area where the pipeline runs."""

    @staticmethod
    def reference(pipe, image):
        width, height, _ = pipeline_qwenimage_edit.calculate_dimensions(64 * 64, image.shape[1] / image.shape[0])
        return pipe.image_processor.resize(Image.fromarray(image), height, width), height, width

    def pipeline_conditioning(self, model, pipe, prompt, image):
        resized, height, width = self.reference(pipe, image)
        (negative, negative_mask), (embeds, mask) = [_pad(pipe.encode_prompt(t, image=resized)[0]) for t in (NEGATIVE_PROMPT, prompt)]
        pixels = pipe.image_processor.preprocess(resized, height, width).unsqueeze(2)
        _, packed = pipe.prepare_latents(pixels, 1, 4, 64, 64, torch.float32, "cpu", None)  # the pipeline's reference tokens
        unpacked = QwenImagePipeline._unpack_latents(packed, height, width, 8)[0, :, 0]  # [C, h_img, w_img]
        embeds, mask = torch.stack([negative, embeds]), torch.stack([negative_mask, mask])
        return {"prompt_embeds": embeds, "prompt_mask": mask, "image_latents": unpacked}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        return pipe.prepare_latents(None, num, 4, 64, 64, torch.float32, "cpu", generator)[0]

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        c, h, w = cond.image_latents.shape[1:]
        reference = QwenImagePipeline._pack_latents(cond.image_latents.contiguous(), len(latents), c, h, w)
        prediction = pipe.transformer(
            hidden_states=torch.cat([latents, reference], dim=1), timestep=contract._timestep(sigmas, quantize),
            encoder_hidden_states=_real(cond.prompt_embeds[:, 1], cond.prompt_mask[:, 1]),
            img_shapes=[[(1, 4, 4), (1, h // 2, w // 2)]] * len(latents), return_dict=False,
        )[0]  # fmt: skip
        return prediction[:, : latents.shape[1]]

    def pipeline_sample(self, model, pipe, noise, grid):
        kwargs = {"height": 64, "width": 64, "num_inference_steps": STEPS, "sigmas": grid[:-1].tolist(), "negative_prompt": NEGATIVE_PROMPT,
                  "true_cfg_scale": model.guidance_scale, "num_images_per_prompt": len(noise)}  # fmt: skip
        pipe, image = _euler(pipe), Image.fromarray(IMAGE)
        sized = pipeline_qwenimage_edit.calculate_dimensions
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: sized(64 * 64, ratio))
            latents = pipe(image, PROMPT, latents=noise.clone(), output_type="latent", **kwargs).images
            pixels = pipe(image, PROMPT, latents=noise.clone(), output_type="np", **kwargs).images
        return latents, contract._uint8(pixels)


def _start_idx(build: str) -> int:
    return tiny_stamp(str(tiny_model_folder(build)))["prompt_template_encode_start_idx"]


SIZE = {"height": 64, "width": 64}
CASES = [
    QwenImageCase("qwen_image", "qwen_image", QwenImagePipeline, SIZE, (16, 16), (64, 64, 3),
                  {"prompt_embeds": (LENGTH, 32), "prompt_mask": (LENGTH,)}, "text_encoder", {}, 4.0, cfg=True),
    QwenImageEditCase("qwen_image_edit", "qwen_image_edit", QwenImageEditPipeline, SIZE, (16, 16), (64, 64, 3),
                      {"prompt_embeds": (2, LENGTH, 32), "prompt_mask": (2, LENGTH), "image_latents": (4, 8, 8)}, "text_encoder",
                      {"VL": LENGTH}, 4.0, cfg=True, image=True),
]  # fmt: skip


@pytest.fixture(scope="module", params=CASES, ids=[c.build for c in CASES])
def case(request) -> Case:
    return request.param


@pytest.fixture(scope="module")
def folder(case):
    return tiny_model_folder(case.build)  # in the session's private cache (conftest)


@pytest.fixture(scope="module")
def pipe(case, folder):
    """The family's own pipeline from the folder; the edit pipeline's processor without its video half (no torchvision here)."""
    extra = {}
    if case.image:
        tokenizer = Qwen2Tokenizer.from_pretrained(folder, subfolder="tokenizer")
        extra["processor"] = QwenImageTextProcessor.from_pretrained(str(folder), tokenizer=tokenizer)
    pipe = case.pipeline_class.from_pretrained(folder, **extra)
    pipe.prompt_template_encode_start_idx = tiny_stamp(str(folder))["prompt_template_encode_start_idx"]  # the tiny tokenizer's count
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(case, folder):
    return MODEL_FAMILIES[case.family].from_pretrained(str(folder), **case.load)


def _batch(model, case, n: int, prompt: str = PROMPT) -> ConditioningBatch:
    return ConditioningBatch.of(model.encode_prompt(prompt, IMAGE if case.image else None), n)


# ------------------------------------------------------------------------------------------- conditioning
def test_over_long_prompts_are_truncated_with_one_warning(case, folder, caplog):
    """Qwen-Image: the contract's 100k-character prompt (limit: 512 tokens after the template's system prefix).
    Qwen-Image-Edit's pipeline cuts nothing: a short limit cuts the prompt read with its image, with one warning."""
    if not case.image:
        limits = {"VL": LENGTH + _start_idx(case.build)}  # counted with the template's system prefix
        contract.test_over_long_prompts_are_truncated_with_one_warning(replace(case, token_limits=limits), folder, caplog)
        return
    short = MODEL_FAMILIES[case.family].from_pretrained(str(folder), **case.load, max_sequence_length=8)
    with caplog.at_level("WARNING", logger="raygrpo.models"):
        conds = [short.encode_prompt(text, IMAGE) for text in (PROMPT, f"{PROMPT} at night")]
    assert [c.prompt_embeds.shape for c in conds] == [(2, 8, 32)] * 2 and all(c.prompt_mask[1].all() for c in conds)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("raygrpo.models")]
    assert len(warnings) == 1 and "limit 8" in warnings[0]


def test_text_is_padded_to_one_shape_and_cut_back_per_batch(case, model):
    """Prompts of different lengths share one padded shape (so groups batch together), and a batch of them gives each the
    velocity it has alone: the mask hides the padding, and the text is cut to the batch's longest prompt."""
    short, long = (model.encode_prompt(p, IMAGE if case.image else None) for p in ("a cat", f"{PROMPT} beside a lighthouse at dawn"))
    assert short.prompt_embeds.shape == long.prompt_embeds.shape and short.prompt_mask.sum() < long.prompt_mask.sum()
    latents = model.initial_noise(torch.Generator().manual_seed(6), 2)
    sigmas = torch.tensor([0.75, 0.5])
    with torch.no_grad():
        together = model.velocity(latents, sigmas, ConditioningBatch.concat([ConditioningBatch.of(c, 1) for c in (short, long)]))
        alone = [model.velocity(latents[i : i + 1], sigmas[i : i + 1], ConditioningBatch.of(c, 1)) for i, c in enumerate((short, long))]
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_the_negative_prompt_is_the_pipelines(case, model, pipe):
    """Qwen-Image: one negative for every group, encoded once; Qwen-Image-Edit: read with the group's image (checked with the
    encoding in the contract test), so the adapter holds none of its own."""
    if case.image:
        assert not hasattr(model, "negative_conditioning") and not hasattr(model, "set_negative_conditioning")
        return
    negative = model.negative_conditioning
    assert model.negative_conditioning is negative
    with torch.no_grad():
        expected, mask = _pad(pipe.encode_prompt(NEGATIVE_PROMPT, max_sequence_length=LENGTH)[0])
    np.testing.assert_allclose(negative.prompt_embeds, expected.numpy(), atol=1e-6)
    np.testing.assert_array_equal(negative.prompt_mask, mask.numpy())


# ------------------------------------------------------------------------------------------------- guidance
def _negative_batch(model, case, cond: ConditioningBatch) -> ConditioningBatch:
    """The unconditional branch as a conditional batch: the negative prompt (with the same image)."""
    if case.image:  # the negative rides in the group's conditioning: make it the prompt half
        return replace(cond, prompt_embeds=cond.prompt_embeds[:, [0, 0]], prompt_mask=cond.prompt_mask[:, [0, 0]])
    return ConditioningBatch.of(model.negative_conditioning, len(cond))


def test_true_cfg_is_one_forward_renormalised_per_token(case, model):
    """``v_u + s (v_c - v_u)`` rescaled to ``||v_c||`` per token, from one batched forward over [negative; prompt]."""
    cond = _batch(model, case, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(1), 2)
    sigmas = case.velocity_sigmas(model)
    batches = []
    hook = model.transformer.register_forward_hook(lambda module, args, output: batches.append(output[0].shape[0]))
    try:
        with torch.no_grad():
            guided = model.velocity(latents, sigmas, cond)
            assert batches == [4]
            conditional = model.velocity(latents, sigmas, cond, guidance_scale=1.0)
            unconditional = model.velocity(latents, sigmas, _negative_batch(model, case, cond), guidance_scale=1.0)
            assert torch.equal(model.velocity(latents, sigmas, cond, guidance_scale=0.0), conditional)  # <= 1: no CFG
    finally:
        hook.remove()
    combined = unconditional + model.guidance_scale * (conditional - unconditional)
    expected = combined * conditional.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided.norm(dim=-1), conditional.norm(dim=-1), atol=1e-5, rtol=1e-5)  # the norm is the conditional's
    assert not torch.allclose(guided, combined, atol=1e-4)  # and the rescale is live
    renormalized = cfg_renormalized(torch.cat([unconditional, conditional]), model.guidance_scale)
    torch.testing.assert_close(renormalized, expected, atol=1e-6, rtol=1e-6)


def test_a_cfg_learner_guides_without_text_encoder_or_vae(case, folder, model):
    """The learner loads the transformer alone yet applies the rollout's true CFG (Qwen-Image: the negative encoded once at
    load, then the encoder freed; Qwen-Image-Edit: the negative arrives with each group)."""
    learner = MODEL_FAMILIES[case.family].from_pretrained(str(folder), load_text_encoders=False, load_vae=False, **case.load)
    assert learner.text_encoder is None and learner.vae is None
    cond = _batch(model, case, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(2), 2)
    sigmas = case.velocity_sigmas(model)
    with torch.no_grad():
        torch.testing.assert_close(learner.velocity(latents, sigmas, cond), model.velocity(latents, sigmas, cond))
    learner.transformer.requires_grad_(True)
    learner.velocity(latents[:1], sigmas[:1], _batch(model, case, 1)).square().mean().backward()
    grads = {name: p.grad for name, p in learner.transformer.named_parameters()}
    # The last block's text-stream output feeds nothing (only image tokens are read out): the one place without gradients.
    last = f"transformer_blocks.{len(learner.transformer.transformer_blocks) - 1}."
    unused = {name for name, g in grads.items() if g is None}
    assert unused == {n for n in grads if n.startswith((last + "attn.to_add_out", last + "txt_mlp"))}
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0


# ------------------------------------------------------------------------------------------------ schedule
def test_pipeline_shift_is_the_pipelines_dynamic_shift(case, model, pipe):
    """``exp(mu)`` at the adapter's size shifts rollout's grid onto the pipeline's own sigmas (before its terminal stretch)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift_terminal=None)
    mu = np.log(model.pipeline_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS).tolist(), mu=mu)
    torch.testing.assert_close(model.sigma_grid("dance_sde", STEPS, model.pipeline_shift), scheduler.sigmas.float(), atol=1e-6, rtol=1e-6)
    assert model.pipeline_shift == pytest.approx(np.exp(0.5 + 0.4 * (16 - 256) / (8192 - 256)))  # 16 tokens at 64 px
    large = MODEL_FAMILIES[case.family](model.transformer, scheduler=pipe.scheduler, height=1024, width=1024)
    assert large.pipeline_shift == pytest.approx(np.exp(0.5 + 0.4 * (4096 - 256) / (8192 - 256)))  # 2.0 at 1024 px


def test_edit_reference_keeps_its_aspect_ratio_at_the_output_area(case, model):
    if not case.image:
        pytest.skip("text-to-image")
    assert model.condition_size(np.zeros((600, 800, 3), np.uint8)) == (64, 64)  # 4096 px at 4:3 -> multiples of 32
    wide = model.encode_prompt(PROMPT, np.zeros((32, 128, 3), np.uint8))
    assert wide.image_latents.shape == (4, 4, 16)  # 32 x 128 px: 4 x 16 latents, the RoPE's second grid
    with torch.no_grad():
        velocity = model.velocity(model.initial_noise(None, 1), torch.tensor([0.5]), ConditioningBatch.of(wide, 1))
    assert velocity.shape == (1, 16, 16) and torch.isfinite(velocity).all()


def test_other_qwen_pipelines_are_refused_before_loading(case, folder, tmp_path):
    """A folder of the other Qwen family, or of a pipeline neither loads (Edit-2509's several references), says so."""
    for name, message in [("QwenImageEditPlusPipeline", "several reference images"), ("QwenImagePipeline", "model.family: qwen_image")]:
        if name == case.pipeline_class.__name__:
            continue
        other = tmp_path / name
        shutil.copytree(folder, other)
        index = json.loads((other / "model_index.json").read_text())
        (other / "model_index.json").write_text(json.dumps({**index, "_class_name": name}))
        with pytest.raises(ModelNotFoundError, match=f"holds a {name}.*{message}"):
            MODEL_FAMILIES[case.family].from_pretrained(str(other), **case.load)

