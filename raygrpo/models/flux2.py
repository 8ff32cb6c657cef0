"""FLUX.2 adapter: FLUX.2 [dev] and the small FLUX.2 [klein] models behind one family, ``flux2``.

Rollout and learner talk to :class:`Flux2Model` exactly as to :class:`~raygrpo.models.flux.FluxModel`. The
code reuses the diffusers pipelines' own helpers (``encode_prompt``, ``_pack_latents``, ``_prepare_latent_ids``,
``_prepare_text_ids``, ``_unpack_latents_with_ids``, ``_unpatchify_latents``; diffusers
``pipelines/flux2/pipeline_flux2.py`` and ``pipeline_flux2_klein.py``) so that the numbers are the pipelines'.
What FLUX.2 does differently from FLUX.1:

- **Text**: one decoder-only language model, run over the prompt in its chat template (padded to
  ``max_sequence_length`` tokens, template included); ``prompt_embeds [L, 3 D]`` are three of its hidden
  states side by side (klein: Qwen3 layers 9, 18, 27; dev: Mistral Small 3.1 layers 10, 20, 30, with
  FLUX.2's system message). No pooled vector, no attention mask into the transformer.
- **Latents**: the VAE's latents (32 channels at x8) are patchified 2x2 *before* the transformer sees
  them and normalised by the VAE's batch-norm statistics; the noise is drawn directly in that space,
  ``[B, 4C, H/16, W/16]``, and packed to tokens ``[B, S, 4C]`` (``S = (H/16)(W/16)``). Decoding undoes the
  normalisation and the patchify before the VAE: ``x * sqrt(var + eps) + mean``.
- **Positions**: 4-axis RoPE ids ``(t, h, w, l)``: image tokens ``(0, i, j, 0)``, text tokens ``(0, 0, 0, l)``.
- **Timestep**: the pipelines feed ``sigma`` (``t / 1000``) and the transformer multiplies by 1000 itself;
  raygrpo feeds :func:`~raygrpo.models.base.quantize_timestep` of sigma, as for FLUX.1.
- **Schedule**: the pipelines shift ``linspace(1, 1/N, N)`` by an empirical ``mu`` of the image token count
  and the step count (``compute_empirical_mu``); raygrpo samples on its own grid with ``rollout.shift``,
  which equals the pipeline's shift at ``shift = exp(mu)`` (the presets say which value they use).

Variants (:data:`VARIANTS`, told apart by the folder's ``model_index.json``):

- FLUX.2 [dev], ``Flux2Pipeline`` (``black-forest-labs/FLUX.2-dev``, 32B): guidance-distilled, the guidance
  value enters an embedding (``guidance * 1000`` inside the transformer), one forward.
- FLUX.2 [klein] base, ``Flux2KleinPipeline`` with ``is_distilled: false`` (``FLUX.2-klein-base-4B`` / ``-9B``):
  no guidance embedding; classifier-free guidance over the empty prompt, ``v_u + s (v_c - v_u)`` (the
  pipeline runs two forwards, here one batched forward).
- FLUX.2 [klein], ``is_distilled: true`` (``FLUX.2-klein-4B`` / ``-9B``): step-distilled (4 steps); the
  pipeline ignores the guidance scale, so does this adapter: one forward.

Not loaded, with a clear error: the klein KV-cache and inpainting pipelines, and any other layout.
Reference images (FLUX.2's multi-reference editing) are not part of this text-to-image family.
Deviation: the real [dev] ``tokenizer/`` holds a ``PixtralProcessor``, which needs torchvision; it is loaded
with ``AutoTokenizer`` (its tokenizer and chat template), which is all the pipeline's text-only encoding uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import format_input
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, Mistral3ForConditionalGeneration, Qwen3ForCausalLM

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import CFGNegative, PromptTruncation, TokenLimit, classifier_free_guidance, quantize_timestep, to_uint8_images
from raygrpo.models.hub import DEFAULT_RESOLUTION, TINY_RANDOM, ModelNotFoundError, component_config, load_component, pretrained_source

TINY_RESOLUTION = 64  # the tiny model is for fast CPU runs
DEFAULT_GUIDANCE = 4.0  # both pipelines' default guidance_scale (ignored by step-distilled klein)
_SENTINEL = "\x00prompt\x00"  # stands for the prompt when the chat template is rendered for token counting

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One FLUX.2 pipeline layout (see the module docstring)."""

    name: str
    pipeline: type  # for its encode_prompt and latent helpers
    text_encoder: type
    encoder_name: str  # what the truncation warning calls the text encoder
    guidance: Literal["embedded", "cfg", "none"]  # how guidance_scale acts


