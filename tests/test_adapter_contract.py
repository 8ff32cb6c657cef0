"""The model-adapter contract (:class:`raygrpo.models.base.ModelAdapter`), checked for every family against its pipeline.

One case per tiny build: FLUX, SD3, Stable Diffusion 1.x, HunyuanVideo, Wan 2.1 i2v and SkyReels-V2 i2v (a
second layout of the wan_i2v family). A case holds what is particular to its family: the sizes, and how its
diffusers pipeline encodes, draws noise, calls its network and samples. The tests say what every adapter must
do. What only one family does (SD's variance-preserving math, Wan's image conditioning, HunyuanVideo's chat
template, ...) is tested in ``tests/test_<family>_model.py``; where models come from (:mod:`raygrpo.models.hub`,
the preflight's ``check_pretrained``) and the tiny builds in ``tests/test_model_hub.py``.
"""

from __future__ import annotations

import inspect
import logging
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    HunyuanVideoPipeline,
    SkyReelsV2ImageToVideoPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    WanImageToVideoPipeline,
)
from PIL import Image

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import (
    MODEL_FAMILIES,
    VIDEO_FAMILIES,
    ModelAdapter,
    ModelNotFoundError,
    load_model,
    quantize_timestep,
    tiny_model_folder,
)
from raygrpo.models.base import LOAD_KEYWORDS
from raygrpo.models.hub import PIPELINE_COMPONENTS, pretrained_source
from raygrpo.sampling import alpha_bar_to_sigma, vp_scale

PROMPT = "a red fox running through a snowy forest"
STEPS = 4  # sampling-test steps: dyadic sigmas, exact in float32, so the pipelines' sigma * 1000 is the quantised timestep
LONG_PROMPT = ("a photo of a cat sitting on a wooden table in the garden at sunset " * 1500)[:100_000]


def _image(seed: int, size=(40, 48)) -> np.ndarray:
    """A smooth random picture, not of the output size (so the pipelines' resize is exercised)."""
    small = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size[::-1], Image.Resampling.BILINEAR))


IMAGE = _image(0)


