"""Wan text-to-video adapter (``model.family: wan_t2v``): Wan 2.1 T2V, Wan 2.2 T2V-A14B (two experts) and TI2V-5B.

As ``WanPipeline`` (diffusers ``pipelines/wan/pipeline_wan.py``) conditions and calls its network:

- ``prompt_embeds [L, D]``: UMT5 states, zero beyond the prompt's length (no mask), as for image-to-video;
- the network sees the noisy latents ``[B, C, F_lat, h, w]`` alone (``in_channels == out_channels``) at the
  timestep ``quantize_timestep(sigma) * 1000`` (the pipeline's scheduler ``sigma * 1000``; shared with every
  family so that sampler and learner feed bit-identical timesteps);
- TI2V-5B (``expand_timesteps`` in ``model_index.json``): the timestep is fed per latent token,
  ``[B, F_lat * h/p * w/p]``, every entry the sample's (the pipeline's ``mask * t`` with an all-ones mask in
  text-to-video); its VAE is Wan 2.2's (48 channels, x16 space: ``vae/config.json``'s ``scale_factor_spatial``);
- Wan2.2-T2V-A14B (``boundary_ratio`` 0.875, ``transformer_2``): the two experts, switched per sample by the
  timestep as the pipeline switches them; ``model.train_expert`` names the trained one, the other is frozen in
  rollout and absent from the learner (:mod:`raygrpo.models.wan_experts`: what trains, what syncs, why).

Guidance is classifier-free with the empty negative prompt, ``v = v_u + s (v_c - v_u)`` in one batched forward
(the pipeline runs two). One ``guidance_scale`` serves both experts, the pipeline's default when its
``guidance_scale_2`` is None; Wan 2.2's own recipe guides the experts differently (T2V-A14B: 4.0 high, 3.0 low;
``sample_guide_scale`` in ``wan/configs/wan_t2v_A14B.py``), which is not offered here.

Everything else (text encoding and its cache, the CFG negative and the learner's way to it, noise, decode, the
expert routing) is :class:`~raygrpo.models.wan.WanI2VModel`'s, which this class extends with the text-only
conditioning and network call.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import AutoTokenizer, UMT5EncoderModel

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import TokenLimit, classifier_free_guidance
from raygrpo.models.hub import TINY_RANDOM, ModelNotFoundError, load_component, pretrained_source
from raygrpo.models.tiny_video import TINY_NUM_FRAMES, TINY_VIDEO_RESOLUTION
from raygrpo.models.wan import DEFAULT_GUIDANCE, DEFAULT_NUM_FRAMES, DEFAULT_RESOLUTION, Variant, WanI2VModel, vae_compression
from raygrpo.models.wan_experts import TrainExpert, WanLayout, load_experts

logger = logging.getLogger(__name__)

WAN_T2V = Variant("Wan text-to-video", WanPipeline, WanTransformer3DModel, None, FlowMatchEulerDiscreteScheduler, image_to_video=False)


class WanT2VModel(WanI2VModel):
    """A Wan text-to-video model (Wan 2.1 T2V, Wan2.2-T2V-A14B, Wan2.2-TI2V-5B) as rollout and learner use it.

    Components: ``transformer`` (:class:`~diffusers.WanTransformer3DModel` without image cross-attention; of
    two experts the trained one), ``vae`` (:class:`~diffusers.AutoencoderKLWan`), ``text_encoder`` /
    ``tokenizer`` (UMT5), ``scheduler`` (config only), ``experts``
    (:class:`~raygrpo.models.wan_experts.ExpertSwitch`), ``expand_timesteps`` (TI2V-5B: a timestep per token).
    """

    family = "wan_t2v"
    network_component = "transformer"  # of the class; an instance training the low-noise expert says transformer_2
    expand_timesteps = False  # TI2V-5B: from_pretrained sets it from model_index.json

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
    ) -> WanT2VModel:
        """Load a ``WanPipeline`` folder, hub id or ``"tiny-random"`` (the two-expert tiny build), component by component.

        ``load_text_encoders`` covers UMT5 and a two-expert model's frozen expert (both rollout's; the learner
        loads neither); ``load_vae`` the VAE. Defaults: 480x480 and 81 frames, or 32x32 and 5 frames for ``"tiny-random"``.
        """
        tiny = str(name_or_path) == TINY_RANDOM
        source = pretrained_source("wan_t2v", name_or_path)
        layout = text_to_video_layout(source)

        def load(cls_, subfolder: str, **kwargs):
            return load_component(source, cls_, subfolder, device, **kwargs)

        transformer, experts = load_experts(load, source, WanTransformer3DModel, layout, train_expert, load_text_encoders, torch_dtype)
        encoders = {}
        if load_text_encoders:
            encoders = {"tokenizer": load(AutoTokenizer, "tokenizer"), "text_encoder": load(UMT5EncoderModel, "text_encoder", dtype=torch_dtype)}
        vae = load(AutoencoderKLWan, "vae", torch_dtype=torch_dtype) if load_vae else None
        spatial, temporal = vae_compression(AutoencoderKLWan.load_config(source, subfolder="vae"))
        default_size = TINY_VIDEO_RESOLUTION if tiny else DEFAULT_RESOLUTION
        model = cls(
            transformer,
            vae=vae,
            scheduler=load(FlowMatchEulerDiscreteScheduler, "scheduler"),
            spatial_compression=spatial,
            temporal_compression=temporal,
            height=height or default_size,
            width=width or default_size,
            num_frames=num_frames or (TINY_NUM_FRAMES if tiny else DEFAULT_NUM_FRAMES),
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            source=source,
            variant=WAN_T2V,
            experts=experts,
            **encoders,
        )
        model.expand_timesteps = layout.expand_timesteps
        return model

    @property
    def pipeline(self) -> WanPipeline:
        """``WanPipeline`` over the loaded components, for its prompt encoding."""
        if self._pipeline is None:
            self._pipeline = WanPipeline(tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae, scheduler=self.scheduler)
        return self._pipeline

    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """UMT5 states ``prompt_embeds [L, D]`` of ``prompt`` (cached per prompt; read-only), as WanPipeline encodes it."""
        if image is not None:
            raise ValueError("wan_t2v is text-to-video and takes no conditioning image; model.family wan_i2v is image-to-video")
        if self.text_encoder is None:
            raise RuntimeError("this WanT2VModel was loaded with load_text_encoders=False (the learner's view) and cannot encode")
        embeds = self._text_cache.get(prompt)
        if embeds is None:
            self._truncation.check(prompt_clean(prompt), [TokenLimit("UMT5", self.tokenizer, self.max_sequence_length)])
            embeds = self._text_cache[prompt] = self._encode_text(prompt)
        return Conditioning(prompt_embeds=embeds)

    def _check_conditioning(self, cond: ConditioningBatch) -> None:
        if cond.image_latents is not None or cond.image_embeds is not None:
            raise ValueError("wan_t2v takes text conditioning only; this batch carries image conditioning (a wan_i2v rollout?)")

    def _predict(self, network: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: ConditioningBatch, scale: float):
        """One expert's (guided) prediction ``[B, C, F_lat, h, w]`` float32 at network timesteps ``timestep [B]``."""
        batch, device, dtype = latents.shape[0], self.device, self.dtype
        hidden = latents.to(device, dtype)  # [B, C, F_lat, h, w]
        embeds = cond.prompt_embeds.to(device, dtype)  # [B, L, D]
        if self.expand_timesteps:
            _, frames, h, w = self.latent_shape
            p = self.transformer.config.patch_size
            timestep = timestep[:, None].expand(batch, frames // p[0] * (h // p[1]) * (w // p[2]))  # [B, tokens]
        guided = scale > 1.0
        if guided:
            negative = self._negative_embeds(embeds)  # [B, L, D]
            hidden, timestep, embeds = torch.cat([hidden, hidden]), torch.cat([timestep, timestep]), torch.cat([negative, embeds])
        prediction = network(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0].float()
        return classifier_free_guidance(prediction, scale) if guided else prediction

    def __repr__(self) -> str:
        experts = "" if self.experts.boundary_ratio is None else f", experts: {self.experts.train_expert} trains"
        return f"WanT2VModel({self.num_frames}x{self.height}x{self.width}, cfg={self.guidance_scale}{experts}, dtype={self.dtype})"


def text_to_video_layout(source: str) -> WanLayout:
    """The :class:`~raygrpo.models.wan_experts.WanLayout` of a ``WanPipeline`` folder; other pipelines fail here, naming theirs."""
    try:
        index = WanPipeline.load_config(source)
    except OSError:
        return WanLayout(None, False)  # no readable index: the component loads report what is missing
    name = index.get("_class_name")
    if name != "WanPipeline":
        hint = "use model.family wan_i2v" if name in ("WanImageToVideoPipeline", "SkyReelsV2ImageToVideoPipeline") else "not a Wan text-to-video pipeline"
        raise ModelNotFoundError(f"{source} holds a {name}: {hint}. model.family wan_t2v loads WanPipeline checkpoints")
    return WanLayout.of(index)


__all__ = ["WAN_T2V", "WanT2VModel", "text_to_video_layout"]
