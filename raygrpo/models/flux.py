"""FLUX adapter: the few operations rollout and learner need, with the diffusers details inside.

Everything that must agree between sampling and training lives here once: how noise is laid out
and packed, how a noise level becomes the transformer's timestep, which position ids and guidance
the transformer sees, and how latents become pixels. The code reuses FluxPipeline's own helpers
(``encode_prompt``, ``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids``) so
that outputs match the pipeline's.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import ModelAdapter, PromptTruncation, TokenLimit, quantize_timestep, to_uint8_images
from raygrpo.models.hub import DEFAULT_RESOLUTION, TINY_RANDOM, load_component, pretrained_source
from raygrpo.models.network import network_placement

TINY_RESOLUTION = 64  # the tiny model is for fast CPU runs; 512 px would only cost time

logger = logging.getLogger(__name__)


class FluxModel(ModelAdapter):
    """A FLUX.1 text-to-image model as rollout and learner use it.

    Components (diffusers / transformers types):

    - ``transformer``: :class:`~diffusers.FluxTransformer2DModel`, the trainable velocity network;
    - ``vae``: :class:`~diffusers.AutoencoderKL` (16 latent channels for FLUX.1), decode only;
    - ``text_encoder`` / ``tokenizer``: :class:`~transformers.CLIPTextModel` / ``CLIPTokenizer``, pooled output;
    - ``text_encoder_2`` / ``tokenizer_2``: :class:`~transformers.T5EncoderModel` / ``T5TokenizerFast``,
      per-token hidden states;
    - ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler`, kept for its config only
      (raygrpo samples on its own sigma grid).

    Text encoders and VAE may be absent (the learner needs only the transformer). Latents are
    packed as in FluxPipeline: ``[B, S, D]`` with ``S = (h/2)(w/2)`` tokens of ``D = 4C`` values.
    All modules are in eval mode with gradients off; the learner switches on what it trains.
    """

    family = "flux"
    network_component = "transformer"  # the pipeline component the trained network is (checkpoints and export name it so)
    pipeline_class: ClassVar[type[FluxPipeline]] = FluxPipeline  # whose helpers encode, pack and position (subclasses: their pipeline)

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        *,
        vae: AutoencoderKL | None = None,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder_2: T5EncoderModel | None = None,
        tokenizer_2: T5TokenizerFast | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        vae_scale_factor: int | None = None,
        height: int = DEFAULT_RESOLUTION,
        width: int = DEFAULT_RESOLUTION,
        guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler = scheduler
        if vae_scale_factor is None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.vae_scale_factor = vae_scale_factor
        multiple = 2 * vae_scale_factor  # one packed token covers a 2x2 patch of latent pixels
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        self.height, self.width = height, width
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._truncation = PromptTruncation(logger)
        self._ids_cache: dict[tuple, torch.Tensor] = {}
        self._guidance_cache: dict[tuple, torch.Tensor] = {}
        self._pipeline: FluxPipeline | None = None

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
        guidance_scale: float = 3.5,
        max_sequence_length: int = 512,
    ) -> FluxModel:
        """Load from a hub id, a local diffusers folder, or ``"tiny-random"``, component by component.

        ``height``/``width`` default to 64 for ``"tiny-random"`` and 512 otherwise.
        """
        source = pretrained_source(cls.family, name_or_path)
        cls._check_source(source)

        def load(cls_, subfolder: str, **kwargs):
            return load_component(source, cls_, subfolder, device, **kwargs)

        transformer = load(FluxTransformer2DModel, "transformer", torch_dtype=torch_dtype)
        scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
        text_modules = {}
        if load_text_encoders:
            text_modules = dict(
                tokenizer=load(CLIPTokenizer, "tokenizer"),
                tokenizer_2=load(T5TokenizerFast, "tokenizer_2"),
                # transformers 5 names the argument ``dtype``; ``torch_dtype`` only warns.
                text_encoder=load(CLIPTextModel, "text_encoder", dtype=torch_dtype),
                text_encoder_2=load(T5EncoderModel, "text_encoder_2", dtype=torch_dtype),
            )
        if load_vae:
            vae = load(AutoencoderKL, "vae", torch_dtype=torch_dtype)
            vae_scale_factor = None
        else:
            # Latent geometry still depends on the VAE: read its config, not its weights.
            vae = None
            vae_scale_factor = 2 ** (len(AutoencoderKL.load_config(source, subfolder="vae")["block_out_channels"]) - 1)
        default = TINY_RESOLUTION if str(name_or_path) == TINY_RANDOM else DEFAULT_RESOLUTION
        return cls(
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

    @classmethod
    def _check_source(cls, source: str) -> None:
        """Extension point: refuse a checkpoint of another FLUX variant before its weights load (FLUX.1 takes any)."""

    # -------------------------------------------------------------------------------- properties
    @property
    def num_latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @property
    def unpacked_latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one VAE latent, with ``h, w`` even as FluxPipeline.prepare_latents makes them."""
        h = 2 * (self.height // (self.vae_scale_factor * 2))
        w = 2 * (self.width // (self.vae_scale_factor * 2))
        return self.num_latent_channels, h, w

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(S, D)`` of one packed latent: ``S = (h/2)(w/2)`` tokens of ``D = 4C`` values."""
        c, h, w = self.unpacked_latent_shape
        return (h // 2) * (w // 2), 4 * c

    @property
    def pipeline(self) -> FluxPipeline:
        """A :attr:`pipeline_class` pipeline over the loaded components (absent ones are None), for its helper methods."""
        if self._pipeline is None:
            self._pipeline = self.pipeline_class(
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                transformer=self.transformer,
            )
        return self._pipeline

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """CLIP pooled output ``[D_pool]`` and T5 hidden states ``[max_sequence_length, D]`` of ``prompt``, once per process.

        Exactly ``FluxPipeline.encode_prompt``: CLIP reads 77 tokens and T5 ``max_sequence_length``,
        the rest is dropped (with one warning per model). The same :class:`Conditioning` object is
        returned for a repeated prompt; treat its arrays as read-only.
        """
        if image is not None:
            raise ValueError(
                "FLUX here is text-to-image: a prompt group with a conditioning image needs an image-conditioned family "
                "(flux_kontext edits images, wan_i2v animates them)"
            )
        return self._encode_text(prompt)

    def _encode_text(self, prompt: str) -> Conditioning:
        """The text half of :meth:`encode_prompt`, cached per prompt (image-conditioned subclasses add their image to it)."""
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise RuntimeError("this FluxModel was loaded with load_text_encoders=False and cannot encode prompts")
        clip = TokenLimit("CLIP", self.tokenizer, self.tokenizer.model_max_length)
        self._truncation.check(prompt, [clip, TokenLimit("T5", self.tokenizer_2, self.max_sequence_length)])
        with torch.inference_mode(), PromptTruncation.quiet(self.pipeline):
            prompt_embeds, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompt,
                device=self.text_encoder_2.device,
                max_sequence_length=self.max_sequence_length,
            )
        conditioning = Conditioning(
            prompt_embeds=prompt_embeds[0].float().cpu().numpy(),
            pooled_prompt_embeds=pooled[0].float().cpu().numpy(),
        )
        self._prompt_cache[prompt] = conditioning
        return conditioning

    # ----------------------------------------------------------------------------------- latents
    def initial_noise(self, generator: torch.Generator | None, num: int) -> torch.Tensor:
        """``[num, S, D]`` float32 Gaussian noise, drawn unpacked and then packed as FluxPipeline does.

        With the same generator state this is the noise ``FluxPipeline(..., generator=...)`` starts
        from in float32. A CPU generator gives the same noise on every device.
        """
        c, h, w = self.unpacked_latent_shape
        noise = randn_tensor((num, c, h, w), generator=generator, device=self.device, dtype=torch.float32)
        return FluxPipeline._pack_latents(noise, num, c, h, w)

    def _position_ids(self, text_length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (text_length, device, dtype)
        if key not in self._ids_cache:
            txt_ids = torch.zeros(text_length, 3, device=device, dtype=dtype)
            self._ids_cache[key] = (txt_ids, self._image_position_ids(device, dtype))
        return self._ids_cache[key]

    def _image_position_ids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[S, 3]`` RoPE ids ``(0, row, column)`` of the packed tokens, as FluxPipeline makes them (extension point)."""
        _, h, w = self.unpacked_latent_shape
        return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)

    def _network_input(self, latents: torch.Tensor, cond: ConditioningBatch) -> torch.Tensor:
        """The transformer's ``hidden_states`` for ``latents [B, S, D]``: the latents themselves (extension point:
        a subclass appends conditioning tokens; :meth:`velocity` keeps the first ``S`` output tokens)."""
        return latents

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        cond: ConditioningBatch,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity ``v ~ noise - x0`` at noise levels ``sigmas``, float32 ``[B, S, D]``.

        ``latents [B, S, D]``, ``sigmas [B]`` (or a scalar), ``cond`` with ``prompt_embeds [B, L, D_text]``
        and ``pooled_prompt_embeds [B, D_pool]``. The timestep is :func:`quantize_timestep` of sigma and
        the embedded guidance is ``guidance_scale`` (None: ``self.guidance_scale``). FLUX.1-dev is
        guidance-distilled, so this is one forward whatever the value (no CFG), and it is ignored by
        models without a guidance embedding. Gradients flow when the caller enables them.
        """
        batch, tokens, _ = latents.shape
        if tokens != self.latent_shape[0]:
            expected = self.latent_shape[0]
            raise ValueError(f"latents have {tokens} tokens; {self.height}x{self.width} images have {expected}")
        device, dtype = network_placement(self.transformer)  # looked up once per call
        sigmas = torch.as_tensor(sigmas, device=device)
        if sigmas.shape != (batch,):
            sigmas = sigmas.reshape(-1).expand(batch)
        timestep = quantize_timestep(sigmas).to(dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = self._guidance(self.guidance_scale if guidance_scale is None else float(guidance_scale), batch, device, dtype)
        txt_ids, img_ids = self._position_ids(cond.prompt_embeds.shape[1], device, dtype)
        prediction = self.transformer(
            hidden_states=self._network_input(latents.to(device, dtype), cond),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled_prompt_embeds.to(device, dtype),
            encoder_hidden_states=cond.prompt_embeds.to(device, dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        if prediction.shape[1] != tokens:
            prediction = prediction[:, :tokens]  # the noisy tokens' velocity (appended conditioning tokens dropped)
        return prediction.float()

    def _guidance(self, scale: float, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[batch]`` of the embedded guidance ``scale``, made once per (scale, batch, device, dtype): the transformer
        only reads it (a learner asks with the same values for every term)."""
        key = (scale, batch, device, dtype)
        if key not in self._guidance_cache:
            self._guidance_cache[key] = torch.full((batch,), scale, device=device, dtype=dtype)
        return self._guidance_cache[key]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Packed latents ``[B, S, D]`` to uint8 images ``[B, H, W, 3]``, as FluxPipeline's output path.

        ``batch_size`` bounds how many images the VAE decodes at once (memory at high resolution).
        """
        if self.vae is None:
            raise RuntimeError("this FluxModel was loaded with load_vae=False and cannot decode")
        vae_device = self.vae.device
        images = []
        for chunk in torch.as_tensor(latents).split(batch_size or len(latents)):
            unpacked = FluxPipeline._unpack_latents(chunk, self.height, self.width, self.vae_scale_factor)
            unpacked = unpacked / self.vae.config.scaling_factor + self.vae.config.shift_factor
            decoded = self.vae.decode(unpacked.to(vae_device, self.vae.dtype), return_dict=False)[0]
            images.append(to_uint8_images(decoded, self.image_processor))
        return np.concatenate(images)

    def __repr__(self) -> str:
        loaded = [name for name in ("vae", "text_encoder", "text_encoder_2") if getattr(self, name) is not None]
        return (
            f"{type(self).__name__}({self.height}x{self.width}, guidance={self.guidance_scale}, dtype={self.dtype}, "
            f"device={self.device}, loaded={['transformer', *loaded]})"
        )
