"""The real model adapters over fake-tensor components: what rollout and learner hold, without a byte of weights.

:func:`fake_adapter` builds a family's adapter (raygrpo/models/) around components built by
:func:`~raygrpo.plan.architecture.build_component` inside an active ``FakeTensorMode``, as
``from_pretrained`` would assemble it for the role: rollout holds every component in ``model.dtype``;
a learner rank holds the trained network in float32 (the master weights) and reads the VAE's geometry
only. Adapters are constructed outside the fake mode (their scheduler tables are real host tensors).

:func:`conditioning` is one prompt group's :class:`~raygrpo.contracts.Conditioning` at its true shapes
(zeros: the values never matter to shapes, memory or FLOPs), and :data:`ENCODERS` the text/image
encoder inputs each family's pipeline feeds (how many tokens each reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raygrpo.config import Config
from raygrpo.contracts import Conditioning
from raygrpo.models import MODEL_FAMILIES, ModelAdapter
from raygrpo.plan.architecture import Architecture, build_component
from raygrpo.runtime import torch_dtype

CLIP_TOKENS = 77  # every CLIP text encoder reads 77 tokens
HUNYUAN_TEMPLATE_TOKENS = 95  # HunyuanVideoPipeline's chat template: crop_start of DEFAULT_PROMPT_TEMPLATE
CLIP_IMAGE_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token (Wan's image_embeds)
VAE_FACTOR = {"AutoencoderKLHunyuanVideo": "spatial_compression_ratio"}
# Qwen-Image pipelines' prompt_template_encode_start_idx: the chat template's system tokens before the prompt's budget.
QWEN_TEMPLATE_TOKENS = {"qwen_image": 34, "qwen_image_edit": 64}


@dataclass(frozen=True)
class EncoderInput:
    """One encoder's input per prompt group: ``tokens`` ids, or an image of ``image_size`` px."""

    component: str
    tokens: int = 0
    image_size: int = 0


def encoders(config: Config, arch: Architecture) -> list[EncoderInput]:
    """What each encoder of the family reads per prompt group, as its pipeline tokenizes (padding to the limit)."""
    length = config.model.max_sequence_length
    family = config.model.family
    if family in ("flux", "flux_kontext"):  # Kontext's reference goes through the VAE encoder (measure._encode)
        return [EncoderInput("text_encoder", CLIP_TOKENS), EncoderInput("text_encoder_2", length)]
    if family == "sd3":
        return [EncoderInput("text_encoder", CLIP_TOKENS), EncoderInput("text_encoder_2", CLIP_TOKENS), EncoderInput("text_encoder_3", length)]
    if family == "sd":
        return [EncoderInput("text_encoder", CLIP_TOKENS)]
    if family == "flux2":  # one language model over the chat template, padded to max_sequence_length
        return [EncoderInput("text_encoder", length)]
    if family == "hunyuan_video":
        return [EncoderInput("text_encoder", length + HUNYUAN_TEMPLATE_TOKENS), EncoderInput("text_encoder_2", CLIP_TOKENS)]
    if family in QWEN_TEMPLATE_TOKENS:  # Qwen2.5-VL's language model (the edit's vision tokens count in the length)
        return [EncoderInput("text_encoder", length + QWEN_TEMPLATE_TOKENS[family])]
    if "image_encoder" not in arch.components:  # wan_t2v, and Wan 2.2 I2V-A14B (image latents only: the VAE encoder)
        return [EncoderInput("text_encoder", length)]
    size = arch.components["image_encoder"].get("image_size", 224)
    return [EncoderInput("text_encoder", length), EncoderInput("image_encoder", image_size=size)]


def vae_scale(arch: Architecture) -> int:
    """Pixels per latent pixel of the family's VAE, read from its config as the adapters read it."""
    vae = arch.components["vae"]
    if vae["_class_name"] == "AutoencoderKLWan":
        from raygrpo.models.wan import vae_compression

        return vae_compression(vae)[0]
    if vae["_class_name"] == "AutoencoderKLQwenImage":  # the Qwen-Image pipelines' 2 ** len(temperal_downsample)
        return 2 ** len(vae.get("temperal_downsample", [False, True, True]))
    if vae["_class_name"] in VAE_FACTOR:
        return vae.get(VAE_FACTOR[vae["_class_name"]], 8)
    return 2 ** (len(vae.get("block_out_channels", [128, 256, 512, 512])) - 1)


def build_components(config: Config, arch: Architecture, role: str) -> dict[str, torch.nn.Module]:
    """The role's fake components (call inside a FakeTensorMode): the network, and for rollout every encoder and the VAE."""
    if role == "learner":
        return {arch.network: build_component(arch, arch.network, torch.float32)}
    dtype = torch_dtype(config.model.dtype)
    names = [arch.network, "vae", *(e.component for e in encoders(config, arch))]
    if "transformer_2" in arch.components:  # Wan 2.2 A14B: rollout also holds the frozen expert (raygrpo/models/wan_experts.py)
        names.append("transformer_2")
    return {name: build_component(arch, name, dtype) for name in names}