# ------------------------------------------------------------------------------------------------- cases
@dataclass(eq=False)
class Case:
    """One tiny build, and its pipeline's own calls, which each family's subclass provides:

    ``pipeline_conditioning(model, pipe, prompt, image) -> {field: tensor}``; ``pipeline_negative(model, pipe)``
    (CFG families); ``pipeline_noise(model, pipe, generator, num, grid)``; ``network_velocity(model, pipe, latents,
    sigmas, cond, quantize=True)``, the network called as the pipeline calls it (conditional branch);
    ``pipeline_sample(model, pipe, noise, grid) -> (latents, uint8 pixels)``.
    """

    build: str  # tiny build (a family, or skyreels_v2_i2v)
    family: str
    pipeline_class: type
    load: dict  # from_pretrained keywords besides the folder
    latent_shape: tuple
    media_shape: tuple  # one decoded sample
    cond_shapes: dict  # Conditioning field -> shape; the others are None
    text_encoder: str  # the encoder encode_prompt runs once per new text
    token_limits: dict  # encoder -> tokens it reads (the truncation warning names them)
    guidance: float  # the family's default guidance_scale
    cfg: bool  # classifier-free guidance; else the guidance is embedded (guidance-distilled)
    image: bool = False  # image-to-video: each prompt group carries a conditioning image
    sampler: str = "ode"  # the ODE grid the sampling test integrates on, shift 1

    def velocity_sigmas(self, model) -> torch.Tensor:
        return torch.tensor([0.5371, 0.25])

    def pipeline_latents(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Final flow latents in the pipeline's coordinates (the same for flow models)."""
        return x


def _timestep(sigmas: torch.Tensor, quantize: bool) -> torch.Tensor:
    """DanceGRPO's ``int(sigma * 1000) / 1000``, spelled out (or the raw sigma)."""
    return torch.tensor([int(s * 1000) / 1000 for s in sigmas.tolist()]) if quantize else sigmas


def _euler(pipe):
    """The pipeline over the same components with a shift-1 Euler scheduler (custom sigmas stay as given)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    euler = type(pipe)(**{**pipe.components, "scheduler": scheduler})
    euler.set_progress_bar_config(disable=True)
    return euler


def _uint8(pixels) -> np.ndarray:
    return (np.asarray(pixels) * 255).round().astype(np.uint8)


class ImageFlowCase(Case):
    """FluxPipeline and StableDiffusion3Pipeline sample alike: custom sigmas, packed or not, latents given."""

    def pipeline_sample(self, model, pipe, noise, grid):
        kwargs = {"height": 64, "width": 64, "num_inference_steps": STEPS, "sigmas": grid[:-1].tolist(),
                  "guidance_scale": model.guidance_scale, "num_images_per_prompt": len(noise)}  # fmt: skip
        pipe = _euler(pipe)
        latents = pipe(PROMPT, latents=noise.clone(), output_type="latent", **kwargs).images
        return latents, _uint8(pipe(PROMPT, latents=noise.clone(), output_type="np", **kwargs).images)


class FluxCase(ImageFlowCase):
    def pipeline_conditioning(self, model, pipe, prompt, image):
        embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=512)
        return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        return pipe.prepare_latents(num, 4, 64, 64, torch.float32, "cpu", generator)[0]

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        return pipe.transformer(
            hidden_states=latents, timestep=_timestep(sigmas, quantize), guidance=torch.full([len(latents)], model.guidance_scale),
            pooled_projections=cond.pooled_prompt_embeds, encoder_hidden_states=cond.prompt_embeds,
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32), return_dict=False,
        )[0]  # fmt: skip


class SD3Case(ImageFlowCase):
    def pipeline_conditioning(self, model, pipe, prompt, image):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=256)
        return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}

    def pipeline_negative(self, model, pipe):
        _, negative, _, negative_pooled = pipe.encode_prompt(PROMPT, None, None, max_sequence_length=256)
        return {"prompt_embeds": negative[0], "pooled_prompt_embeds": negative_pooled[0]}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        return pipe.prepare_latents(num, 16, 64, 64, torch.float32, "cpu", generator)

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        return pipe.transformer(
            hidden_states=latents, timestep=_timestep(sigmas, quantize) * 1000, encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds, return_dict=False,
        )[0]  # fmt: skip


class SDCase(Case):
    """Stable Diffusion in flow coordinates ``y = x / s(sigma)`` (raygrpo.models.sd): the pipeline sees ``x``."""

    def velocity_sigmas(self, model):
        return model.sigma_grid("ddim", 10, 1.0)[[3, 6]]  # DDIM grid points: the UNet runs at integer timesteps

    def pipeline_latents(self, x, grid):
        return x * vp_scale(grid[-1]).float()

    def pipeline_conditioning(self, model, pipe, prompt, image):
        return {"prompt_embeds": pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]}

    def pipeline_negative(self, model, pipe):
        return {"prompt_embeds": pipe.encode_prompt(PROMPT, "cpu", 1, True)[1][0]}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        return pipe.prepare_latents(num, 4, 64, 64, torch.float32, "cpu", generator) / vp_scale(grid[0]).float()

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        # The training timestep whose noise level each sigma is, the UNet's epsilon at x = s y, and
        # v = (eps - y) / (1 - sigma) from y = (1 - sigma) x0 + sigma eps.
        table = alpha_bar_to_sigma(pipe.scheduler.alphas_cumprod.double())  # [T_train]
        timesteps = (table[None] - sigmas.double()[:, None]).abs().argmin(dim=1)  # [B]
        column = sigmas.reshape(-1, 1, 1, 1)
        eps = pipe.unet(latents * vp_scale(column).float(), timesteps, encoder_hidden_states=cond.prompt_embeds).sample
        return (eps - latents) / (1 - column)

    def pipeline_sample(self, model, pipe, noise, grid):
        # Euler on the DDIM grid in flow coordinates is DDIM with eta 0.
        kwargs = {"num_inference_steps": STEPS, "guidance_scale": model.guidance_scale, "eta": 0.0,
                  "num_images_per_prompt": len(noise), "height": 64, "width": 64}  # fmt: skip
        start = noise * vp_scale(grid[0]).float()
        latents = pipe(PROMPT, latents=start.clone(), output_type="latent", **kwargs).images
        return latents, _uint8(pipe(PROMPT, latents=start.clone(), output_type="np", **kwargs).images)


class HunyuanCase(Case):
    def pipeline_conditioning(self, model, pipe, prompt, image):
        embeds, pooled, mask = pipe.encode_prompt(prompt, prompt_template=model.prompt_template, max_sequence_length=32)
        return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0], "prompt_mask": mask[0]}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        return pipe.prepare_latents(num, 4, 32, 32, 5, torch.float32, "cpu", generator)

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        return pipe.transformer(
            hidden_states=latents, timestep=_timestep(sigmas, quantize) * 1000, encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.prompt_mask.float(), pooled_projections=cond.pooled_prompt_embeds,
            guidance=torch.full([len(latents)], model.guidance_scale * 1000.0), return_dict=False,
        )[0]  # fmt: skip

    def pipeline_sample(self, model, pipe, noise, grid):
        kwargs = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": STEPS, "sigmas": grid[:-1].tolist(),
                  "guidance_scale": model.guidance_scale, "num_videos_per_prompt": len(noise),
                  "prompt_template": model.prompt_template, "max_sequence_length": 32}  # fmt: skip
        pipe = _euler(pipe)
        latents = pipe(PROMPT, latents=noise.clone(), output_type="latent", **kwargs).frames
        return latents, _uint8(pipe(PROMPT, latents=noise.clone(), output_type="np", **kwargs).frames)


class WanCase(Case):
    """Wan 2.1 image-to-video, and SkyReels-V2 I2V (its pipeline's encoders and latent preparation are Wan's copies)."""

    def pipeline_conditioning(self, model, pipe, prompt, image):
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=32)
        picture = Image.fromarray(image)
        pixels = pipe.video_processor.preprocess(picture, height=32, width=32).float()
        _, condition = pipe.prepare_latents(pixels, 1, 8, 32, 32, 5, torch.float32, "cpu", None, torch.zeros(1, 8, 2, 4, 4))
        return {"prompt_embeds": embeds[0], "image_embeds": pipe.encode_image(picture, "cpu")[0], "image_latents": condition[0]}

    def pipeline_negative(self, model, pipe):
        return {"prompt_embeds": pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True, max_sequence_length=32)[1][0]}

    def pipeline_noise(self, model, pipe, generator, num, grid):
        pixels = pipe.video_processor.preprocess(Image.fromarray(IMAGE), height=32, width=32).float()
        return pipe.prepare_latents(pixels, num, 8, 32, 32, 5, torch.float32, "cpu", generator)[0]

    def network_velocity(self, model, pipe, latents, sigmas, cond, quantize=True):
        return pipe.transformer(
            hidden_states=torch.cat([latents, cond.image_latents], dim=1), timestep=_timestep(sigmas, quantize) * 1000,
            encoder_hidden_states=cond.prompt_embeds, encoder_hidden_states_image=cond.image_embeds, return_dict=False,
        )[0]  # fmt: skip

    def pipeline_sample(self, model, pipe, noise, grid):
        # The i2v pipelines take no custom sigmas: their scheduler is handed the grid. Two prompts rather than
        # num_videos_per_prompt=2, because the pipelines repeat the image states per prompt only.
        pipe = _euler(pipe)
        set_timesteps = pipe.scheduler.set_timesteps
        pipe.scheduler.set_timesteps = lambda num_steps, device=None: set_timesteps(sigmas=grid[:-1].tolist(), device=device)
        kwargs = {"image": Image.fromarray(IMAGE), "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": STEPS,
                  "guidance_scale": model.guidance_scale, "max_sequence_length": 32}  # fmt: skip
        prompts = [PROMPT] * len(noise)
        latents = pipe(prompt=prompts, latents=noise.clone(), output_type="latent", **kwargs).frames
        assert torch.equal(pipe.scheduler.sigmas, grid)  # the pipeline really sampled on this grid
        return latents, _uint8(pipe(prompt=prompts, latents=noise.clone(), output_type="np", **kwargs).frames)


IMAGE_SIZE = {"height": 64, "width": 64}
VIDEO_SIZE = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 32}
WAN_CONDITIONING = {"prompt_embeds": (32, 32), "image_embeds": (17, 16), "image_latents": (4 + 8, 2, 4, 4)}

CASES = [
    FluxCase("flux", "flux", FluxPipeline, IMAGE_SIZE, (16, 16), (64, 64, 3),
             {"prompt_embeds": (512, 32), "pooled_prompt_embeds": (32,)}, "text_encoder_2", {"CLIP": 77, "T5": 512}, 3.5, cfg=False),
    SD3Case("sd3", "sd3", StableDiffusion3Pipeline, IMAGE_SIZE, (16, 8, 8), (64, 64, 3),
            {"prompt_embeds": (77 + 256, 64), "pooled_prompt_embeds": (48,)}, "text_encoder_3", {"CLIP": 77, "T5": 256}, 4.5, cfg=True),
    SDCase("sd", "sd", StableDiffusionPipeline, IMAGE_SIZE, (4, 8, 8), (64, 64, 3),
           {"prompt_embeds": (77, 32)}, "text_encoder", {"CLIP": 77}, 5.0, cfg=True, sampler="ddim"),
    HunyuanCase("hunyuan_video", "hunyuan_video", HunyuanVideoPipeline, VIDEO_SIZE, (4, 2, 4, 4), (5, 32, 32, 3),
                {"prompt_embeds": (32, 32), "pooled_prompt_embeds": (16,), "prompt_mask": (32,)}, "text_encoder",
                {"Llama": "32 + crop_start", "CLIP": 77}, 6.0, cfg=False),
    WanCase("wan_i2v", "wan_i2v", WanImageToVideoPipeline, VIDEO_SIZE, (8, 2, 4, 4), (5, 32, 32, 3),
            WAN_CONDITIONING, "text_encoder", {"UMT5": 32}, 5.0, cfg=True, image=True),
    WanCase("skyreels_v2_i2v", "wan_i2v", SkyReelsV2ImageToVideoPipeline, VIDEO_SIZE, (8, 2, 4, 4), (5, 32, 32, 3),
            WAN_CONDITIONING, "text_encoder", {"UMT5": 32}, 5.0, cfg=True, image=True),
]  # fmt: skip


@pytest.fixture(scope="module", params=CASES, ids=[c.build for c in CASES])
def case(request) -> Case:
    return request.param


@pytest.fixture(scope="module")
def folder(case) -> Path:
    return tiny_model_folder(case.build)  # in the session's private cache (conftest)


@pytest.fixture(scope="module")
def pipe(case, folder):
    pipe = case.pipeline_class.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(case, folder) -> ModelAdapter:
    return MODEL_FAMILIES[case.family].from_pretrained(str(folder), **case.load)


def _image_for(case: Case) -> np.ndarray | None:
    return IMAGE if case.image else None


def _batch(model, case: Case, n: int, prompt: str = PROMPT) -> ConditioningBatch:
    return ConditioningBatch.of(model.encode_prompt(prompt, _image_for(case)), n)


def _modules(model) -> list[torch.nn.Module]:
    names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")
    return [m for m in (getattr(model, n, None) for n in names) if m is not None]


# ------------------------------------------------------------------------------------------------ loading
def test_loads_from_a_saved_tiny_folder_reading_its_components(case, folder, model, monkeypatch):
    assert isinstance(model, ModelAdapter) and type(model) is MODEL_FAMILIES[case.family] and model.family == case.family
    assert getattr(model, model.network_component) is model.transformer  # checkpoints save the network under this name
    assert model.latent_shape == case.latent_shape and model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.guidance_scale == case.guidance  # the pipeline's default (HunyuanVideo's embedded 6.0, ...)
    for module in _modules(model):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    # What loading reads of the folder is what check_pretrained requires of it.
    read = []
    adapter_module = sys.modules[type(model).__module__]
    load_component = adapter_module.load_component

    def spy(source, cls_, subfolder, *args, **kwargs):
        read.append(subfolder)
        return load_component(source, cls_, subfolder, *args, **kwargs)

    monkeypatch.setattr(adapter_module, "load_component", spy)
    type(model).from_pretrained(str(folder), **case.load)
    assert sorted(read) == sorted(PIPELINE_COMPONENTS[case.family])


def test_from_pretrained_takes_the_keywords_load_model_passes(case):
    parameters = inspect.signature(MODEL_FAMILIES[case.family].from_pretrained).parameters
    assert set(LOAD_KEYWORDS) <= set(parameters)
    assert ("num_frames" in parameters) == (case.family in VIDEO_FAMILIES)


def test_tiny_random_is_the_familys_own_tiny_build(case):
    if case.build != case.family:
        pytest.skip("a second tiny build of a family loads from its folder only")
    assert pretrained_source(case.family, "tiny-random") == str(tiny_model_folder(case.family))
    learner = load_model(case.family, "tiny-random", load_text_encoders=False, load_vae=False)
    assert type(learner) is MODEL_FAMILIES[case.family] and learner.latent_shape == case.latent_shape  # tiny default sizes


def test_the_learner_view_is_the_network_alone(case, folder):
    family = MODEL_FAMILIES[case.family]
    learner = family.from_pretrained(str(folder), load_text_encoders=False, load_vae=False, guidance_scale=1.0, **case.load)
    assert learner.vae is None and learner.text_encoder is None and learner.latent_shape == case.latent_shape
    with pytest.raises(RuntimeError, match="load_text_encoders"):
        learner.encode_prompt(PROMPT, _image_for(case))
    with pytest.raises(RuntimeError, match="load_vae"):
        learner.decode(torch.zeros(1, *case.latent_shape))
    with pytest.raises(ValueError, match="multiples of 16"):
        family.from_pretrained(str(folder), load_text_encoders=False, load_vae=False, **{**case.load, "height": 72})


def test_a_folder_without_a_component_or_index_is_a_clear_error(case, folder, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    network = MODEL_FAMILIES[case.family].network_component
    shutil.rmtree(partial / network)
    with pytest.raises(ModelNotFoundError, match=f"no {network}/ folder.*incomplete"):
        MODEL_FAMILIES[case.family].from_pretrained(str(partial), **case.load)
    (partial / "model_index.json").unlink()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        MODEL_FAMILIES[case.family].from_pretrained(str(partial), **case.load)


# ------------------------------------------------------------------------------------------- conditioning
def test_encode_prompt_is_the_pipelines_encoding(case, model, pipe):
    cond = model.encode_prompt(PROMPT, _image_for(case))
    for name in ("prompt_embeds", "pooled_prompt_embeds", "prompt_mask", "image_embeds", "image_latents"):
        array = getattr(cond, name)
        if name not in case.cond_shapes:
            assert array is None, name
            continue
        assert array.shape == case.cond_shapes[name] and array.dtype == (np.int64 if name == "prompt_mask" else np.float32), name
    with torch.no_grad():
        expected = case.pipeline_conditioning(model, pipe, PROMPT, _image_for(case))
    assert expected.keys() == case.cond_shapes.keys()
    for name, tensor in expected.items():
        np.testing.assert_allclose(getattr(cond, name), tensor.numpy(), atol=1e-6, err_msg=name)


def test_encode_prompt_runs_the_text_encoder_once_per_text(case, model):
    calls = []
    hook = getattr(model, case.text_encoder).register_forward_hook(lambda *args: calls.append(1))
    try:
        first = model.encode_prompt(f"{PROMPT} once", _image_for(case))
        again = model.encode_prompt(f"{PROMPT} once", _image_for(case))
        assert len(calls) == 1 and again.prompt_embeds is first.prompt_embeds
        model.encode_prompt(f"{PROMPT} twice", _image_for(case))
        assert len(calls) == 2
    finally:
        hook.remove()


def test_encode_prompt_takes_an_image_exactly_where_the_family_is_image_conditioned(case, model):
    if case.image:
        with pytest.raises(ValueError, match="without a conditioning image"):
            model.encode_prompt(PROMPT)
    else:
        with pytest.raises(ValueError, match="text-to-(image|video)"):
            model.encode_prompt(PROMPT, np.zeros((32, 32, 3), np.uint8))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_over_long_prompts_are_truncated_with_one_warning(case, folder, caplog):
    """A 100k-character prompt encodes to the usual shapes; one WARNING per model names each limit and the tokens dropped."""
    model = MODEL_FAMILIES[case.family].from_pretrained(str(folder), **case.load)  # its own model: the warning is once per model
    libraries = _Records()
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).addHandler(libraries)
    try:
        with caplog.at_level(logging.WARNING, logger="raygrpo.models"):
            conds = [model.encode_prompt(text, _image_for(case)) for text in (LONG_PROMPT, LONG_PROMPT[:20_000] + " dog")]
    finally:
        for name in ("diffusers", "transformers"):
            logging.getLogger(name).removeHandler(libraries)
    for cond in conds:
        assert {n: getattr(cond, n).shape for n in case.cond_shapes} == case.cond_shapes
    warnings = [r for r in caplog.records if r.name.startswith("raygrpo.models")]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    limits = dict(re.findall(r"(\w+): \d+ tokens, limit (\d+), \d+ dropped", warnings[0].getMessage()))
    expected = dict(case.token_limits)
    if "Llama" in expected:  # the chat template's own tokens come before the prompt's 32
        expected["Llama"] = 32 + model.prompt_template["crop_start"]
    assert limits == {name: str(limit) for name, limit in expected.items()}
    said = [r.getMessage()[:80] for r in libraries.records if r.levelno >= logging.WARNING]
    assert not [m for m in said if "truncated" in m or "Token indices" in m], said  # no per-prompt echo of the dropped text


def test_the_cfg_negative_is_the_pipelines_empty_prompt(case, model, pipe):
    if not case.cfg:
        pytest.skip("guidance-distilled: no negative prompt")
    negative = model.negative_conditioning
    assert model.negative_conditioning is negative  # encoded once
    with torch.no_grad():
        expected = case.pipeline_negative(model, pipe)
    for name, tensor in expected.items():
        np.testing.assert_allclose(getattr(negative, name), tensor.numpy(), atol=1e-6, err_msg=name)


# --------------------------------------------------------------------------------------- noise and grid
@pytest.mark.parametrize("sampler", ["ode", "dance_sde", "flow_sde", "dpmpp_2m", "ddim"])
def test_sigma_grid_runs_from_about_one_down_to_zero(case, model, sampler):
    # ddim is for variance-preserving models only, the SDEs for rectified flows only.
    supported = ("ddim", "ode", "dpmpp_2m") if case.family == "sd" else ("ode", "dance_sde", "flow_sde", "dpmpp_2m")
    if sampler not in supported:
        with pytest.raises(ValueError):
            model.sigma_grid(sampler, 10, 3.0)
        return
    grid = model.sigma_grid(sampler, 10, 3.0)
    assert grid.shape == (11,) and grid.dtype == torch.float32
    assert bool((grid[1:] < grid[:-1]).all()) and 0.5 < float(grid[0]) <= 1.0 and float(grid[-1]) >= 0.0
    if case.family != "sd" and sampler != "dpmpp_2m":
        assert float(grid[0]) == 1.0  # DanceGRPO's schedule starts at pure noise (diffusers' DPM grid just below it)
    if sampler in ("ode", "dpmpp_2m"):
        assert float(grid[-1]) == 0.0  # ODE samplers land on x0


def test_initial_noise_is_the_pipelines_and_fixed_per_seed_and_member(case, model, pipe):
    grid = model.sigma_grid(case.sampler, STEPS, 1.0)  # rollout's order: a VP model scales its noise to the grid
    noise = model.initial_noise(torch.Generator().manual_seed(3), 4)
    assert noise.shape == (4, *case.latent_shape) and noise.dtype == torch.float32
    expected = case.pipeline_noise(model, pipe, torch.Generator().manual_seed(3), 4, grid)
    torch.testing.assert_close(noise, expected.float(), rtol=1e-6, atol=1e-6)
    # Member i's noise does not depend on how many are drawn: a spread group is the same wherever sampled.
    assert torch.equal(model.initial_noise(torch.Generator().manual_seed(3), 2), noise[:2])
    assert not torch.equal(model.initial_noise(torch.Generator().manual_seed(4), 2), noise[:2])


# --------------------------------------------------------------------------------------------- velocity
def test_velocity_is_the_pipelines_network_call(case, model, pipe):
    cond = _batch(model, case, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(0), 2)
    sigmas = case.velocity_sigmas(model)
    scale = 1.0 if case.cfg else model.guidance_scale  # the conditional forward alone; distilled models embed their scale
    with torch.no_grad():
        velocity = model.velocity(latents, sigmas, cond, guidance_scale=scale)
        expected = case.network_velocity(model, pipe, latents, sigmas, cond)
        unquantised = case.network_velocity(model, pipe, latents, sigmas, cond, quantize=False)
    assert velocity.shape == (2, *case.latent_shape) and velocity.dtype == torch.float32
    torch.testing.assert_close(velocity, expected.float(), atol=1e-5, rtol=1e-5)
    if case.family != "sd":  # SD's timestep is the training timestep of sigma, not quantised
        assert not torch.allclose(velocity, unquantised, atol=1e-7)  # the quantisation is really applied
    with pytest.raises(ValueError, match="latents have"):
        model.velocity(latents[:, :1], sigmas, cond)


def test_guidance_is_one_forward(case, model):
    """CFG: one batched forward over [unconditional, conditional], combined v_u + s (v_c - v_u); distilled: embedded."""
    cond = _batch(model, case, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(1), 2)
    sigmas = case.velocity_sigmas(model)
    batches = []
    hook = model.transformer.register_forward_hook(lambda module, args, output: batches.append(output[0].shape[0]))
    try:
        with torch.no_grad():
            guided = model.velocity(latents, sigmas, cond)  # None: the model's own guidance_scale
            assert batches == [4 if case.cfg else 2]
            conditional = model.velocity(latents, sigmas, cond, guidance_scale=1.0)
            assert torch.equal(model.velocity(latents, sigmas, cond, guidance_scale=model.guidance_scale), guided)
            if case.cfg:
                assert torch.equal(model.velocity(latents, sigmas, cond, guidance_scale=0.0), conditional)  # <= 1: no CFG
                negative = ConditioningBatch.of(model.negative_conditioning, 2)
                negative = replace(negative, image_embeds=cond.image_embeds, image_latents=cond.image_latents)  # same image
                unconditional = model.velocity(latents, sigmas, negative, guidance_scale=1.0)
    finally:
        hook.remove()
    assert not torch.allclose(guided, conditional, atol=1e-4)  # the guidance is live
    if case.cfg:
        torch.testing.assert_close(guided, unconditional + model.guidance_scale * (conditional - unconditional), atol=1e-4, rtol=1e-5)


def test_a_cfg_learner_guides_without_keeping_text_encoders(case, folder, model):
    """The learner loads no text encoder yet applies the rollout's CFG (Flow-GRPO / DanceGRPO recipes)."""
    if not case.cfg:
        pytest.skip("guidance-distilled: no negative prompt")
    learner = MODEL_FAMILIES[case.family].from_pretrained(str(folder), load_text_encoders=False, load_vae=False, **case.load)
    unguided = MODEL_FAMILIES[case.family].from_pretrained(
        str(folder), load_text_encoders=False, load_vae=False, guidance_scale=1.0, **case.load
    )
    unguided.set_negative_conditioning(model.negative_conditioning)  # a negative encoded elsewhere
    cond = _batch(model, case, 2)
    latents = model.initial_noise(torch.Generator().manual_seed(2), 2)
    sigmas = case.velocity_sigmas(model)
    with torch.no_grad():
        expected = model.velocity(latents, sigmas, cond)
        torch.testing.assert_close(learner.velocity(latents, sigmas, cond), expected)
        torch.testing.assert_close(unguided.velocity(latents, sigmas, cond, guidance_scale=model.guidance_scale), expected)
    assert learner.text_encoder is None and learner.vae is None  # encoded for the negative only, then dropped


@pytest.mark.parametrize("guidance", ["the model's", "none"])
def test_velocity_is_differentiable(case, folder, model, guidance):
    policy = MODEL_FAMILIES[case.family].from_pretrained(str(folder), load_text_encoders=False, load_vae=False, **case.load)
    if case.cfg:
        policy.set_negative_conditioning(model.negative_conditioning)
    policy.transformer.requires_grad_(True)
    latents = policy.initial_noise(torch.Generator().manual_seed(0), 1)
    scale = None if guidance == "the model's" else 1.0
    policy.velocity(latents, case.velocity_sigmas(model)[:1], _batch(model, case, 1), guidance_scale=scale).square().mean().backward()
    grads = [p.grad for p in policy.transformer.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


# ----------------------------------------------------------------------------------- decode and sampling
def test_decode_gives_uint8_pixels_whatever_the_chunking(case, model):
    latents = model.initial_noise(torch.Generator().manual_seed(5), 2)
    pixels = model.decode(latents)
    assert pixels.shape == (2, *case.media_shape) and pixels.dtype == np.uint8 and pixels.std() > 0
    # One at a time gives the same pixels up to float rounding of batched convolutions.
    assert np.abs(model.decode(latents, batch_size=1).astype(int) - pixels.astype(int)).max() <= 1


def test_euler_sampling_and_decode_match_the_pipeline(case, model, pipe):
    """The adapter's whole loop (Euler on its own grid, guidance as configured, decode) against the pipeline's."""
    grid = model.sigma_grid(case.sampler, STEPS, 1.0)
    if case.family != "sd":
        assert torch.equal(grid, torch.linspace(1, 0, STEPS + 1)) and torch.equal(quantize_timestep(grid) * 1000, grid * 1000)
    noise = model.initial_noise(torch.Generator().manual_seed(11), 2)
    cond = _batch(model, case, 2)
    x = noise.clone()
    with torch.no_grad():
        for sigma, sigma_next in zip(grid[:-1], grid[1:]):
            x = x + (sigma_next - sigma) * model.velocity(x, sigma.expand(2), cond)
    latents = case.pipeline_latents(x, grid)
    with torch.no_grad():
        expected_latents, expected_pixels = case.pipeline_sample(model, pipe, noise, grid)
    torch.testing.assert_close(latents, expected_latents, atol=1e-5, rtol=1e-5)
    assert np.abs(model.decode(latents).astype(int) - expected_pixels.astype(int)).max() <= 1
