"""Wan 2.1 and Wan 2.2 image-to-video adapter: the conditioning image travels with the prompt group.

Rollout and learner talk to :class:`WanI2VModel` exactly as to the other adapters; the image
enters once, in :meth:`WanI2VModel.encode_prompt`, and rides in the group's
:class:`~raygrpo.contracts.Conditioning` from there on. As ``WanImageToVideoPipeline`` (Wan 2.1,
``expand_timesteps=False``) conditions:

- ``image_latents [4 + C, F_lat, h, w]``: the first frame followed by ``F - 1`` black frames,
  VAE-encoded (distribution mode) and normalised per channel with the VAE's ``latents_mean`` /
  ``latents_std``, behind 4 mask channels that are 1 on the first frame's latent positions
  (the first latent frame stands for 1 video frame, the others for 4 each, so the per-frame mask
  is folded 4 to a latent frame). They are concatenated to the noisy latents along the channels
  on every forward (``in_channels = C + 4 + C``);
- ``image_embeds [N, D_img]``: the CLIP vision encoder's penultimate hidden states, fed to the
  transformer's image cross-attention (Wan 2.1; Wan 2.2 has neither, and conditions on the latents alone);
- ``prompt_embeds [L, D]``: UMT5 states, zero beyond the prompt's length (the pipeline's own
  padding; the transformer takes no mask, so ``prompt_mask`` stays None).

Guidance is classifier-free, as the pipeline: the unconditional branch is the empty negative
prompt with the same image conditioning, ``v = v_u + s (v_c - v_u)``. The pipeline runs the two
branches as two forwards; here they are one batched forward (the same arithmetic per sample).

The transformer's timestep is ``quantize_timestep(sigma) * 1000`` (the pipeline feeds the
scheduler's ``sigma * 1000``), shared with every other family so that sampler and learner see
bit-identical timesteps. Latents are ``[B, C, F_lat, h, w]`` as the pipeline draws them.

Variants (:data:`VARIANTS`, chosen by the ``_class_name`` of the folder's ``model_index.json``):

- Wan 2.1 image-to-video, ``WanImageToVideoPipeline`` (e.g. ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers``);
- SkyReels-V2 image-to-video, ``SkyReelsV2ImageToVideoPipeline`` (e.g. ``Skywork/SkyReels-V2-I2V-14B-540P-Diffusers``):
  Wan 2.1's architecture fine-tuned by Skywork. Its ``SkyReelsV2Transformer3DModel`` takes the same
  inputs (noisy + image latents along the channels, UMT5 states, CLIP image states through an image
  cross-attention, the timestep on 0..1000), and its pipeline's ``encode_prompt``, ``encode_image``
  and ``prepare_latents`` are copies of Wan's; only the classes differ (the CLIP vision encoder with
  its projection, whose penultimate hidden states are the same; a UniPC scheduler, config only here).
  Its fps embedding (``inject_sample_info``) and causal block attention (``num_frame_per_block > 1``)
  belong to the diffusion-forcing models and are refused, as are those pipelines.

- Wan 2.2 image-to-video A14B, ``WanImageToVideoPipeline`` with ``boundary_ratio`` (e.g.
  ``Wan-AI/Wan2.2-I2V-A14B-Diffusers``): two experts, ``transformer`` (high noise) and ``transformer_2`` (low
  noise), switched at ``boundary_ratio`` (0.9) of the timesteps, without CLIP image encoder (``image_dim`` None:
  no ``image_embeds``). ``model.train_expert`` chooses the trained one; the other is frozen in rollout and
  absent from the learner (:mod:`raygrpo.models.wan_experts` says what trains, what syncs and why).

Not loaded, with a clear error: SkyReels-V1 image-to-video, which DanceGRPO trains, is a
HunyuanVideo derivative (``HunyuanSkyreelsImageToVideoPipeline``: first-frame latents concatenated
to HunyuanVideo's input channels, Llama + CLIP text conditioning, CFG), which would be an adapter on
:mod:`raygrpo.models.hunyuan_video` rather than this one; Wan2.2-TI2V-5B's image-to-video mode
(``expand_timesteps``: the first latent frame is the clean image at timestep 0 inside the noisy latents, a
timestep per token; its text-to-video mode is :mod:`raygrpo.models.wan_t2v`'s); the diffusion-forcing
SkyReels-V2 pipelines (per-frame noise levels).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    SkyReelsV2ImageToVideoPipeline,
    SkyReelsV2Transformer3DModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection, UMT5EncoderModel

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import (
    CFGNegative,
    PromptTruncation,
    TokenLimit,
    check_num_frames,
    classifier_free_guidance,
    quantize_timestep,
    to_uint8_video,
)
from raygrpo.models.hub import TINY_RANDOM, ModelNotFoundError, init_defaults, load_component, pretrained_source
from raygrpo.models.tiny_video import TINY_NUM_FRAMES, TINY_VIDEO_RESOLUTION
from raygrpo.models.wan_experts import ExpertSwitch, TrainExpert, WanLayout, load_experts, route

DEFAULT_RESOLUTION = 480
DEFAULT_NUM_FRAMES = 81  # WanImageToVideoPipeline's default (5 s at 16 fps)
DEFAULT_GUIDANCE = 5.0  # the pipeline's default CFG scale
_IMAGE_CACHE = 32  # encoded conditioning images kept per process (prompts repeat every epoch)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """The classes of one image-to-video pipeline layout the adapter serves (see the module docstring)."""

    name: str
    pipeline: type  # for its encode_prompt / encode_image / prepare_latents
    transformer: type
    image_encoder: type | None  # None: no CLIP image states (Wan 2.2 conditions on the image latents alone)
    scheduler: type  # config only: raygrpo samples on its own sigma grid
    image_to_video: bool = True  # False: text-to-video (raygrpo.models.wan_t2v), the latents alone enter the network


WAN_21 = Variant("Wan 2.1", WanImageToVideoPipeline, WanTransformer3DModel, CLIPVisionModel, FlowMatchEulerDiscreteScheduler)
SKYREELS_V2 = Variant(
    "SkyReels-V2", SkyReelsV2ImageToVideoPipeline, SkyReelsV2Transformer3DModel, CLIPVisionModelWithProjection, UniPCMultistepScheduler
)
WAN_22 = Variant("Wan 2.2 A14B", WanImageToVideoPipeline, WanTransformer3DModel, None, FlowMatchEulerDiscreteScheduler)
VARIANTS = {"WanImageToVideoPipeline": WAN_21, "SkyReelsV2ImageToVideoPipeline": SKYREELS_V2}


class WanI2VModel(CFGNegative):
    """A Wan 2.1 (or SkyReels-V2) image-to-video model as rollout and learner use it.

    Components (diffusers / transformers types; SkyReels-V2's where they differ):

    - ``transformer``: :class:`~diffusers.WanTransformer3DModel` (:class:`~diffusers.SkyReelsV2Transformer3DModel`)
      with an image cross-attention (``image_dim`` set), the trainable velocity network;
    - ``vae``: :class:`~diffusers.AutoencoderKLWan` (x8 space, x4 time, per-channel latent
      statistics); encodes the conditioning image and decodes samples;
    - ``text_encoder`` / ``tokenizer``: :class:`~transformers.UMT5EncoderModel` and its tokenizer;
    - ``image_encoder`` / ``image_processor``: :class:`~transformers.CLIPVisionModel`
      (``CLIPVisionModelWithProjection``) / :class:`~transformers.CLIPImageProcessor` (ViT-H/14 for the real model);
    - ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler` (``UniPCMultistepScheduler``), config only;
    - ``variant``: the :class:`Variant` these classes came from;
    - ``experts``: the :class:`~raygrpo.models.wan_experts.ExpertSwitch` (Wan 2.2 A14B: which expert ``transformer`` is,
      the frozen other one in rollout, the boundary; one transformer otherwise).

    The learner loads the (trained) transformer alone: it never encodes (the conditioning arrives with each
    rollout), except the empty prompt that CFG needs, see :attr:`negative_conditioning`.
    """

    family = "wan_i2v"
    guidance = "cfg"
    network_component = "transformer"  # the pipeline component the trained network is (checkpoints and export name it so)

    def __init__(
        self,
        transformer: WanTransformer3DModel | SkyReelsV2Transformer3DModel,
        *,
        vae: AutoencoderKLWan | None = None,
        text_encoder: UMT5EncoderModel | None = None,
        tokenizer: Any = None,
        image_encoder: CLIPVisionModel | None = None,
        image_processor: CLIPImageProcessor | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        spatial_compression: int = 8,
        temporal_compression: int = 4,
        height: int = DEFAULT_RESOLUTION,
        width: int = DEFAULT_RESOLUTION,
        num_frames: int = DEFAULT_NUM_FRAMES,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = 512,
        source: str | None = None,
        variant: Variant = WAN_21,
        experts: ExpertSwitch | None = None,
    ):
        _check_transformer(transformer, variant)
        self.variant = variant
        self.transformer = transformer
        self.experts = experts or ExpertSwitch("high", None, None)
        self.network_component = self.experts.trained_folder  # transformer_2 when the low-noise expert trains
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.image_encoder, self.image_processor = image_encoder, image_processor
        self.scheduler = scheduler
        self.spatial_compression, self.temporal_compression = spatial_compression, temporal_compression
        patch = transformer.config.patch_size
        multiple = spatial_compression * patch[1]
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        check_num_frames(num_frames, temporal_compression)
        self.height, self.width, self.num_frames = height, width, num_frames
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.source = source  # where the text encoder can be fetched for the CFG negative when it is not loaded
        self.video_processor = VideoProcessor(vae_scale_factor=spatial_compression)
        self._text_cache: dict[str, np.ndarray] = {}
        self._truncation = PromptTruncation(logger)
        self._image_cache: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._pipeline: WanImageToVideoPipeline | SkyReelsV2ImageToVideoPipeline | None = None

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
        max_sequence_length: int = 512,
        train_expert: TrainExpert = "high",
    ) -> WanI2VModel:
        """Load from a hub id, a local diffusers folder, or ``"tiny-random"``, component by component.

        ``load_text_encoders`` covers the UMT5 and CLIP vision encoders, and a two-expert model's frozen
        expert (``train_expert`` names the trained one): all three are rollout's, the learner loads none;
        ``load_vae`` the VAE (the rollout needs it to encode the conditioning image as well as to decode).
        Defaults: 480x480 and 81 frames, or 32x32 and 5 frames for ``"tiny-random"``.
        """
        tiny = str(name_or_path) == TINY_RANDOM
        source = pretrained_source("wan_i2v", name_or_path)
        variant, layout = pipeline_variant(source)

        def load(cls_, subfolder: str, **kwargs):
            return load_component(source, cls_, subfolder, device, **kwargs)

        transformer, experts = load_experts(load, source, variant.transformer, layout, train_expert, load_text_encoders, torch_dtype)
        scheduler = load(variant.scheduler, "scheduler")
        encoders = {}
        if load_text_encoders:
            encoders = {
                "tokenizer": load(AutoTokenizer, "tokenizer"),
                # transformers 5 names the argument ``dtype``; ``torch_dtype`` only warns.
                "text_encoder": load(UMT5EncoderModel, "text_encoder", dtype=torch_dtype),
            }
            if variant.image_encoder is not None:
                # SkyReels-V2 saves a CLIPProcessor here; its image half is this processor's config.
                encoders["image_processor"] = load(CLIPImageProcessor, "image_processor")
                encoders["image_encoder"] = load(variant.image_encoder, "image_encoder", dtype=torch_dtype)
        vae = load(AutoencoderKLWan, "vae", torch_dtype=torch_dtype) if load_vae else None
        # From the file on both sides, so that rollout (VAE loaded) and learner (not loaded) agree.
        spatial, temporal = vae_compression(AutoencoderKLWan.load_config(source, subfolder="vae"))
        default_size = TINY_VIDEO_RESOLUTION if tiny else DEFAULT_RESOLUTION
        return cls(
            transformer,
            vae=vae,
            scheduler=scheduler,
            spatial_compression=spatial,
            temporal_compression=temporal,
            height=height or default_size,
            width=width or default_size,
            num_frames=num_frames or (TINY_NUM_FRAMES if tiny else DEFAULT_NUM_FRAMES),
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            source=source,
            variant=variant,
            experts=experts,
            **encoders,
        )

    # -------------------------------------------------------------------------------- properties
    @property
    def num_latent_channels(self) -> int:
        return self.transformer.config.out_channels

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, F_lat, h, w)`` of one video latent, as WanImageToVideoPipeline.prepare_latents makes it."""
        frames = (self.num_frames - 1) // self.temporal_compression + 1
        s = self.spatial_compression
        return self.num_latent_channels, frames, self.height // s, self.width // s

    @property
    def pipeline(self) -> WanImageToVideoPipeline | SkyReelsV2ImageToVideoPipeline:
        """The variant's pipeline over the loaded components, for its encoders and latent preparation."""
        if self._pipeline is None:
            self._pipeline = self.variant.pipeline(
                tokenizer=self.tokenizer,
                text_encoder=self.text_encoder,
                vae=self.vae,
                scheduler=self.scheduler,
                image_processor=self.image_processor,
                image_encoder=self.image_encoder,
                transformer=self.transformer,  # only for its config (the pipeline's calls used here run no transformer)
            )
        return self._pipeline

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """UMT5 states of ``prompt`` and the CLIP states and VAE latents (+ mask) of ``image`` (``[H, W, 3]`` uint8).

        UMT5 reads ``max_sequence_length`` tokens, the rest is dropped (with one warning per model).
        Text encodings are cached per prompt and image encodings per image content; treat the
        returned arrays as read-only.
        """
        if image is None:
            raise ValueError(
                f"wan_i2v is image-to-video and the prompt {prompt!r} came without a conditioning image: give "
                "data.prompt_file as a .jsonl ({'prompt': ..., 'image': path}) or a .parquet with an image column"
            )
        image = _check_image(image)
        if self.text_encoder is None or self.vae is None or (self.variant.image_encoder is not None and self.image_encoder is None):
            raise RuntimeError(
                "this WanI2VModel was loaded with load_text_encoders=False or load_vae=False (the learner's view) and cannot encode"
            )
        embeds = self._text_cache.get(prompt)
        if embeds is None:
            # Counted on the text the pipeline tokenizes: it first unescapes HTML and collapses whitespace.
            self._truncation.check(prompt_clean(prompt), [TokenLimit("UMT5", self.tokenizer, self.max_sequence_length)])
            embeds = self._text_cache[prompt] = self._encode_text(prompt)
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).digest()
        if key not in self._image_cache:
            self._image_cache[key] = self._encode_image(image)
            if len(self._image_cache) > _IMAGE_CACHE:
                self._image_cache.popitem(last=False)
        image_embeds, image_latents = self._image_cache[key]
        return Conditioning(prompt_embeds=embeds, image_embeds=image_embeds, image_latents=image_latents)

    @torch.inference_mode()
    def _encode_text(self, prompt: str) -> np.ndarray:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=prompt,
            do_classifier_free_guidance=False,  # the negative is encoded once, in negative_conditioning
            max_sequence_length=self.max_sequence_length,
            device=self.text_encoder.device,
        )
        return embeds[0].float().cpu().numpy()  # [L, D]

    @torch.inference_mode()
    def _encode_image(self, image: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """``(image_embeds [N, D_img] or None (Wan 2.2), image_latents [4 + C, F_lat, h, w])`` exactly as the pipeline computes them."""
        pipeline, pil = self.pipeline, Image.fromarray(image)
        image_embeds = None if self.image_encoder is None else pipeline.encode_image(pil, self.image_encoder.device)[0]  # [N, D_img]
        pixels = self.video_processor.preprocess(pil, height=self.height, width=self.width)  # [1, 3, H, W] in [-1, 1]
        pixels = pixels.to(self.vae.device, torch.float32)
        zeros = torch.zeros((1, *self.latent_shape), device=self.vae.device)  # given, so prepare_latents draws no noise
        _, condition = pipeline.prepare_latents(
            pixels, 1, self.num_latent_channels, self.height, self.width, self.num_frames, torch.float32, self.vae.device, None, zeros
        )  # [1, 4 + C, F_lat, h, w]
        return None if image_embeds is None else image_embeds.float().cpu().numpy(), condition[0].float().cpu().numpy()

    def encode_negative(self) -> Conditioning:
        """The empty negative prompt's UMT5 states ``prompt_embeds [L, D]`` (:class:`CFGNegative`'s hook): text alone.

        The image conditioning of the unconditional branch is the group's own (see :meth:`velocity`). A model
        loaded without its text encoder (the learner) loads the tokenizer and UMT5 from its source once, encodes
        the empty prompt and frees them again; or it is handed an encoding made elsewhere with
        :meth:`set_negative_conditioning`.
        """
        if self.text_encoders_loaded():
            return Conditioning(prompt_embeds=self._encode_text(self.negative_prompt))
        if self.source is None:
            return super().encode_negative()  # no text encoder and nowhere to load one from: refuses, naming the fixes
        tokenizer = load_component(self.source, AutoTokenizer, "tokenizer", "cpu")
        text_encoder = load_component(self.source, UMT5EncoderModel, "text_encoder", "cpu", dtype=self.dtype)
        with torch.inference_mode():
            # SkyReels-V2's encode_prompt is a copy of this one; Wan's pipeline needs no image parts to run it.
            pipeline = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=self.scheduler)
            embeds, _ = pipeline.encode_prompt(
                prompt=self.negative_prompt, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length, device="cpu"
            )
        return Conditioning(prompt_embeds=embeds[0].float().numpy())

    def trainable_levels(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the trained expert owns each noise level (every level with one transformer)."""
        return self.experts.trainable(sigmas)

    # ----------------------------------------------------------------------------------- latents
    # Copied from raygrpo.models.sd3.SD3Model.initial_noise
    def initial_noise(self, generator: torch.Generator | None, num: int) -> torch.Tensor:
        """``[num, C, F_lat, h, w]`` float32 Gaussian noise, as WanImageToVideoPipeline.prepare_latents draws it."""
        return randn_tensor((num, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        cond: ConditioningBatch,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The (guided) velocity ``v ~ noise - x0`` at noise levels ``sigmas``, float32 ``[B, C, F_lat, h, w]``.

        ``latents [B, C, F_lat, h, w]``, ``sigmas [B]`` (or a scalar), ``cond`` with ``prompt_embeds
        [B, L, D]``, ``image_embeds [B, N, D_img]`` and ``image_latents [B, 4 + C, F_lat, h, w]``. The
        network sees ``cat([latents, image_latents], channels)``. ``guidance_scale`` None means
        ``self.guidance_scale``; above 1 the conditional and the unconditional (empty prompt, same
        image) predictions come from one batched forward and the result is ``v_u + s (v_c - v_u)``;
        at 1 or below it is the conditional prediction alone. Gradients flow when the caller enables them.

        A two-expert model (Wan 2.2 A14B) feeds each sample to the expert that owns its timestep, as the
        pipeline does (:func:`~raygrpo.models.wan_experts.route`; Wan 2.2 has no ``image_embeds``).
        """
        batch = latents.shape[0]
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape[1:])} per sample; {self.num_frames} frames at "
                f"{self.height}x{self.width} have {self.latent_shape}"
            )
        self._check_conditioning(cond)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        device = self.device
        sigmas = torch.as_tensor(sigmas, device=device).reshape(-1).expand(batch)
        timestep = quantize_timestep(sigmas) * 1000  # [B] float32, as the pipeline's scheduler timesteps

        def forward(network: torch.nn.Module, rows: torch.Tensor | None) -> torch.Tensor:
            part = cond if rows is None else cond.rows(rows)
            x, t = (latents, timestep) if rows is None else (latents[rows], timestep[rows])
            return self._predict(network, x, t, part, scale)

        return route(self.experts, self.transformer, timestep, sigmas, forward)

    def _check_conditioning(self, cond: ConditioningBatch) -> None:
        if cond.image_latents is None or (cond.image_embeds is None) != (self.variant.image_encoder is None):
            raise ValueError(
                f"{self.variant.name} image-to-video needs image_latents{'' if self.variant.image_encoder is None else ' and image_embeds'} "
                "in the conditioning (encode_prompt with an image)"
            )

    def _negative_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """The CFG negative's UMT5 states expanded to ``embeds [B, L, D]`` (its device and dtype)."""
        negative = torch.as_tensor(self.negative_conditioning.prompt_embeds, device=embeds.device, dtype=embeds.dtype)
        if negative.shape != embeds.shape[1:]:
            raise ValueError(
                f"prompt_embeds are {tuple(embeds.shape[1:])} per sample but the negative prompt's are "
                f"{tuple(negative.shape)}: encode both with the same max_sequence_length"
            )
        return negative[None].expand(len(embeds), -1, -1)

    def _predict(self, network: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: ConditioningBatch, scale: float):
        """One expert's (guided) prediction ``[B, C, F_lat, h, w]`` float32 at network timesteps ``timestep [B]``."""
        device, dtype = self.device, self.dtype
        hidden = torch.cat([latents.to(device, dtype), cond.image_latents.to(device, dtype)], dim=1)  # [B, 2C + 4, F_lat, h, w]
        embeds = cond.prompt_embeds.to(device, dtype)  # [B, L, D]
        image_embeds = None if cond.image_embeds is None else cond.image_embeds.to(device, dtype)  # [B, N, D_img]
        guided = scale > 1.0
        if guided:
            negative = self._negative_embeds(embeds)  # [B, L, D]
            # Unconditional first; both branches share the latents, the timestep and the image conditioning.
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
            embeds = torch.cat([negative, embeds])
            image_embeds = None if image_embeds is None else torch.cat([image_embeds, image_embeds])
        prediction = network(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=embeds,
            encoder_hidden_states_image=image_embeds,
            return_dict=False,
        )[0].float()
        return classifier_free_guidance(prediction, scale) if guided else prediction

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Latents ``[B, C, F_lat, h, w]`` to uint8 videos ``[B, F, H, W, 3]``, as WanImageToVideoPipeline's output path.

        ``batch_size`` videos go through the VAE at once; None means one at a time (the 3-D VAE's
        activations are the memory peak).
        """
        if self.vae is None:
            raise RuntimeError("this WanI2VModel was loaded with load_vae=False and cannot decode")
        config, device = self.vae.config, self.vae.device
        mean = torch.tensor(config.latents_mean, device=device).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=device).view(1, config.z_dim, 1, 1, 1)
        videos = []
        for chunk in torch.as_tensor(latents).split(batch_size or 1):
            chunk = chunk.to(device, torch.float32) * std + mean  # the pipeline's latents / (1 / std) + mean
            decoded = self.vae.decode(chunk.to(self.vae.dtype), return_dict=False)[0]
            videos.append(to_uint8_video(decoded, self.video_processor))
        return np.concatenate(videos)

    def __repr__(self) -> str:
        loaded = [name for name in ("vae", "text_encoder", "image_encoder") if getattr(self, name) is not None]
        return (
            f"WanI2VModel({self.variant.name}, {self.num_frames}x{self.height}x{self.width}, cfg={self.guidance_scale}, "
            f"dtype={self.dtype}, device={self.device}, loaded={['transformer', *loaded]})"
        )


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"the conditioning image must be a uint8 array [H, W, 3], got {desc}")
    return image


def pipeline_variant(source: str) -> tuple[Variant, WanLayout]:
    """The :class:`Variant` and :class:`~raygrpo.models.wan_experts.WanLayout` of the pipeline in ``source`` (its
    ``model_index.json``); unsupported layouts fail here, before any weights load. A folder without a readable
    index is taken for Wan 2.1 (the component loads then report what is missing)."""
    try:
        index = WanImageToVideoPipeline.load_config(source)
    except OSError:
        return WAN_21, WanLayout(None, False)
    name = index.get("_class_name")
    layout = WanLayout.of(index)
    if name == "WanImageToVideoPipeline" and layout.expand_timesteps:
        raise ModelNotFoundError(
            f"{source} is Wan 2.2 TI2V-5B's image-to-video layout (expand_timesteps: a clean first latent frame at timestep 0 "
            "inside the noisy latents, a timestep per token), which wan_i2v does not sample; model.family wan_t2v trains "
            "TI2V-5B as text-to-video, and Wan2.2-I2V-A14B / Wan 2.1 I2V checkpoints are wan_i2v's"
        )
    if name == "WanImageToVideoPipeline" and (index.get("image_encoder") or [None])[0] is None:
        return WAN_22, layout  # Wan 2.2 A14B: no CLIP image encoder (its transformers have no image cross-attention)
    if name in VARIANTS and layout.boundary_ratio is None:
        return VARIANTS[name], layout
    if name == "HunyuanSkyreelsImageToVideoPipeline":
        hint = "SkyReels-V1 is HunyuanVideo-based, not Wan-based, and has no adapter here (README, model families)"
    elif name and name.startswith("SkyReelsV2DiffusionForcing"):
        hint = "diffusion forcing (a noise level per frame) does not fit the one-sigma-per-sample samplers; use SkyReels-V2-I2V"
    elif name in ("WanPipeline", "SkyReelsV2Pipeline"):
        hint = "a text-to-video pipeline (model.family wan_t2v loads WanPipeline); use an image-to-video checkpoint"
    else:
        hint = "not an image-to-video pipeline this adapter knows"
    raise ModelNotFoundError(f"{source} holds a {name}: {hint}. model.family wan_i2v loads {sorted(VARIANTS)}")


def _check_transformer(transformer: torch.nn.Module, variant: Variant) -> None:
    config = transformer.config
    if not variant.image_to_video:
        if config.image_dim is not None or config.in_channels != config.out_channels:
            raise ValueError(
                f"this {type(transformer).__name__} has image_dim={config.image_dim} and in_channels={config.in_channels} for "
                f"{config.out_channels} latent channels: an image-to-video model; model.family wan_t2v needs a text-to-video one"
            )
        return
    if variant.image_encoder is None:
        if config.image_dim is not None or config.in_channels != 2 * config.out_channels + 4:
            raise ValueError(
                f"this {type(transformer).__name__} has image_dim={config.image_dim} and in_channels={config.in_channels}: a "
                f"{variant.name} image-to-video expert takes noise + 4 mask + image-latent channels ({2 * config.out_channels + 4}) "
                "and no CLIP image states"
            )
        return
    if config.image_dim is None:
        raise ValueError(
            f"this {type(transformer).__name__} has no image cross-attention (image_dim is None): it is a text-to-video "
            "checkpoint; wan_i2v needs an image-to-video one (e.g. Wan-AI/Wan2.1-I2V-14B-480P-Diffusers)"
        )
    # SkyReels-V2's diffusion-forcing additions: an fps embedding the I2V pipeline never feeds, causal frame blocks.
    if getattr(config, "inject_sample_info", False) or getattr(config, "num_frame_per_block", 1) > 1:
        raise ValueError(
            f"this {type(transformer).__name__} has inject_sample_info={config.inject_sample_info} and num_frame_per_block="
            f"{config.num_frame_per_block}: a diffusion-forcing model; wan_i2v trains the image-to-video ones (SkyReels-V2-I2V)"
        )


def vae_compression(vae_config: dict[str, Any]) -> tuple[int, int]:
    """``(spatial, temporal)`` compression of an ``AutoencoderKLWan`` from its ``vae/config.json``.

    Configs written by diffusers before ``scale_factor_spatial`` and ``scale_factor_temporal`` existed
    (those of the Wan 2.1 Diffusers repositories) lack them; then they follow from the architecture as
    ``WanEncoder3d`` builds it: every block but the last halves height and width, and halves time where
    ``temperal_downsample`` is set; a ``patch_size`` patchifies space on top. Wan 2.1's
    ``dim_mult`` [1, 2, 4, 4] and ``temperal_downsample`` [False, True, True] give 8 and 4 (diffusers'
    defaults for the missing keys, and the SkyReels-V2 pipeline's own derivation).
    """
    config = {**init_defaults(AutoencoderKLWan), **vae_config}
    downsamples = len(config["dim_mult"]) - 1
    spatial = 2**downsamples * (config["patch_size"] or 1)
    temporal = 2 ** sum(bool(t) for t in config["temperal_downsample"][:downsamples])
    return vae_config.get("scale_factor_spatial") or spatial, vae_config.get("scale_factor_temporal") or temporal


__all__ = ["SKYREELS_V2", "VARIANTS", "WAN_21", "WAN_22", "Variant", "WanI2VModel", "pipeline_variant", "vae_compression"]