DEV = Variant("FLUX.2 [dev]", Flux2Pipeline, Mistral3ForConditionalGeneration, "Mistral3", "embedded")
KLEIN_BASE = Variant("FLUX.2 [klein] base", Flux2KleinPipeline, Qwen3ForCausalLM, "Qwen3", "cfg")
KLEIN = Variant("FLUX.2 [klein] (step-distilled)", Flux2KleinPipeline, Qwen3ForCausalLM, "Qwen3", "none")
VARIANTS = {"Flux2Pipeline": DEV, "Flux2KleinPipeline": KLEIN_BASE}  # klein with is_distilled: true is KLEIN


def pipeline_variant(source: str) -> Variant:
    """The :class:`Variant` of the pipeline in ``source`` (its ``model_index.json``); other layouts fail here, before any weights load."""
    index = Flux2Pipeline.load_config(source)
    name = index.get("_class_name")
    if name == "Flux2KleinPipeline":
        return KLEIN if index.get("is_distilled") else KLEIN_BASE
    if name in VARIANTS:
        return VARIANTS[name]
    raise ModelNotFoundError(
        f"{source} holds a {name}, which model.family flux2 does not load: it loads the text-to-image layouts "
        f"{sorted(VARIANTS)} (FLUX.2 [dev], [klein] and [klein] base checkpoints)"
    )


