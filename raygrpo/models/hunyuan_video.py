"""HunyuanVideo text-to-video adapter: the FLUX adapter's few operations, for video latents.

Rollout and learner talk to :class:`HunyuanVideoModel` exactly as to the image adapters
(``encode_prompt``, ``initial_noise``, ``sigma_grid``, ``velocity``, ``decode``). What is
particular to HunyuanVideo stays inside:

- latents are video latents ``[B, C, F_lat, h, w]`` with ``F_lat = (F - 1) / 4 + 1`` (the causal
  3-D VAE keeps the first frame and compresses the rest 4x in time) and ``h = H / 8``, laid out as
  ``HunyuanVideoPipeline.prepare_latents`` draws them; ``num_frames`` must be ``4k + 1``;
- the text conditioning is two encoders, as ``HunyuanVideoPipeline.encode_prompt``: a Llama
  encoder reads the prompt inside a chat template, its third-last hidden state with the template's
  tokens cropped off is the per-token conditioning, together with its attention mask (the
  transformer's text stream is masked); a CLIP text encoder's pooled output is the global vector;
- HunyuanVideo is guidance-distilled like FLUX.1-dev: the guidance value enters an embedding
  (the pipeline feeds ``guidance_scale * 1000``), one forward per step, no CFG. DanceGRPO's
  HunyuanVideo recipe embeds 6018, i.e. ``guidance_scale = 6.018``;
- the transformer's timestep is on the 0..1000 scale; raygrpo feeds ``quantize_timestep(sigma) * 1000``
  (DanceGRPO's ``int(sigma * 1000)``), the same function the other families use, so sampling and
  training evaluate the network at bit-identical timesteps.

Memory: DanceGRPO samples and trains HunyuanVideo one video at a time (53 frames at 480x480 are
14 x 60 x 60 = 50,400 latent positions, 12,600 transformer tokens after the 2x2 patch), so the
presets keep ``rollout.micro_batch_size: 1``, and :meth:`HunyuanVideoModel.decode` decodes one
video at a time by default with the VAE's tiling on (the 3-D VAE's activations are the peak).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import ModelAdapter, PromptTruncation, TokenLimit, check_num_frames, quantize_timestep, to_uint8_video
from raygrpo.models.hub import TINY_RANDOM, component_config, load_component, pretrained_source, tiny_stamp
from raygrpo.models.tiny_video import TINY_NUM_FRAMES, TINY_VIDEO_RESOLUTION

DEFAULT_RESOLUTION = 480  # DanceGRPO's HunyuanVideo recipe: 480x480
DEFAULT_NUM_FRAMES = 53  # DanceGRPO's open-source HunyuanVideo setting (the paper used 73)
DEFAULT_GUIDANCE = 6.0  # HunyuanVideoPipeline's default embedded guidance (DanceGRPO: 6.018)
CLIP_MAX_LENGTH = 77  # HunyuanVideoPipeline.encode_prompt's CLIP length, whatever its max_sequence_length

logger = logging.getLogger(__name__)


class HunyuanVideoModel(ModelAdapter):
    """A HunyuanVideo text-to-video model as rollout and learner use it.

    Components (diffusers / transformers types):

    - ``transformer``: :class:`~diffusers.HunyuanVideoTransformer3DModel`, the trainable velocity network;
    - ``vae``: :class:`~diffusers.AutoencoderKLHunyuanVideo` (causal 3-D VAE, x8 space, x4 time), decode only;
    - ``text_encoder`` / ``tokenizer``: :class:`~transformers.LlamaModel` and its tokenizer (Llava-Llama-3-8B
      for the real model), per-token hidden states and mask;
    - ``text_encoder_2`` / ``tokenizer_2``: :class:`~transformers.CLIPTextModel` / ``CLIPTokenizer``, pooled output;
    - ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler`, kept for its config only
      (raygrpo samples on its own sigma grid).

    Text encoders and VAE may be absent (the learner needs only the transformer). All modules are
    in eval mode with gradients off; the learner switches on what it trains.
    """

    family = "hunyuan_video"
    network_component = "transformer"  # the pipeline component the trained network is (checkpoints and export name it so)

    def __init__(
        self,
        transformer: HunyuanVideoTransformer3DModel,
        *,
        vae: AutoencoderKLHunyuanVideo | None = None,
        text_encoder: LlamaModel | None = None,
        tokenizer: Any = None,
        text_encoder_2: CLIPTextModel | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        prompt_template: dict[str, Any] | None = None,
        spatial_compression: int = 8,
        temporal_compression: int = 4,
        height: int = DEFAULT_RESOLUTION,
        width: int = DEFAULT_RESOLUTION,
        num_frames: int = DEFAULT_NUM_FRAMES,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = 256,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.scheduler = scheduler
        self.prompt_template = dict(prompt_template or DEFAULT_PROMPT_TEMPLATE)
        self.spatial_compression, self.temporal_compression = spatial_compression, temporal_compression
        multiple = spatial_compression * transformer.config.patch_size  # one token covers a patch x patch latent square
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        check_num_frames(num_frames, temporal_compression)
        self.height, self.width, self.num_frames = height, width, num_frames
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.video_processor = VideoProcessor(vae_scale_factor=spatial_compression)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._truncation = PromptTruncation(logger)
        self._pipeline: HunyuanVideoPipeline | None = None

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
        num_frames: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = 256,
        vae_tiling: bool = True,
    ) -> HunyuanVideoModel:
        """Load from a hub id (e.g. ``hunyuanvideo-community/HunyuanVideo``), a local diffusers folder, or ``"tiny-random"``.

        Defaults: 480x480 and 53 frames, or 32x32 and 5 frames for ``"tiny-random"``. The prompt
        template is the pipeline's default unless the folder is a tiny build, whose tokenizer needs
        its own ``crop_start`` (recorded in ``raygrpo_tiny.json``). ``vae_tiling`` decodes in
        spatial/temporal tiles as diffusers recommends for this VAE (a no-op below 256 px).
        """
        tiny = str(name_or_path) == TINY_RANDOM
        source = pretrained_source("hunyuan_video", name_or_path)

        def load(cls_, subfolder: str, **kwargs):
            return load_component(source, cls_, subfolder, device, **kwargs)

        transformer = load(HunyuanVideoTransformer3DModel, "transformer", torch_dtype=torch_dtype)
        scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
        text_modules = {}
        if load_text_encoders:
            text_modules = {
                "tokenizer": load(AutoTokenizer, "tokenizer"),
                "tokenizer_2": load(CLIPTokenizer, "tokenizer_2"),
                # transformers 5 names the argument ``dtype``; ``torch_dtype`` only warns.
                "text_encoder": load(LlamaModel, "text_encoder", dtype=torch_dtype),
                "text_encoder_2": load(CLIPTextModel, "text_encoder_2", dtype=torch_dtype),
            }
        vae = load(AutoencoderKLHunyuanVideo, "vae", torch_dtype=torch_dtype) if load_vae else None
        if vae is not None and vae_tiling:
            vae.enable_tiling()
        # Latent geometry depends on the VAE even where its weights are not loaded (the learner).
        vae_config = vae.config if vae is not None else component_config(source, AutoencoderKLHunyuanVideo, "vae")
        default_size = TINY_VIDEO_RESOLUTION if tiny else DEFAULT_RESOLUTION
        return cls(
            transformer,
            vae=vae,
            scheduler=scheduler,
            prompt_template=tiny_stamp(source).get("prompt_template"),
            spatial_compression=vae_config["spatial_compression_ratio"],
            temporal_compression=vae_config["temporal_compression_ratio"],
            height=height or default_size,
            width=width or default_size,
            num_frames=num_frames or (TINY_NUM_FRAMES if tiny else DEFAULT_NUM_FRAMES),
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            **text_modules,
        )

    # -------------------------------------------------------------------------------- properties
    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F_lat, h, w)`` of one video latent, as HunyuanVideoPipeline.prepare_latents makes it."""
        frames = (self.num_frames - 1) // self.temporal_compression + 1
        s = self.spatial_compression
        return self.transformer.config.in_channels, frames, self.height // s, self.width // s

    @property
    def pipeline(self) -> HunyuanVideoPipeline:
        """A HunyuanVideoPipeline over the loaded components (absent ones are None), for its encode_prompt."""
        if self._pipeline is None:
            self._pipeline = HunyuanVideoPipeline(
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                transformer=self.transformer,
                vae=self.vae,
                scheduler=self.scheduler,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
            )
        return self._pipeline

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """Llama states ``[max_sequence_length, D]`` with their mask ``[max_sequence_length]``, and CLIP pooled ``[D_pool]``.

        Exactly ``HunyuanVideoPipeline.encode_prompt`` (chat template, third-last Llama layer,
        template tokens cropped). Llama reads ``max_sequence_length`` tokens after the template and
        CLIP 77, the rest is dropped (with one warning per model). Computed once per process and
        prompt: the same :class:`Conditioning` object is returned for a repeated prompt; treat its
        arrays as read-only.
        """
        if image is not None:
            raise ValueError(
                "HunyuanVideo here is text-to-video: a prompt group with a conditioning image needs an image-to-video "
                "family (model.family: wan_i2v)"
            )
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise RuntimeError("this HunyuanVideoModel was loaded with load_text_encoders=False and cannot encode prompts")
        template, crop_start = self.prompt_template["template"], self.prompt_template.get("crop_start") or 0
        limits = [
            TokenLimit("Llama", self.tokenizer, self.max_sequence_length + crop_start, template),
            TokenLimit("CLIP", self.tokenizer_2, CLIP_MAX_LENGTH),
        ]
        self._truncation.check(prompt, limits)
        with torch.inference_mode(), PromptTruncation.quiet(self.pipeline):
            embeds, pooled, mask = self.pipeline.encode_prompt(
                prompt=prompt,
                prompt_template=self.prompt_template,
                device=self.text_encoder.device,
                max_sequence_length=self.max_sequence_length,
            )
        conditioning = Conditioning(
            prompt_embeds=embeds[0].float().cpu().numpy(),
            pooled_prompt_embeds=pooled[0].float().cpu().numpy(),
            prompt_mask=mask[0].long().cpu().numpy(),
        )
        self._prompt_cache[prompt] = conditioning
        return conditioning

    # ----------------------------------------------------------------------------------- latents
    # Copied from raygrpo.models.sd3.SD3Model.initial_noise
    def initial_noise(self, generator: torch.Generator | None, num: int) -> torch.Tensor:
        """``[num, C, F_lat, h, w]`` float32 Gaussian noise, as HunyuanVideoPipeline.prepare_latents draws it.

        With the same generator state this is the noise ``HunyuanVideoPipeline(..., generator=...)``
        starts from. A CPU generator gives the same noise on every device.
        """
        return randn_tensor((num, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        cond: ConditioningBatch,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The transformer's velocity ``v ~ noise - x0`` at noise levels ``sigmas``, float32 ``[B, C, F_lat, h, w]``.

        ``latents [B, C, F_lat, h, w]``, ``sigmas [B]`` (or a scalar), ``cond`` with ``prompt_embeds
        [B, L, D]``, ``prompt_mask [B, L]`` and ``pooled_prompt_embeds [B, D_pool]``. As the pipeline's
        denoising loop: timestep ``quantize_timestep(sigma) * 1000`` in float32, embedded guidance
        ``guidance_scale * 1000`` (None: ``self.guidance_scale``), the mask in the weights' dtype.
        One forward (guidance-distilled). Gradients flow when the caller enables them.
        """
        batch = latents.shape[0]
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape[1:])} per sample; {self.num_frames} frames at "
                f"{self.height}x{self.width} have {self.latent_shape}"
            )
        if cond.prompt_mask is None or cond.pooled_prompt_embeds is None:
            raise ValueError("HunyuanVideo needs prompt_mask and pooled_prompt_embeds in the conditioning (from its encode_prompt)")
        device, dtype = self.device, self.dtype
        sigmas = torch.as_tensor(sigmas, device=device).reshape(-1).expand(batch)
        timestep = quantize_timestep(sigmas) * 1000  # float32, as the pipeline's t.to(latents.dtype)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        guidance = torch.full((batch,), scale * 1000.0, device=device, dtype=dtype)
        prediction = self.transformer(
            hidden_states=latents.to(device, dtype),
            timestep=timestep,
            encoder_hidden_states=cond.prompt_embeds.to(device, dtype),
            encoder_attention_mask=cond.prompt_mask.to(device, dtype),
            pooled_projections=cond.pooled_prompt_embeds.to(device, dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return prediction.float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Latents ``[B, C, F_lat, h, w]`` to uint8 videos ``[B, F, H, W, 3]``, as HunyuanVideoPipeline's output path.

        ``batch_size`` videos go through the VAE at once; None means one at a time, because the
        3-D VAE's activations, not the transformer's, are the memory peak of a rollout.
        """
        if self.vae is None:
            raise RuntimeError("this HunyuanVideoModel was loaded with load_vae=False and cannot decode")
        videos = []
        for chunk in torch.as_tensor(latents).split(batch_size or 1):
            chunk = chunk.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
            videos.append(to_uint8_video(self.vae.decode(chunk, return_dict=False)[0], self.video_processor))
        return np.concatenate(videos)

    def __repr__(self) -> str:
        loaded = [name for name in ("vae", "text_encoder", "text_encoder_2") if getattr(self, name) is not None]
        return (
            f"HunyuanVideoModel({self.num_frames}x{self.height}x{self.width}, guidance={self.guidance_scale}, "
            f"dtype={self.dtype}, device={self.device}, loaded={['transformer', *loaded]})"
        )
