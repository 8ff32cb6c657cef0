"""Qwen-Image (text-to-image) and Qwen-Image-Edit (image + text to image) adapters.

Both run ``QwenImageTransformer2DModel``, a 60-block dual-stream MMDiT conditioned on the last hidden
state of Qwen2.5-VL-7B (Qwen-Image report, arXiv 2508.02324; diffusers ``pipeline_qwenimage.py`` and
``pipeline_qwenimage_edit.py``, which this follows and whose helpers it calls):

- **Latents** are packed as FLUX's: the VAE latent ``[C, h, w]`` (``AutoencoderKLQwenImage``, a
  Wan-2.1-style causal 3-D VAE used on one frame, x8 in space, per-channel ``latents_mean`` /
  ``latents_std``) becomes ``S = (h/2)(w/2)`` tokens of ``4C`` values. Noise is drawn unpacked
  ``[B, 1, C, h, w]`` and packed, as ``prepare_latents``. The transformer's RoPE reads the image
  grid from ``img_shapes``.
- **Timestep**: the pipeline feeds ``scheduler.timesteps / 1000 = sigma``; here
  :func:`~raygrpo.models.base.quantize_timestep` of sigma, the same function every family uses, so
  that sampler and learner evaluate the network at bit-identical timesteps.
- **Prompt**: the prompt is wrapped in the pipeline's chat template, encoded, and the template's
  system prefix is dropped (``prompt_template_encode_start_idx`` tokens: 34, edit 64); Qwen-Image
  cuts what is left at ``max_sequence_length`` (512 by default). The pipeline keeps each prompt at
  its own length; a :class:`~raygrpo.contracts.Conditioning` must have one shape for every prompt,
  so the states are zero-padded to ``max_sequence_length`` with ``prompt_mask`` marking the real
  tokens, and :meth:`QwenImageModel.velocity` cuts a batch back to its longest prompt and passes the
  mask (None when every token is real, as the pipeline does). The masked padding changes nothing:
  image tokens never attend to it and text RoPE positions start at 0 either way.
- **True CFG**: Qwen-Image is not guidance-distilled. Above ``guidance_scale`` 1 (the pipeline's
  ``true_cfg_scale``, default 4) the unconditional branch is the negative prompt (``" "``, the
  model card's and the pipeline docstring's choice: the pipeline guides only when it is given one)
  and the result is the pipeline's norm-preserving combination, per token::

      v_cfg = v_u + s (v_c - v_u),     v = v_cfg * ||v_c|| / ||v_cfg||     (norms over the 4C channels)

  The pipeline runs the two branches as two forwards; here they are one batched forward.
- **Schedule**: ``QwenImagePipeline`` shifts its sigmas with ``mu`` from the image's token count
  (exponential time shift, base 0.5 at 256 tokens to 0.9 at 8192; ``exp(mu)`` is the usual shift
  ``s sigma / (1 + (s - 1) sigma)``) and stretches them so the last non-zero sigma is 0.02
  (``shift_terminal``). Rollout's grid stays every family's shifted ``linspace(1, 0, T+1)`` with
  ``rollout.shift``: :attr:`QwenImageModel.pipeline_shift` is the pipeline's ``exp(mu)`` at the
  adapter's size, the value the presets set (1.71 at 512 px, 2.0 at 1024 px); the terminal stretch
  is not applied (the samplers end at sigma 0 anyway).

Qwen-Image-Edit (:class:`QwenImageEditModel`) differs in conditioning only, as its pipeline does:

- the group's reference image is resized to the output's pixel count at its own aspect ratio
  (``calculate_dimensions``; the pipeline always uses 1024 x 1024 px, its default output size, and
  flow_grpo's Qwen-Image-Edit recipe uses its training size, 512 x 512, as here), then
- Qwen2.5-VL reads it with the prompt (``<|vision_start|><|image_pad|>...<|vision_end|>`` in the
  template, expanded by :class:`~raygrpo.models.qwen_processor.QwenImageTextProcessor`), and
- its VAE latents (distribution mode, normalised) are packed and appended to the noisy tokens on
  every forward; the transformer's output over them is dropped. ``img_shapes`` lists both grids.
- The negative prompt is encoded with the same image, so it belongs to the group: ``prompt_embeds``
  is ``[2, L, D]`` (negative, then prompt) and ``prompt_mask`` ``[2, L]``; ``image_latents`` holds the
  unpacked ``[C, h_img, w_img]`` (its grid is the RoPE's second entry). The edit pipeline does not
  cut its encoding; here it is cut at ``max_sequence_length`` as Qwen-Image's is (one warning).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch._subclasses.fake_tensor import is_fake
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import (
    CFGNegative,
    ModelAdapter,
    PromptTruncation,
    TokenLimit,
    classifier_free_guidance,
    quantize_timestep,
    to_uint8_images,
)
from raygrpo.models.hub import (
    DEFAULT_RESOLUTION,
    TINY_RANDOM,
    ModelNotFoundError,
    component_config,
    load_component,
    pretrained_source,
    tiny_stamp,
)
from raygrpo.models.qwen_processor import QwenImageTextProcessor
from raygrpo.models.tiny_qwen_image import TINY_QWEN_RESOLUTION

NEGATIVE_PROMPT = " "  # the unconditional branch of true CFG (Qwen-Image's model card)
DEFAULT_GUIDANCE = 4.0  # the pipelines' true_cfg_scale default
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default
_IMAGE_CACHE = 32  # encoded reference images (with their prompts) kept per process

logger = logging.getLogger(__name__)


def cfg_renormalized(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """The pipelines' true CFG on one batched forward ``[2B, S, D]`` (unconditional first): ``v_u + s (v_c - v_u)``
    rescaled per token to the conditional prediction's norm over ``D``. Returns ``[B, S, D]``."""
    conditional = prediction.chunk(2)[1]  # [B, S, D]
    combined = classifier_free_guidance(prediction, scale)  # [B, S, D]
    return combined * (conditional.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


# Qwen pipelines whose checkpoints these adapters do not load, and why.
_REFUSED = {
    "QwenImageEditPlusPipeline": "Qwen-Image-Edit-2509/2511 (QwenImageEditPlusPipeline) reads several reference images with its own "
    "template and sizes; qwen_image_edit loads Qwen/Qwen-Image-Edit (QwenImageEditPipeline)",
    "QwenImage21Pipeline": "Qwen-Image-2.1 has a Qwen3-VL text encoder and its own transformer; qwen_image loads Qwen/Qwen-Image",
}


def _check_pipeline(source: str, family: str, expected: str) -> None:
    """Refuse, before any weights load, a folder whose ``model_index.json`` names another pipeline than the family's."""
    try:
        name = QwenImagePipeline.load_config(source).get("_class_name")
    except OSError:
        return  # no readable index: the component loads say what is missing
    if name is None or name == expected:
        return
    families = {"QwenImagePipeline": "qwen_image", "QwenImageEditPipeline": "qwen_image_edit"}
    hint = _REFUSED.get(name) or (f"set model.family: {families[name]}" if name in families else "not a pipeline this family loads")
    raise ModelNotFoundError(f"{source} holds a {name}, but model.family {family} loads a {expected}: {hint}")


def _remember(cache: OrderedDict, key: Any, value: Any) -> Any:
    """``cache[key] = value``, the oldest entry dropped beyond :data:`_IMAGE_CACHE`; returns ``value``."""
    cache[key] = value
    if len(cache) > _IMAGE_CACHE:
        cache.popitem(last=False)
    return value


def _padded(embeds: torch.Tensor, length: int) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's states ``[n, D]`` (n <= length) zero-padded to ``[length, D]`` float32, and its mask ``[length]`` int64."""
    n = min(len(embeds), length)
    states = np.zeros((length, embeds.shape[-1]), np.float32)
    states[:n] = embeds[:n].float().cpu().numpy()
    mask = np.zeros(length, np.int64)
    mask[:n] = 1
    return states, mask


class QwenImageBase(ModelAdapter):
    """What Qwen-Image and Qwen-Image-Edit share: loading, packed latents, the transformer call with true CFG, decode.

    Components (diffusers / transformers types):

    - ``transformer``: :class:`~diffusers.QwenImageTransformer2DModel`, the trainable velocity network;
    - ``vae``: :class:`~diffusers.AutoencoderKLQwenImage` (16 latent channels, per-channel statistics), decode only;
    - ``text_encoder`` / ``tokenizer``: :class:`~transformers.Qwen2_5_VLForConditionalGeneration` (its last
      hidden state) / ``Qwen2Tokenizer``;
    - ``scheduler``: :class:`~diffusers.FlowMatchEulerDiscreteScheduler`, its config only (the dynamic shift's constants).

    Text encoder and VAE may be absent (the learner's view). A family says how a batch's text (and the
    negative's) and its reference image reach the transformer: :meth:`_text_batch`, :meth:`_reference`.
    """

    network_component: ClassVar[str] = "transformer"
    guidance = "cfg"  # true CFG in both families (Qwen-Image-Edit's negative rides with each group)
    pipeline_class: ClassVar[type]

    def __init__(
        self,
        transformer: QwenImageTransformer2DModel,
        *,
        vae: AutoencoderKLQwenImage | None = None,
        text_encoder: Qwen2_5_VLForConditionalGeneration | None = None,
        tokenizer: Qwen2Tokenizer | None = None,
        processor: QwenImageTextProcessor | None = None,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        vae_scale_factor: int = 8,
        height: int = DEFAULT_RESOLUTION,
        width: int = DEFAULT_RESOLUTION,
        guidance_scale: float = DEFAULT_GUIDANCE,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        template_start_idx: int | None = None,
    ):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder, self.tokenizer, self.processor = text_encoder, tokenizer, processor
        self.scheduler = scheduler
        self.vae_scale_factor = vae_scale_factor
        multiple = 2 * vae_scale_factor  # one packed token covers a 2x2 patch of latent pixels
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        if self.family == "qwen_image" and not 0 < max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be in 1..1024 (QwenImagePipeline's limit), got {max_sequence_length}")
        self.height, self.width = height, width
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = max_sequence_length
        self.template_start_idx = template_start_idx  # None: the pipeline's own (real checkpoints)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
        self._prompt_cache: dict[str, Conditioning] = {}
        self._truncation = PromptTruncation(logger)
        self._pipeline: QwenImagePipeline | QwenImageEditPipeline | None = None

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
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> QwenImageBase:
        """Load from a hub id, a local diffusers folder, or ``"tiny-random"``, component by component.

        ``height``/``width`` default to 64 for ``"tiny-random"`` and 512 otherwise. The learner's view
        (``load_text_encoders=False``) of Qwen-Image with ``guidance_scale > 1`` loads the text encoder on the CPU
        once for the negative prompt's encoding, then frees it (Qwen-Image-Edit's negatives ride with each group).
        """
        source = pretrained_source(cls.family, name_or_path)
        _check_pipeline(source, cls.family, cls.pipeline_class.__name__)
        # Qwen-Image's one negative for every group is encoded here for a learner (the edit's rides with each group).
        negative_only = not load_text_encoders and guidance_scale > 1.0 and issubclass(cls, CFGNegative)

        def load(cls_, subfolder: str, **kwargs):
            on = "cpu" if negative_only and subfolder == "text_encoder" else device
            return load_component(source, cls_, subfolder, on, **kwargs)

        transformer = load(QwenImageTransformer2DModel, "transformer", torch_dtype=torch_dtype)
        scheduler = load(FlowMatchEulerDiscreteScheduler, "scheduler")
        text = {}
        if load_text_encoders or negative_only:
            text["tokenizer"] = load(Qwen2Tokenizer, "tokenizer")
            # transformers 5 names the argument ``dtype``; ``torch_dtype`` only warns.
            text["text_encoder"] = load(Qwen2_5_VLForConditionalGeneration, "text_encoder", dtype=torch_dtype)
            if cls.family == "qwen_image_edit":
                text["processor"] = load(QwenImageTextProcessor, "processor", tokenizer=text["tokenizer"])
        vae = load(AutoencoderKLQwenImage, "vae", torch_dtype=torch_dtype) if load_vae else None
        # From the file on both sides, so that rollout (VAE loaded) and learner (not loaded) agree: the pipeline's
        # 2 ** len(temperal_downsample).
        vae_scale_factor = 2 ** len(component_config(source, AutoencoderKLQwenImage, "vae")["temperal_downsample"])
        default = TINY_QWEN_RESOLUTION if str(name_or_path) == TINY_RANDOM else DEFAULT_RESOLUTION
        model = cls(
            transformer,
            vae=vae,
            scheduler=scheduler,
            vae_scale_factor=vae_scale_factor,
            height=height or default,
            width=width or default,
            guidance_scale=guidance_scale,
            max_sequence_length=max_sequence_length,
            template_start_idx=tiny_stamp(source).get("prompt_template_encode_start_idx"),
            **text,
        )
        if negative_only:
            model.keep_negative_only("text_encoder", "tokenizer", "_pipeline")
        return model

    # -------------------------------------------------------------------------------- properties
    # Copied from raygrpo.models.flux.FluxModel.num_latent_channels
    @property
    def num_latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    # Copied from raygrpo.models.flux.FluxModel.unpacked_latent_shape
    @property
    def unpacked_latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one VAE latent, ``h, w`` even, as the pipelines' prepare_latents makes them."""
        h = 2 * (self.height // (self.vae_scale_factor * 2))
        w = 2 * (self.width // (self.vae_scale_factor * 2))
        return self.num_latent_channels, h, w

    # Copied from raygrpo.models.flux.FluxModel.latent_shape
    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(S, D)`` of one packed latent: ``S = (h/2)(w/2)`` tokens of ``D = 4C`` values."""
        c, h, w = self.unpacked_latent_shape
        return (h // 2) * (w // 2), 4 * c

    @property
    def pipeline_shift(self) -> float:
        """``exp(mu)``: the time shift the pipeline's dynamic shifting applies at this size (``rollout.shift`` to match it).

        ``calculate_shift`` of the packed token count with the scheduler config's constants (the pipeline's
        fallbacks where absent); the scheduler's fixed ``shift`` where it does not shift dynamically.
        """
        config = self.scheduler.config if self.scheduler is not None else {}
        if not config.get("use_dynamic_shifting", True):
            return float(config.get("shift", 1.0))
        mu = calculate_shift(
            self.latent_shape[0],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        return math.exp(mu)

    @property
    def pipeline(self) -> QwenImagePipeline | QwenImageEditPipeline:
        """The family's pipeline over the loaded components (absent ones None), for its encoders and helpers."""
        if self._pipeline is None:
            parts = dict(scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer)
            if self.family == "qwen_image_edit":
                parts["processor"] = self.processor
            self._pipeline = self.pipeline_class(transformer=self.transformer, **parts)
            if self.template_start_idx is not None:  # a tiny build's tokenizer counts the template in its own tokens
                self._pipeline.prompt_template_encode_start_idx = self.template_start_idx
        return self._pipeline

    def _require_text_encoder(self) -> None:
        if self.text_encoder is None:
            raise RuntimeError(f"this {type(self).__name__} was loaded with load_text_encoders=False and cannot encode prompts")

    # ----------------------------------------------------------------------------------- latents
    def initial_noise(self, generator: torch.Generator | None, num: int) -> torch.Tensor:
        """``[num, S, D]`` float32 noise drawn ``[num, 1, C, h, w]`` and packed, as the pipelines' prepare_latents."""
        c, h, w = self.unpacked_latent_shape
        noise = randn_tensor((num, 1, c, h, w), generator=generator, device=self.device, dtype=torch.float32)
        return QwenImagePipeline._pack_latents(noise, num, c, h, w)

    def _forward(
        self, latents: torch.Tensor, sigmas: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor | None,
        img_shapes: list[tuple[int, int, int]],
    ) -> torch.Tensor:  # fmt: skip
        """The transformer over ``latents [B', S, D]`` (plus reference ``image_tokens [B', S_img, D]``), float32 ``[B', S, D]``.

        The text is cut to the batch's longest prompt; the mask goes in only where some token is padding.
        """
        device, dtype = self.device, self.dtype
        # The text length this batch needs, and whether any of it is padding (host syncs); the planner's fake tensors hold
        # no values: it measures the padded worst case, max_sequence_length tokens, unmasked.
        if is_fake(mask):
            keep, padded = mask.shape[1], False
        else:
            keep = int(mask.sum(dim=1).max())
            padded = not bool(mask[:, :keep].all())
        embeds, mask = embeds[:, :keep].to(device, dtype), mask[:, :keep].to(device)  # [B', L', D], [B', L']
        hidden = latents.to(device, dtype)
        if image_tokens is not None:
            hidden = torch.cat([hidden, image_tokens.to(device, dtype)], dim=1)  # [B', S + S_img, D]
        prediction = self.transformer(
            hidden_states=hidden,
            timestep=quantize_timestep(sigmas).to(device, dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask if padded else None,
            img_shapes=[img_shapes] * len(hidden),
            return_dict=False,
        )[0]
        return prediction[:, : latents.shape[1]].float()

    def _text_batch(self, cond: ConditioningBatch, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B', L, D], mask [B', L])``: the prompts, behind the negatives when ``guided`` (B' = 2B)."""
        raise NotImplementedError

    def _reference(self, cond: ConditioningBatch) -> tuple[torch.Tensor | None, list[tuple[int, int, int]]]:
        """The reference image's packed tokens ``[B, S_img, D]`` and RoPE grid (Qwen-Image: none)."""
        return None, []

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        cond: ConditioningBatch,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The (guided) velocity ``v ~ noise - x0`` at noise levels ``sigmas``, float32 ``[B, S, D]``.

        ``latents [B, S, D]``, ``sigmas [B]`` (or a scalar), ``cond`` with ``prompt_embeds`` and ``prompt_mask`` (Qwen-Image:
        ``[B, L, D_text]``, ``[B, L]``; Qwen-Image-Edit: ``[B, 2, L, D_text]``, ``[B, 2, L]`` and ``image_latents [B, C, h_img,
        w_img]``, appended to the noisy tokens, the same image in both CFG branches). ``guidance_scale`` None means
        ``self.guidance_scale``; above 1 the negative and the conditional predictions come from one batched forward,
        combined as the pipeline (module docstring); at 1 or below it is the conditional prediction alone. Gradients
        flow when the caller enables them.
        """
        if tuple(latents.shape[1:]) != self.latent_shape:
            size = f"{self.height}x{self.width}"
            raise ValueError(f"latents have shape {tuple(latents.shape[1:])} per sample; {size} images have {self.latent_shape}")
        batch = len(latents)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        guided = scale > 1.0
        sigmas = torch.as_tensor(sigmas, device=self.device).reshape(-1).expand(batch)  # [B]
        embeds, mask = self._text_batch(cond, guided)  # [B', L, D], [B', L]
        image_tokens, reference_grid = self._reference(cond)  # [B, S_img, D] or None
        if guided:
            latents, sigmas = torch.cat([latents, latents]), torch.cat([sigmas, sigmas])  # [2B, S, D], [2B]
            image_tokens = None if image_tokens is None else torch.cat([image_tokens, image_tokens])  # [2B, S_img, D]
        _, h, w = self.unpacked_latent_shape
        prediction = self._forward(latents, sigmas, embeds, mask, image_tokens, [(1, h // 2, w // 2), *reference_grid])  # [B', S, D]
        return cfg_renormalized(prediction, scale) if guided else prediction

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Packed latents ``[B, S, D]`` to uint8 images ``[B, H, W, 3]``, as the pipelines' output path."""
        if self.vae is None:
            raise RuntimeError(f"this {type(self).__name__} was loaded with load_vae=False and cannot decode")
        config, device = self.vae.config, self.vae.device
        mean = torch.tensor(config.latents_mean, device=device).view(1, config.z_dim, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=device).view(1, config.z_dim, 1, 1, 1)
        images = []
        for chunk in torch.as_tensor(latents).split(batch_size or len(latents)):
            unpacked = QwenImagePipeline._unpack_latents(chunk.to(device, torch.float32), self.height, self.width, self.vae_scale_factor)
            unpacked = unpacked * std + mean  # the pipeline's latents / (1 / std) + mean; [b, C, 1, h, w]
            decoded = self.vae.decode(unpacked.to(self.vae.dtype), return_dict=False)[0][:, :, 0]  # [b, 3, H, W]
            images.append(to_uint8_images(decoded, self.image_processor))
        return np.concatenate(images)

    def __repr__(self) -> str:
        loaded = [name for name in ("vae", "text_encoder") if getattr(self, name) is not None]
        return (
            f"{type(self).__name__}({self.height}x{self.width}, cfg={self.guidance_scale}, dtype={self.dtype}, "
            f"device={self.device}, loaded={['transformer', *loaded]})"
        )


class QwenImageModel(CFGNegative, QwenImageBase):
    """A Qwen-Image text-to-image model as rollout and learner use it (:class:`QwenImageBase`'s components).

    With CFG the learner keeps the negative prompt's encoding (:attr:`negative_conditioning`), made once from the
    source's text encoder at load.
    """

    family: ClassVar[str] = "qwen_image"
    pipeline_class: ClassVar[type] = QwenImagePipeline
    negative_prompt: ClassVar[str] = NEGATIVE_PROMPT

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """Qwen2.5-VL's last hidden states of the templated prompt, ``prompt_embeds [L, D]`` zero-padded to
        ``L = max_sequence_length`` with ``prompt_mask [L]``, once per process and prompt.

        Exactly ``QwenImagePipeline.encode_prompt`` up to the padding: the template's system prefix dropped,
        the rest cut at ``max_sequence_length`` (with one warning per model). Treat the arrays as read-only.
        """
        if image is not None:
            raise ValueError("qwen_image is text-to-image: a prompt group with a reference image needs family qwen_image_edit")
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        self._require_text_encoder()
        pipeline = self.pipeline
        start = pipeline.prompt_template_encode_start_idx
        limit = TokenLimit("Qwen2.5-VL", self.tokenizer, self.max_sequence_length + start, pipeline.prompt_template_encode)
        self._truncation.check(prompt, [limit])
        with torch.inference_mode(), PromptTruncation.quiet(pipeline):
            embeds, _ = pipeline.encode_prompt(prompt, device=self.text_encoder.device, max_sequence_length=self.max_sequence_length)
        states, mask = _padded(embeds[0], self.max_sequence_length)
        conditioning = self._prompt_cache[prompt] = Conditioning(prompt_embeds=states, prompt_mask=mask)
        return conditioning

    def _text_batch(self, cond: ConditioningBatch, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [B', L, D], mask [B', L])``: the prompts, behind the negatives when ``guided`` (B' = 2B)."""
        embeds, mask = cond.prompt_embeds, cond.prompt_mask
        if mask is None:
            raise ValueError(f"{self.family} needs prompt_mask in the conditioning (encode_prompt makes it)")
        if guided:
            negative = self.negative_conditioning
            if negative.prompt_embeds.shape != tuple(embeds.shape[1:]):
                raise ValueError(
                    f"prompt_embeds are {tuple(embeds.shape[1:])} per sample but the negative prompt's are "
                    f"{negative.prompt_embeds.shape}: encode both with the same max_sequence_length"
                )
            batch = len(embeds)
            negative_embeds = torch.as_tensor(negative.prompt_embeds, device=embeds.device)[None].expand(batch, -1, -1)
            negative_mask = torch.as_tensor(negative.prompt_mask, device=mask.device)[None].expand(batch, -1)
            embeds, mask = torch.cat([negative_embeds, embeds]), torch.cat([negative_mask, mask])
        return embeds, mask


class QwenImageEditModel(QwenImageBase):
    """A Qwen-Image-Edit model: :class:`QwenImageModel` whose groups carry a reference image (module docstring).

    Adds ``processor``: :class:`~raygrpo.models.qwen_processor.QwenImageTextProcessor` (Qwen2-VL's image
    processor and the tokenizer), through which Qwen2.5-VL reads the image with the prompt. The VAE also
    encodes the reference image, so rollout needs it loaded.
    """

    family: ClassVar[str] = "qwen_image_edit"
    pipeline_class: ClassVar[type] = QwenImageEditPipeline

    def __init__(self, transformer: QwenImageTransformer2DModel, **kwargs: Any):
        super().__init__(transformer, **kwargs)
        # Per image content: (the resized image Qwen2.5-VL reads, the negative's states and mask, the VAE latents).
        self._references: OrderedDict[bytes, tuple[Image.Image, np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._conditions: OrderedDict[tuple[str, bytes], Conditioning] = OrderedDict()

    def condition_size(self, image: np.ndarray) -> tuple[int, int]:
        """``(height, width)`` the reference image is resized to: the output's pixel count at the image's aspect ratio,
        multiples of 32 (``calculate_dimensions``)."""
        width, height, _ = calculate_dimensions(self.height * self.width, image.shape[1] / image.shape[0])
        return int(height), int(width)

    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """The negative prompt's and the prompt's Qwen2.5-VL states read with ``image`` (``[H, W, 3]`` uint8),
        ``prompt_embeds [2, L, D]`` and ``prompt_mask [2, L]``, and the image's normalised VAE latents
        ``image_latents [C, h_img, w_img]``, once per process, prompt and image content. Treat them as read-only."""
        if image is None:
            raise ValueError(
                f"qwen_image_edit edits an image and the prompt {prompt!r} came without a conditioning image: give "
                "data.prompt_file as a .jsonl ({'prompt': ..., 'image': path}) or a .parquet with an image column"
            )
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"the conditioning image must be a uint8 array [H, W, 3], got {getattr(image, 'shape', type(image).__name__)}")
        self._require_text_encoder()
        if self.vae is None:
            raise RuntimeError("this QwenImageEditModel was loaded with load_vae=False and cannot encode the reference image")
        image_key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).digest()
        if (prompt, image_key) in self._conditions:
            return self._conditions[(prompt, image_key)]
        if image_key not in self._references:
            _remember(self._references, image_key, self._encode_reference(image))
        resized, negative, negative_mask, latents = self._references[image_key]
        state, mask = self._encode_text(prompt, resized)
        embeds, masks = np.stack([negative, state]), np.stack([negative_mask, mask])  # [2, L, D], [2, L]
        conditioning = Conditioning(prompt_embeds=embeds, prompt_mask=masks, image_latents=latents)
        return _remember(self._conditions, (prompt, image_key), conditioning)

    @torch.inference_mode()
    def _encode_reference(self, image: np.ndarray) -> tuple[Image.Image, np.ndarray, np.ndarray, np.ndarray]:
        """The resized image, the negative prompt read with it, and its normalised VAE latents ``[C, h_img, w_img]``."""
        pipeline, (height, width) = self.pipeline, self.condition_size(image)
        resized = pipeline.image_processor.resize(Image.fromarray(image), height, width)  # what Qwen2.5-VL reads
        pixels = pipeline.image_processor.preprocess(resized, height, width).unsqueeze(2)  # [1, 3, 1, H_img, W_img]
        latents = pipeline._encode_vae_image(pixels.to(self.vae.device, self.vae.dtype), None)  # [1, C, 1, h_img, w_img]
        return resized, *self._encode_text(NEGATIVE_PROMPT, resized), latents[0, :, 0].float().cpu().numpy()

    @torch.inference_mode()
    def _encode_text(self, text: str, resized: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """``text`` and the image through the pipeline's encode_prompt: states ``[L, D]`` padded or cut to L, mask ``[L]``."""
        with PromptTruncation.quiet(self.pipeline):
            embeds, _ = self.pipeline.encode_prompt(text, image=resized, device=self.text_encoder.device)  # [1, n, D]
        tokens, limit = len(embeds[0]), self.max_sequence_length
        if tokens > limit and not self._truncation.warned:
            self._truncation.warned = True
            logger.warning(
                "a prompt read with its reference image is longer than model.max_sequence_length and is cut as QwenImagePipeline "
                "cuts (Qwen2.5-VL: %d tokens, limit %d, %d dropped; the image's vision tokens count). Warned once for this model.",
                tokens, limit, tokens - limit,
            )  # fmt: skip
        return _padded(embeds[0], limit)

    def _text_batch(self, cond: ConditioningBatch, guided: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if cond.prompt_mask is None or cond.prompt_embeds.ndim != 4:
            raise ValueError("qwen_image_edit needs prompt_embeds [B, 2, L, D] and prompt_mask [B, 2, L] (encode_prompt with an image)")
        if guided:  # [negatives; prompts], as the batched forward's halves
            embeds, mask = cond.prompt_embeds.transpose(0, 1), cond.prompt_mask.transpose(0, 1)  # [2, B, L, D], [2, B, L]
            return embeds.flatten(0, 1), mask.flatten(0, 1)  # [2B, L, D], [2B, L]
        return cond.prompt_embeds[:, 1], cond.prompt_mask[:, 1]

    def _reference(self, cond: ConditioningBatch) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        if cond.image_latents is None:
            raise ValueError("qwen_image_edit needs image_latents in the conditioning (encode_prompt with an image)")
        batch, c, h_img, w_img = cond.image_latents.shape
        tokens = QwenImagePipeline._pack_latents(cond.image_latents.contiguous(), batch, c, h_img, w_img)  # [B, S_img, 4C]
        return tokens, [(1, h_img // 2, w_img // 2)]


__all__ = ["DEFAULT_GUIDANCE", "NEGATIVE_PROMPT", "QwenImageBase", "QwenImageEditModel", "QwenImageModel", "cfg_renormalized"]