class Flux2Model(CFGNegative):
    """A FLUX.2 [dev] or [klein] text-to-image model as rollout and learner use it.

    Components (diffusers / transformers types):

    - ``transformer``: :class:`~diffusers.Flux2Transformer2DModel`, the trainable velocity network;
    - ``vae``: :class:`~diffusers.AutoencoderKLFlux2` (x8, with batch-norm latent statistics), decode only;
    - ``text_encoder`` / ``tokenizer``: :class:`~transformers.Qwen3ForCausalLM` (klein) or
      :class:`~transformers.Mistral3ForConditionalGeneration` (dev) and its tokenizer with the chat template;
    - ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler`, config only;
    - ``variant``: the :class:`Variant` (None at construction: dev if the transformer embeds guidance, else klein base).

    Text encoder and VAE may be absent (the learner needs only the transformer, and for CFG the empty
    prompt's encoding: :attr:`negative_conditioning`). All modules are in eval mode with gradients off.
    """

    family = "flux2"
    network_component = "transformer"  # the pipeline component the trained network is (checkpoints and export name it so)

    def __init__(
        self,
        transformer: Flux2Transformer2DModel,
        *,
        vae: AutoencoderKLFlux2 | None = None,
        text_encoder: Qwen3ForCausalLM | Mistral3ForConditionalGeneration | None = None,
        tokenizer: Any = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        vae_scale_factor: int | None = None,
        height: int = DEFAULT_RESOLUTION,
        width: int = DEFAULT_RESOLUTION,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = 512,
        variant: Variant | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler = scheduler
        self.variant = variant or (DEV if transformer.config.guidance_embeds else KLEIN_BASE)
        self.guidance = self.variant.guidance  # CFG on [klein] base only
        if vae_scale_factor is None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.vae_scale_factor = vae_scale_factor
        multiple = 2 * vae_scale_factor  # one token covers a 2x2 patch of latent pixels
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        self.height, self.width = height, width
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=vae_scale_factor * 2)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._truncation = PromptTruncation(logger)
        self._ids_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pipeline: Flux2Pipeline | Flux2KleinPipeline | None = None

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_text_encoders: bool = True,
        load_vae: bool = True,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = 512,
    ) -> Flux2Model:
        """Load from a hub id, a local diffusers folder, or ``"tiny-random"`` (the tiny klein base), component by component.

        ``height``/``width`` default to 64 for ``"tiny-random"`` and 512 otherwise. A klein base learner
        (no text encoder) with ``guidance_scale > 1`` loads the text encoder on the CPU once for the
        empty prompt's encoding, then frees it.
        """
        source = pretrained_source("flux2", name_or_path)
        variant = pipeline_variant(source)
        negative_only = not load_text_encoders and variant.guidance == "cfg" and guidance_scale > 1.0

        def load(cls_, subfolder: str, **kwargs):
            on = "cpu" if negative_only and subfolder == "text_encoder" else device
            return load_component(source, cls_, subfolder, on, **kwargs)

        transformer = load(Flux2Transformer2DModel, "transformer", torch_dtype=torch_dtype)
        scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
        text_modules = {}
        if load_text_encoders or negative_only:
            # transformers 5 names the argument ``dtype``; ``torch_dtype`` only warns.
            text_modules = dict(tokenizer=load(AutoTokenizer, "tokenizer"), text_encoder=load(variant.text_encoder, "text_encoder", dtype=torch_dtype))
        vae = load(AutoencoderKLFlux2, "vae", torch_dtype=torch_dtype) if load_vae else None
        # Latent geometry from the VAE's config on both sides, so that rollout and learner agree.
        vae_scale_factor = 2 ** (len(component_config(source, AutoencoderKLFlux2, "vae")["block_out_channels"]) - 1)
        default = TINY_RESOLUTION if str(name_or_path) == TINY_RANDOM else DEFAULT_RESOLUTION
        model = cls(
            transformer,
            vae=vae,
            scheduler=scheduler,
            vae_scale_factor=vae_scale_factor,
            height=height or default,
            width=width or default,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            variant=variant,
            **text_modules,
        )
        if negative_only:
            model.keep_negative_only("text_encoder", "tokenizer", "_pipeline")
        return model

    # -------------------------------------------------------------------------------- properties
    @property
    def token_grid(self) -> tuple[int, int]:
        """``(h, w)`` tokens of one image: a token is a 2x2 patch of latent pixels."""
        return self.height // (2 * self.vae_scale_factor), self.width // (2 * self.vae_scale_factor)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(S, D)`` of one packed latent: ``S = h w`` tokens of ``D = 4C`` patchified, normalised channels."""
        h, w = self.token_grid
        return h * w, self.transformer.config.in_channels

    @property
    def unpacked_latent_shape(self) -> tuple[int, int, int]:
        """``(C, 2h, 2w)``: what the VAE decodes for one image (the planner's decode input)."""
        h, w = self.token_grid
        return self.transformer.config.in_channels // 4, 2 * h, 2 * w

    @property
    def pipeline(self) -> Flux2Pipeline | Flux2KleinPipeline:
        """The variant's pipeline over the loaded components (absent ones are None), for its helpers."""
        if self._pipeline is None:
            self._pipeline = self.variant.pipeline(
                scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, transformer=self.transformer
            )
        return self._pipeline

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """``prompt_embeds [max_sequence_length, 3 D]``: the pipeline's ``encode_prompt`` of ``prompt``, once per process.

        The chat template counts against ``max_sequence_length``; longer prompts are truncated as the
        pipeline truncates them (one warning per model). A repeated prompt returns the same object.
        """
        if image is not None:
            raise ValueError("FLUX.2 here is text-to-image: a prompt group with a conditioning image needs an image-conditioned family")
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        if self.text_encoder is None:
            raise RuntimeError("this Flux2Model was loaded with load_text_encoders=False and cannot encode prompts")
        limit = TokenLimit(self.variant.encoder_name, self.tokenizer, self.max_sequence_length, self._chat_template())
        self._truncation.check(prompt, [limit])
        with torch.inference_mode(), PromptTruncation.quiet(self.pipeline):
            embeds, _ = self.pipeline.encode_prompt(prompt=prompt, device=self.text_encoder.device, max_sequence_length=self.max_sequence_length)
        conditioning = Conditioning(prompt_embeds=embeds[0].float().cpu().numpy())
        self._prompt_cache[prompt] = conditioning
        return conditioning

    def _chat_template(self) -> str:
        """The text the pipeline tokenizes, with ``{}`` for the prompt (what :class:`PromptTruncation` counts)."""
        if self.tokenizer.chat_template is None:
            raise ModelNotFoundError(
                f"the tokenizer of this {self.variant.name} model has no chat template (tokenizer/chat_template.jinja), which its "
                "pipeline renders every prompt in: download the whole tokenizer/ folder of the checkpoint"
            )
        if self.variant is DEV:  # format_input: FLUX.2's system message, then the prompt
            messages = format_input([_SENTINEL], self.pipeline.system_message)[0]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        else:
            messages = [{"role": "user", "content": _SENTINEL}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        return text.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{}")

    # ----------------------------------------------------------------------------------- latents
    def initial_noise(self, generator: torch.Generator | None, num: int) -> torch.Tensor:
        """``[num, S, D]`` float32 noise, drawn ``[num, D, h, w]`` (patchified space) and packed, as the pipelines' ``prepare_latents``."""
        h, w = self.token_grid
        noise = randn_tensor((num, self.latent_shape[1], h, w), generator=generator, device=self.device, dtype=torch.float32)
        return Flux2Pipeline._pack_latents(noise)  # [num, S, D]

    def _position_ids(self, text_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Text ids ``[L, 4]`` ``(0, 0, 0, l)`` and image ids ``[S, 4]`` ``(0, i, j, 0)``, as the pipelines make them."""
        key = (text_length, device)
        if key not in self._ids_cache:
            h, w = self.token_grid
            txt_ids = Flux2Pipeline._prepare_text_ids(torch.empty(1, text_length, 1))[0]
            img_ids = Flux2Pipeline._prepare_latent_ids(torch.empty(1, 1, h, w))[0]
            self._ids_cache[key] = (txt_ids.to(device), img_ids.to(device))
        return self._ids_cache[key]

    def velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, cond: ConditioningBatch, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """The velocity ``v ~ noise - x0`` at noise levels ``sigmas``, float32 ``[B, S, D]``.

        ``latents [B, S, D]``, ``sigmas [B]`` (or a scalar), ``cond.prompt_embeds [B, L, 3 D_text]``.
        ``guidance_scale`` None is ``self.guidance_scale``; what it does is the variant's: [dev] embeds
        it (one forward); [klein] base applies CFG above 1 (one batched forward over the empty prompt
        and the prompt, ``v_u + s (v_c - v_u)``), none at or below 1; step-distilled [klein] ignores it.
        The timestep is :func:`quantize_timestep` of sigma. Gradients flow when the caller enables them.
        """
        batch, tokens, _ = latents.shape
        if tokens != self.latent_shape[0]:
            raise ValueError(f"latents have {tokens} tokens; {self.height}x{self.width} images have {self.latent_shape[0]}")
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        device, dtype = self.device, self.dtype
        sigmas = torch.as_tensor(sigmas, device=device).reshape(-1).expand(batch)
        timestep = quantize_timestep(sigmas)  # [B]; the transformer multiplies by 1000
        hidden = latents.to(device, dtype)  # [B, S, D]
        embeds = cond.prompt_embeds.to(device, dtype)  # [B, L, 3 D_text]
        guidance = torch.full((batch,), scale, device=device) if self.variant.guidance == "embedded" else None
        guided = self.variant.guidance == "cfg" and scale > 1.0
        if guided:
            negative = torch.from_numpy(self.negative_conditioning.prompt_embeds).to(device, dtype)  # [L, 3 D_text]
            if negative.shape != embeds.shape[1:]:
                raise ValueError(
                    f"prompt_embeds are {tuple(embeds.shape[1:])} per sample but the negative prompt's are {tuple(negative.shape)}: "
                    "encode both with the same max_sequence_length"
                )
            # Unconditional first, as classifier_free_guidance reads them: one forward serves both branches.
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])  # [2B, S, D], [2B]
            embeds = torch.cat([negative[None].expand_as(embeds), embeds])  # [2B, L, 3 D_text]
        txt_ids, img_ids = self._position_ids(embeds.shape[1], device)
        prediction = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0].float()  # [B or 2B, S, D]
        return classifier_free_guidance(prediction, scale) if guided else prediction

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Packed latents ``[B, S, D]`` to uint8 images ``[B, H, W, 3]``, as the pipelines' output path.

        Tokens back to ``[B, D, h, w]``, the batch-norm normalisation undone, the 2x2 patchify undone, VAE
        decode, postprocess. ``batch_size`` bounds how many images the VAE decodes at once.
        """
        if self.vae is None:
            raise RuntimeError("this Flux2Model was loaded with load_vae=False and cannot decode")
        vae, images = self.vae, []
        _, img_ids = self._position_ids(1, torch.device("cpu"))
        mean = vae.bn.running_mean.view(1, -1, 1, 1)  # [1, D, 1, 1]
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)  # [1, D, 1, 1]
        for chunk in torch.as_tensor(latents).split(batch_size or len(latents)):
            chunk = chunk.to(vae.device, vae.dtype)
            grid = Flux2Pipeline._unpack_latents_with_ids(chunk, img_ids.to(vae.device).expand(len(chunk), -1, -1))  # [b, D, h, w]
            pixels = Flux2Pipeline._unpatchify_latents(grid * std.to(grid) + mean.to(grid))  # [b, C, 2h, 2w]
            decoded = vae.decode(pixels, return_dict=False)[0]  # [b, 3, H, W]
            images.append(to_uint8_images(decoded, self.image_processor))
        return np.concatenate(images)

    def __repr__(self) -> str:
        loaded = [name for name in ("vae", "text_encoder") if getattr(self, name) is not None]
        return (
            f"Flux2Model({self.variant.name}, {self.height}x{self.width}, guidance={self.guidance_scale}, dtype={self.dtype}, "
            f"device={self.device}, loaded={['transformer', *loaded]})"
        )


__all__ = ["DEV", "KLEIN", "KLEIN_BASE", "VARIANTS", "Flux2Model", "Variant", "pipeline_variant"]
