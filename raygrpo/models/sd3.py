"""Stable Diffusion 3 / 3.5 adapter: the same few operations as the FLUX adapter, for an MMDiT with CFG.

Rollout and learner talk to :class:`SD3Model` exactly as to :class:`~raygrpo.models.flux.FluxModel`
(``encode_prompt``, ``initial_noise``, ``velocity``, ``decode``). What differs is kept inside:

- latents are not packed: ``[B, 16, H/8, W/8]`` as StableDiffusion3Pipeline keeps them;
- the transformer's timestep is on the 0..1000 scale (the pipeline passes ``scheduler.timesteps =
  sigma * 1000``); raygrpo feeds ``quantize_timestep(sigma) * 1000`` so that sampling and training
  see the very same number (see :meth:`SD3Model.velocity`);
- SD3 is not guidance-distilled: guidance is classifier-free, one batched forward over the empty
  negative prompt and the prompt, as the pipeline does it.

The prompt encoding reuses ``StableDiffusion3Pipeline.encode_prompt`` so the conditioning is the
pipeline's own.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import CFGNegative, PromptTruncation, TokenLimit, classifier_free_guidance, quantize_timestep, to_uint8_images
from raygrpo.models.hub import DEFAULT_RESOLUTION, load_component, pretrained_source

logger = logging.getLogger(__name__)


class SD3Model(CFGNegative):
    """A Stable Diffusion 3 / 3.5 text-to-image model as rollout and learner use it.

    Components (diffusers / transformers types):

    - ``transformer``: :class:`~diffusers.SD3Transformer2DModel`, the trainable velocity network;
    - ``vae``: :class:`~diffusers.AutoencoderKL` (16 latent channels, with a shift factor), decode only;
    - ``text_encoder`` / ``tokenizer`` and ``text_encoder_2`` / ``tokenizer_2``: the two
      :class:`~transformers.CLIPTextModelWithProjection` (CLIP-L, CLIP-G) with their ``CLIPTokenizer``;
    - ``text_encoder_3`` / ``tokenizer_3``: :class:`~transformers.T5EncoderModel` / ``T5TokenizerFast``;
    - ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler`, kept for its config only
      (raygrpo samples on its own sigma grid).

    Text encoders and VAE may be absent (the learner needs only the transformer). Latents are
    ``[B, C, h, w]`` with ``h = H / 8``; prompt embeddings are the pipeline's joint sequence of 77
    CLIP tokens (both CLIPs' penultimate states side by side, zero-padded to the T5 width) followed
    by ``max_sequence_length`` T5 tokens; the pooled embedding is both CLIP projections side by side.

    ``guidance_scale`` is the classifier-free guidance scale that :meth:`velocity` applies by
    default; a scale ``<= 1`` means a single conditional forward. All modules are in eval mode with
    gradients off; the learner switches on what it trains.
    """

    family = "sd3"
    guidance = "cfg"
    network_component = "transformer"  # the pipeline component the trained network is (checkpoints and export name it so)

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        *,
        vae: AutoencoderKL | None = None,
        text_encoder: CLIPTextModelWithProjection | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        vae_scale_factor: int | None = None,
        height: int = DEFAULT_RESOLUTION,
        width: int = DEFAULT_RESOLUTION,
        guidance_scale: float = 4.5,
        max_sequence_length: int = 256,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.scheduler = scheduler
        if vae_scale_factor is None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.vae_scale_factor = vae_scale_factor
        patch = transformer.config.patch_size
        multiple = vae_scale_factor * patch  # one transformer token covers a patch x patch square of latent pixels
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        # Fail here rather than deep inside PatchEmbed: the learned position table bounds the image size.
        max_patches = transformer.config.pos_embed_max_size
        if max_patches is not None and max(height, width) // multiple > max_patches:
            limit = max_patches * multiple
            raise ValueError(f"this transformer's position table allows images up to {limit} px a side, got {height}x{width}")
        self.height, self.width = height, width
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._truncation = PromptTruncation(logger)
        self._negative_tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pipeline: StableDiffusion3Pipeline | None = None

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
        guidance_scale: float = 4.5,
        max_sequence_length: int = 256,
    ) -> SD3Model:
        """Load from a hub id, a local diffusers folder, or ``"tiny-random"``, component by component.

        ``"tiny-random"`` is the cached tiny random SD3 of :func:`~raygrpo.models.tiny.build_tiny_sd3`.
        ``height``/``width`` default to 512, or to the transformer's native size where that is smaller
        (64 for the tiny model).
        """
        source = pretrained_source("sd3", name_or_path)

        # CFG needs the empty prompt's encoding even where prompts are not encoded (the learner): the text
        # encoders are then loaded on the CPU, used once for it and freed.
        negative_only = not load_text_encoders and guidance_scale > 1.0

        def load(cls_, subfolder: str, **kwargs):
            on = "cpu" if negative_only and subfolder.startswith("text_encoder") else device
            return load_component(source, cls_, subfolder, on, **kwargs)

        transformer = load(SD3Transformer2DModel, "transformer", torch_dtype=torch_dtype)
        scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
        text_modules = {}
        if load_text_encoders or negative_only:
            text_modules = dict(
                tokenizer=load(CLIPTokenizer, "tokenizer"),
                tokenizer_2=load(CLIPTokenizer, "tokenizer_2"),
                tokenizer_3=load(T5TokenizerFast, "tokenizer_3"),
                # transformers 5 names the argument ``dtype``; ``torch_dtype`` only warns.
                text_encoder=load(CLIPTextModelWithProjection, "text_encoder", dtype=torch_dtype),
                text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2", dtype=torch_dtype),
                text_encoder_3=load(T5EncoderModel, "text_encoder_3", dtype=torch_dtype),
            )
        if load_vae:
            vae = load(AutoencoderKL, "vae", torch_dtype=torch_dtype)
            vae_config = vae.config
        else:
            # Latent geometry still depends on the VAE: read its config, not its weights.
            vae = None
            vae_config = AutoencoderKL.load_config(source, subfolder="vae")
        vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        # The pipeline's own default size is sample_size x the VAE factor (1024 px for SD3, 64 px for the
        # tiny model); raygrpo's default is 512 like FLUX's, but never above what the model was made for.
        default = min(DEFAULT_RESOLUTION, transformer.config.sample_size * vae_scale_factor)
        model = cls(
            transformer,
            vae=vae,
            scheduler=scheduler,
            vae_scale_factor=vae_scale_factor,
            height=height or default,
            width=width or default,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            **text_modules,
        )
        if negative_only:
            text = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
            model.keep_negative_only(*text, "_pipeline")
        return model

    # -------------------------------------------------------------------------------- properties
    @property
    def num_latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent, as StableDiffusion3Pipeline.prepare_latents makes it."""
        return self.num_latent_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    @property
    def pipeline(self) -> StableDiffusion3Pipeline:
        """A StableDiffusion3Pipeline over the loaded components (absent ones are None), for its helpers."""
        if self._pipeline is None:
            self._pipeline = StableDiffusion3Pipeline(
                transformer=self.transformer,
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3,
                tokenizer_3=self.tokenizer_3,
            )
        return self._pipeline

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """The pipeline's joint CLIP+T5 sequence ``[77 + max_sequence_length, D]`` and pooled ``[D_pool]``.

        Both CLIPs read 77 tokens and T5 ``max_sequence_length``, the rest is dropped (with one
        warning per model). Computed once per process and prompt: the same :class:`Conditioning`
        object is returned for a repeated prompt; treat its arrays as read-only.
        """
        if image is not None:
            raise ValueError("SD3 is text-to-image: a prompt group with a conditioning image needs an image-to-video family")
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        if not self.text_encoders_loaded():
            raise RuntimeError("this SD3Model was loaded with load_text_encoders=False and cannot encode prompts")
        # CLIP-L and CLIP-G share one vocabulary: one count stands for both.
        clip = TokenLimit("CLIP", self.tokenizer, self.tokenizer.model_max_length)
        self._truncation.check(prompt, [clip, TokenLimit("T5", self.tokenizer_3, self.max_sequence_length)])
        with torch.inference_mode(), PromptTruncation.quiet(self.pipeline):
            prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                device=self.text_encoder.device,
                do_classifier_free_guidance=False,  # the negative is encoded once, in negative_conditioning
                max_sequence_length=self.max_sequence_length,
            )
        conditioning = Conditioning(
            prompt_embeds=prompt_embeds[0].float().cpu().numpy(),
            pooled_prompt_embeds=pooled[0].float().cpu().numpy(),
        )
        self._prompt_cache[prompt] = conditioning
        return conditioning

    # The CFG negative (CFGNegative): the empty prompt through encode_prompt is exactly what the pipeline's negative
    # path computes (same tokenizers, same layers, no clip skip).
    def text_encoders_loaded(self) -> bool:
        return all(encoder is not None for encoder in (self.text_encoder, self.text_encoder_2, self.text_encoder_3))

    def set_negative_conditioning(self, conditioning: Conditioning) -> None:
        super().set_negative_conditioning(conditioning)
        self._negative_tensors.clear()  # its device copies are of the old negative

    def _negative_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative's ``[batch, L, D]`` and ``[batch, D_pool]`` on the transformer's device and dtype."""
        key = (self.device, self.dtype)
        if key not in self._negative_tensors:
            negative = self.negative_conditioning
            self._negative_tensors[key] = (
                torch.from_numpy(negative.prompt_embeds).to(self.device, self.dtype),
                torch.from_numpy(negative.pooled_prompt_embeds).to(self.device, self.dtype),
            )
        embeds, pooled = self._negative_tensors[key]
        return embeds[None].expand(batch, -1, -1), pooled[None].expand(batch, -1)

    # ----------------------------------------------------------------------------------- latents
    def initial_noise(self, generator: torch.Generator | None, num: int) -> torch.Tensor:
        """``[num, C, h, w]`` float32 Gaussian noise, as StableDiffusion3Pipeline.prepare_latents draws it.

        With the same generator state this is the noise ``StableDiffusion3Pipeline(..., generator=...)``
        starts from in float32. A CPU generator gives the same noise on every device.
        """
        return randn_tensor((num, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        cond: ConditioningBatch,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The (guided) velocity ``v ~ noise - x0`` at noise levels ``sigmas``, float32 ``[B, C, h, w]``.

        ``latents [B, C, h, w]``, ``sigmas [B]`` (or a scalar), ``cond`` with ``prompt_embeds [B, L, D]``
        and ``pooled_prompt_embeds [B, D_pool]``. ``guidance_scale`` None means ``self.guidance_scale``;
        above 1 the conditional and the unconditional (empty prompt) predictions come from one
        batched forward and the result is ``v_u + s (v_c - v_u)``; at 1 or below it is the
        conditional prediction alone (one forward of batch B), which is how DGPO trains.

        Timestep: the pipeline feeds ``sigma * 1000``; here it is ``quantize_timestep(sigma) * 1000``
        (``floor(sigma * 1000)``, up to float32 rounding), the same function FLUX uses, so the
        sampler and the learner evaluate the network at bit-identical timesteps. It stays float32
        whatever the weights' dtype, as the pipeline's scheduler timesteps do: the sinusoidal
        embedding is computed in float32, and a bfloat16 timestep would be off by up to ~2.

        Gradients flow when the caller enables them.
        """
        batch = latents.shape[0]
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape[1:])} per sample; {self.height}x{self.width} images "
                f"have {self.latent_shape}"
            )
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        device, dtype = self.device, self.dtype
        sigmas = torch.as_tensor(sigmas, device=device).reshape(-1).expand(batch)
        timestep = quantize_timestep(sigmas) * 1000
        hidden = latents.to(device, dtype)
        embeds = cond.prompt_embeds.to(device, dtype)
        pooled = cond.pooled_prompt_embeds.to(device, dtype)
        guided = scale > 1.0
        if guided:
            negative_embeds, negative_pooled = self._negative_batch(batch)
            if negative_embeds.shape[1:] != embeds.shape[1:]:
                raise ValueError(
                    f"prompt_embeds are {tuple(embeds.shape[1:])} per sample but the negative prompt's are "
                    f"{tuple(negative_embeds.shape[1:])}: encode both with the same max_sequence_length"
                )
            # Unconditional first, as the pipeline concatenates, so one forward serves both branches.
            hidden = torch.cat([hidden, hidden])
            timestep = torch.cat([timestep, timestep])
            embeds = torch.cat([negative_embeds, embeds])
            pooled = torch.cat([negative_pooled, pooled])
        prediction = self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0].float()
        return classifier_free_guidance(prediction, scale) if guided else prediction

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Latents ``[B, C, h, w]`` to uint8 images ``[B, H, W, 3]``, as StableDiffusion3Pipeline's output path.

        ``batch_size`` bounds how many images the VAE decodes at once (memory at high resolution).
        """
        if self.vae is None:
            raise RuntimeError("this SD3Model was loaded with load_vae=False and cannot decode")
        vae_device = self.vae.device
        images = []
        for chunk in torch.as_tensor(latents).split(batch_size or len(latents)):
            chunk = chunk / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(chunk.to(vae_device, self.vae.dtype), return_dict=False)[0]
            images.append(to_uint8_images(decoded, self.image_processor))
        return np.concatenate(images)

    def __repr__(self) -> str:
        loaded = [n for n in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3") if getattr(self, n) is not None]
        return (
            f"SD3Model({self.height}x{self.width}, cfg={self.guidance_scale}, dtype={self.dtype}, "
            f"device={self.device}, loaded={['transformer', *loaded]})"
        )