def fake_adapter(config: Config, arch: Architecture, components: dict[str, torch.nn.Module]) -> ModelAdapter:
    """The family's adapter over ``components`` (from :func:`build_components`), with the config's size and guidance.

    A learner's view (no VAE) gets the VAE's scale, and with classifier-free guidance in training the empty
    prompt's conditioning, as ``from_pretrained(load_text_encoders=False, load_vae=False)`` does.
    """
    model, family = config.model, config.model.family
    learner = "vae" not in components
    guidance = model.train_guidance_scale if learner and model.train_guidance_scale is not None else model.guidance_scale
    network = components[arch.network]
    common = dict(height=model.height, width=model.width, guidance_scale=guidance)
    text = {k: v for k, v in components.items() if k.startswith(("text_encoder", "image_encoder"))}
    if family == "sd":
        adapter = MODEL_FAMILIES[family](
            network, scheduler=build_component(arch, "scheduler", torch.float32), vae=components.get("vae"),
            vae_scale_factor=vae_scale(arch), **text, **common,
        )  # fmt: skip
    elif family in ("hunyuan_video", "wan_i2v", "wan_t2v"):
        from raygrpo.models.wan import WAN_22, vae_compression
        from raygrpo.models.wan_t2v import WAN_T2V

        wan = {}
        if family != "hunyuan_video":
            spatial, temporal = vae_compression(arch.components["vae"])
            if family == "wan_t2v" or "image_encoder" not in arch.components:  # the variant the pipeline's index names
                wan["variant"] = WAN_T2V if family == "wan_t2v" else WAN_22
        else:
            spatial = vae_scale(arch)
            temporal = arch.components["vae"].get("temporal_compression_ratio", 4)
        adapter = MODEL_FAMILIES[family](
            network, vae=components.get("vae"), spatial_compression=spatial, temporal_compression=temporal,
            num_frames=model.num_frames or _default_frames(family), max_sequence_length=model.max_sequence_length, **text, **common, **wan,
        )  # fmt: skip
    else:
        adapter = MODEL_FAMILIES[family](
            network, vae=components.get("vae"), vae_scale_factor=vae_scale(arch), max_sequence_length=model.max_sequence_length,
            **text, **common,
        )  # fmt: skip
    if hasattr(adapter, "set_negative_conditioning"):
        adapter.set_negative_conditioning(conditioning(config, arch, adapter, negative=True))
    return adapter


def _default_frames(family: str) -> int:
    from raygrpo.models import hunyuan_video, wan

    return (hunyuan_video if family == "hunyuan_video" else wan).DEFAULT_NUM_FRAMES


def conditioning(config: Config, arch: Architecture, adapter: ModelAdapter, negative: bool = False) -> Conditioning:
    """One prompt group's conditioning at the shapes the family's ``encode_prompt`` returns (zeros).

    ``negative``: the empty prompt's, as the CFG families keep it (its ``prompt_embeds`` alone).
    """
    net = arch.components[arch.network]
    length, family = config.model.max_sequence_length, config.model.family
    zeros = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    if family == "flux":
        return Conditioning(zeros(length, net["joint_attention_dim"]), zeros(net["pooled_projection_dim"]))
    if family == "flux_kontext":  # the packed reference image, the output's size
        text = zeros(length, net["joint_attention_dim"])
        return Conditioning(text, zeros(net["pooled_projection_dim"]), image_latents=zeros(*adapter.latent_shape))
    if family == "sd3":
        return Conditioning(zeros(CLIP_TOKENS + length, net["joint_attention_dim"]), zeros(net["pooled_projection_dim"]))
    if family == "sd":
        return Conditioning(zeros(CLIP_TOKENS, net["cross_attention_dim"]))
    if family == "flux2":  # three hidden states of the text encoder side by side, no pooled vector
        return Conditioning(zeros(length, net["joint_attention_dim"]))
    if family == "qwen_image":  # Qwen2.5-VL states padded to max_sequence_length, with their mask
        return Conditioning(zeros(length, net["joint_attention_dim"]), prompt_mask=np.ones(length, np.int64))
    if family == "qwen_image_edit":  # the negative's and the prompt's, read with the reference, whose latents ride along
        c, h, w = adapter.unpacked_latent_shape
        text, mask = zeros(2, length, net["joint_attention_dim"]), np.ones((2, length), np.int64)
        return Conditioning(text, prompt_mask=mask, image_latents=zeros(c, h, w))
    if family == "hunyuan_video":
        return Conditioning(
            zeros(length, net.get("text_embed_dim", 4096)), zeros(net.get("pooled_projection_dim", 768)), np.ones(length, np.int64)
        )
    text = zeros(length, net["text_dim"])
    if negative or family == "wan_t2v":
        return Conditioning(text)
    c, frames, h, w = adapter.latent_shape
    image_embeds = None if net.get("image_dim") is None else zeros(CLIP_IMAGE_TOKENS, net["image_dim"])  # Wan 2.2: none
    return Conditioning(text, image_embeds=image_embeds, image_latents=zeros(4 + c, frames, h, w))


def decode_input_shape(adapter: ModelAdapter, group_size: int) -> tuple[int, ...]:
    """What one ``decode`` call feeds the VAE: images the whole group at once, videos one at a time (the adapters' defaults)."""
    if len(adapter.latent_shape) == 4:
        return (1, *adapter.latent_shape)
    if adapter.family in ("flux", "flux_kontext", "flux2"):
        return (group_size, *adapter.unpacked_latent_shape)
    if adapter.family in QWEN_TEMPLATE_TOKENS:  # the Qwen-Image VAE is 3-D: one frame
        c, h, w = adapter.unpacked_latent_shape
        return (group_size, c, 1, h, w)
    return (group_size, *adapter.latent_shape)
