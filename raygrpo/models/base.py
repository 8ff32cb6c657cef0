"""The model-adapter contract: what rollout, learner, algorithms and eval use of a generator family.

One adapter per family (``flux.py``, ``sd3.py``, ``sd.py``, ``hunyuan_video.py``, ``wan.py``) hides
the diffusers specifics behind :class:`ModelAdapter`. Everything the rest of raygrpo calls is listed
there, with shapes; nothing else of an adapter is used outside ``raygrpo/models`` (the tests aside).
The other names here are the few helpers every adapter shares, so that they exist once:
:func:`quantize_timestep` (sampler and learner must feed the network the very same timestep),
:func:`check_num_frames`, the uint8 conversions of the pipelines' output paths,
:class:`PromptTruncation`, and :class:`CFGNegative` (the adapter base of the families whose CFG has one
negative prompt for every group).

Extension pattern (a new family)::

    class MyModel(ModelAdapter):
        family = "my_family"                # its key in raygrpo.models.MODEL_FAMILIES
        network_component = "transformer"   # the pipeline folder the trained network is saved as

        @classmethod
        def from_pretrained(cls, name_or_path, *, torch_dtype, device, ...): ...  # via raygrpo.models.hub
        def encode_prompt(self, prompt, image=None): ...
        def initial_noise(self, generator, num): ...
        def velocity(self, latents, sigmas, cond, guidance_scale=None): ...
        def decode(self, latents, batch_size=None): ...

then add its folders to :data:`raygrpo.models.hub.PIPELINE_COMPONENTS`, a tiny builder to
``tiny.py`` / ``tiny_video.py``, and a case to ``tests/test_adapter_contract.py``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.network import network_device, network_dtype
from raygrpo.sampling import sigma_grid


def quantize_timestep(sigmas: torch.Tensor) -> torch.Tensor:
    """The network's timestep for noise levels ``sigmas``: ``floor(sigma * 1000) / 1000``.

    DanceGRPO feeds ``int(sigma * 1000) / 1000`` (on float32 sigmas) in sampling and training; the
    learner's log-probabilities only match the sampler's when both use exactly this, so computed in
    float32 as there (float64 would floor 0.7 to 0.699). Families whose network takes the timestep
    on the 0..1000 scale feed ``quantize_timestep(sigma) * 1000``.
    """
    return torch.floor(sigmas.to(torch.float32) * 1000) / 1000


def check_num_frames(num_frames: int, temporal: int) -> None:
    """Causal video VAEs encode ``temporal * k + 1`` frames (the first frame alone, then groups of ``temporal``)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        below = (num_frames - 1) // temporal * temporal + 1
        raise ValueError(
            f"num_frames must be {temporal}k+1 (the VAE keeps the first frame and compresses the rest {temporal}x in time), "
            f"got {num_frames}; use {max(below, 1)} or {below + temporal}"
        )


def to_uint8_images(decoded: torch.Tensor, processor: Any) -> np.ndarray:
    """VAE output ``[B, 3, H, W]`` in [-1, 1] to ``[B, H, W, 3]`` uint8: the pipelines' ``"np"`` path, then PIL's rounding."""
    array = processor.postprocess(decoded, output_type="np")  # [B, H, W, 3] float in [0, 1]
    return (array * 255).round().astype(np.uint8)


def to_uint8_video(video: torch.Tensor, processor: Any) -> np.ndarray:
    """VAE output ``[B, 3, F, H, W]`` in [-1, 1] to ``[B, F, H, W, 3]`` uint8, as the pipelines' ``"np"`` path then PIL's rounding."""
    frames = processor.postprocess_video(video, output_type="np")  # [B, F, H, W, 3] float in [0, 1]
    return (np.asarray(frames) * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------ over-long prompts
@dataclass(frozen=True)
class TokenLimit:
    """How much of a prompt one text encoder reads, as its pipeline tokenizes and truncates it."""

    encoder: str  # the name the warning gives it: "CLIP", "T5", "Llama", "UMT5"
    tokenizer: Any
    max_tokens: int  # tokens kept, special tokens included
    template: str = "{}"  # text the pipeline wraps the prompt in before tokenizing (HunyuanVideo's chat template)


# What diffusers' pipelines and transformers' tokenizers say about an over-long prompt; PromptTruncation says it instead.
_TRUNCATION_MESSAGES = ("The following part of your input was truncated", "Token indices sequence length is longer than")


def _not_a_truncation_message(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TRUNCATION_MESSAGES)


class PromptTruncation:
    """One WARNING per adapter when a prompt is longer than a text encoder reads; the prompt is truncated.

    Every pipeline truncates an over-long prompt to each tokenizer's limit (CLIP's 77 tokens, T5's
    or UMT5's ``max_sequence_length``, Llama's ``max_sequence_length`` after the chat template), so
    the tensors never grow with the prompt. What differs is the noise: FluxPipeline,
    StableDiffusion3Pipeline and HunyuanVideoPipeline log the whole dropped text for every such
    prompt, and transformers warns once per tokenizer. An adapter counts the tokens itself instead
    (:meth:`check`, before the pipeline encodes), names the limit and how many tokens are dropped
    once, and silences the others around the pipeline's encode (:meth:`quiet`).
    """

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.warned = False

    def check(self, prompt: str, limits: Sequence[TokenLimit]) -> None:
        if self.warned:
            return  # counting costs a tokenization per new prompt; once warned, nothing more is said
        over = []
        for limit in limits:
            count = len(limit.tokenizer(limit.template.format(prompt), verbose=False)["input_ids"])
            if count > limit.max_tokens:
                over.append(f"{limit.encoder}: {count} tokens, limit {limit.max_tokens}, {count - limit.max_tokens} dropped")
        if over:
            self.warned = True
            self.logger.warning(
                "a prompt of %d characters is longer than the text encoders read and is truncated as the diffusers pipeline "
                "truncates it (%s). Warned once for this model: later over-long prompts are truncated silently.",
                len(prompt),
                "; ".join(over),
            )

    @staticmethod
    @contextmanager
    def quiet(pipeline: Any) -> Iterator[None]:
        """Within: no per-prompt truncation warnings from ``pipeline``'s module or from transformers' tokenizers."""
        loggers = [logging.getLogger(type(pipeline).__module__), logging.getLogger("transformers.tokenization_utils_base")]
        for logger in loggers:
            logger.addFilter(_not_a_truncation_message)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(_not_a_truncation_message)


def classifier_free_guidance(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """``out_u + s (out_c - out_u)`` of one batched forward ``[2B, ...]`` over ``[unconditional; conditional]`` inputs.

    The pipelines' CFG; the unconditional half comes first, as they concatenate it. Returns ``[B, ...]``.
    """
    unconditional, conditional = prediction.chunk(2)
    return unconditional + scale * (conditional - unconditional)


# -------------------------------------------------------------------------------------------- contract
LOAD_KEYWORDS = ("torch_dtype", "device", "load_text_encoders", "load_vae", "height", "width", "guidance_scale", "max_sequence_length")


class ModelAdapter(ABC):
    """A generator family as rollout, learner, algorithms and eval use it.

    Members (everything used outside ``raygrpo/models``):

    - ``family`` (class attribute): the key of the family in ``raygrpo.models.MODEL_FAMILIES``;
    - ``network_component`` (class attribute): the pipeline folder name of the trained network
      (``"transformer"``; ``"unet"`` for Stable Diffusion), under which checkpoints and exports save it;
    - ``guidance``: how ``guidance_scale`` acts: ``"cfg"`` (classifier-free, an unconditional branch above 1;
      the negative is :class:`CFGNegative`'s or rides with each group), ``"embedded"`` (guidance-distilled: the
      value enters the one forward; the default), ``"none"`` (ignored: step-distilled FLUX.2 [klein]). The
      config's ``ModelConfig.guidance_kind`` says the same before any model loads;
    - ``transformer``: the trained network, a diffusers ``ModelMixin`` (a UNet for Stable Diffusion,
      also reachable as ``unet``). The learner trains it, rollout loads synced weights into it;
    - :attr:`device` / :attr:`dtype`: where the network is and the dtype of its weights;
    - :attr:`latent_shape`: one sample's latent shape, in which the shapes below are stated;
    - :meth:`from_pretrained`, :meth:`encode_prompt`, :meth:`sigma_grid`, :meth:`initial_noise`,
      :meth:`velocity`, :meth:`decode`, :meth:`trainable_levels`.

    Latents are float32 tensors ``[B, *latent_shape]`` in flow coordinates, ``x_sigma = (1 - sigma)
    x0 + sigma eps``, with the family's layout (FLUX: packed tokens ``[B, S, D]``; SD3 and SD: ``[B,
    C, h, w]``; video: ``[B, C, F_lat, h, w]``). Adapters load every module in eval mode with
    gradients off; whoever trains switches them on.
    """

    family: ClassVar[str]
    network_component: ClassVar[str]
    guidance: Literal["cfg", "embedded", "none"] = "embedded"  # a class attribute, or per instance where the variant decides
    transformer: torch.nn.Module

    @classmethod
    @abstractmethod
    def from_pretrained(cls, name_or_path: str, **kwargs: Any) -> ModelAdapter:
        """Load from a hub id, a local diffusers pipeline folder, or ``"tiny-random"`` (the family's tiny build).

        Takes the keywords ``raygrpo.models.load_model`` passes (:data:`LOAD_KEYWORDS`; video
        families also ``num_frames``), each with a family default: ``torch_dtype`` and ``device`` of
        the modules; ``load_text_encoders=False`` and ``load_vae=False`` for the learner's view (the
        network alone, plus whatever classifier-free guidance needs: the empty prompt's encoding);
        ``height`` / ``width`` (None: the family's default size); ``guidance_scale``, what
        :meth:`velocity` applies by default; ``max_sequence_length``, the text encoder's token
        budget where the family has one (accepted and ignored otherwise).
        """

    @property
    def device(self) -> torch.device:
        """The network's device; tensors handed to :meth:`velocity` are moved there."""
        return network_device(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's floating-point weights (what inputs are cast to in :meth:`velocity`)."""
        return network_dtype(self.transformer)

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent shape: ``(S, D)`` packed tokens (FLUX), ``(C, h, w)`` (SD3, SD), ``(C, F_lat, h, w)`` (video)."""

    @abstractmethod
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """The conditioning of one prompt group, once per process and text (and image).

        ``prompt_embeds [L, D_text]`` float32 always; ``pooled_prompt_embeds [D_pool]``,
        ``prompt_mask [L]`` int64, ``image_embeds [N, D_img]`` and ``image_latents`` where the
        family uses them (see :class:`~raygrpo.contracts.Conditioning`). ``image`` is the group's
        ``[H, W, 3]`` uint8 conditioning image: required by image-to-video families, refused by the
        others. A prompt longer than a text encoder reads is truncated as its pipeline truncates it
        (:class:`PromptTruncation`). A repeated prompt returns cached arrays: treat them as read-only.
        """

    def sigma_grid(self, sampler: str, num_steps: int, shift: float) -> torch.Tensor:
        """The rollout's noise levels ``[T+1]`` float32, decreasing from about 1 to 0 (:func:`raygrpo.sampling.sigma_grid`).

        Rollout calls it before :meth:`initial_noise`; a family whose noise depends on the grid's
        first level (variance-preserving Stable Diffusion) overrides it.
        """
        return sigma_grid(sampler, num_steps, shift)

    def trainable_levels(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the trained network predicts at each noise level of ``sigmas [N]``, so a step there can train.

        Every level, except for Wan 2.2's two-expert models, whose trained expert owns only its side of the
        boundary (raygrpo/models/wan_experts.py); the algorithms that draw training steps or noise levels
        (DanceGRPO, DGPO) draw among these.
        """
        return torch.ones(len(sigmas), dtype=torch.bool)

    @abstractmethod
    def initial_noise(self, generator: torch.Generator | None, num: int) -> torch.Tensor:
        """``[num, *latent_shape]`` float32 noise at the grid's first noise level, drawn as the pipeline draws it.

        Drawn in one go from ``generator``, so member ``i``'s noise does not depend on ``num``
        (``initial_noise(g, n)[i] == initial_noise(g, m)[i]`` for the same generator state): a group
        spread over workers gets the same members wherever they are sampled. A CPU generator gives
        the same noise on every device.
        """

    @abstractmethod
    def velocity(
        self, latents: torch.Tensor, sigmas: torch.Tensor, cond: ConditioningBatch, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """The flow velocity ``v ~ eps - x0`` at ``latents [B, *latent_shape]``, noise levels ``sigmas [B]`` (or a scalar).

        Returns float32 ``[B, *latent_shape]``. ``cond`` holds ``B`` rows of :meth:`encode_prompt`'s
        output. ``guidance_scale`` None is the model's own; a guidance-distilled family embeds it
        (one forward), a CFG family combines the unconditional and conditional predictions of one
        batched forward when it is above 1. Gradients flow when the caller enables them.
        """

    @abstractmethod
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Clean latents ``[B, *latent_shape]`` to uint8 pixels: images ``[B, H, W, 3]`` or videos ``[B, F, H, W, 3]``.

        As the pipeline's output path (its ``"np"`` output times 255, rounded). ``batch_size`` bounds
        how many go through the VAE at once.
        """



# ------------------------------------------------------------------------------- CFG's negative prompt
class CFGNegative(ModelAdapter):
    """A :class:`ModelAdapter` whose classifier-free guidance has one negative prompt for every group.

    SD, SD3, FLUX.2 (its [klein] base guides so), Qwen-Image and Wan. The pipelines encode
    :attr:`negative_prompt` through the same text path as the prompt; the adapter does it once per model
    (:attr:`negative_conditioning`) and keeps its text fields only (``prompt_embeds``, ``pooled_prompt_embeds``,
    ``prompt_mask``: an image-to-video family's unconditional branch sees the group's own image). A model
    without text encoders (the learner's view) is handed an encoding made elsewhere with
    :meth:`set_negative_conditioning`, or keeps the one its ``from_pretrained`` made before dropping the
    encoders (:meth:`keep_negative_only`).

    Hooks: :meth:`text_encoders_loaded` (which encoders the family needs); :meth:`encode_negative` (how the
    negative is encoded; Wan encodes text without an image, and can fetch UMT5 from its source).
    """

    negative_prompt: ClassVar[str] = ""  # the pipelines' default negative prompt (Qwen-Image: " ")
    _negative: Conditioning | None = None  # the instance's encoding, once made or set

    def text_encoders_loaded(self) -> bool:
        """Whether the text encoders :meth:`encode_prompt` runs are loaded (one ``text_encoder`` unless the family says)."""
        return getattr(self, "text_encoder", None) is not None

    def encode_negative(self) -> Conditioning:
        """The negative prompt's encoding, made when none is set: :meth:`encode_prompt` of :attr:`negative_prompt`."""
        if not self.text_encoders_loaded():
            raise RuntimeError(
                f"classifier-free guidance (guidance_scale > 1) needs the negative prompt's encoding, and this {type(self).__name__} "
                "was loaded without its text encoders (load_text_encoders=False, the learner's view): load them, call "
                "set_negative_conditioning() with an encoding made elsewhere, or pass guidance_scale=1.0"
            )
        return self.encode_prompt(self.negative_prompt)

    @property
    def negative_conditioning(self) -> Conditioning:
        """CFG's unconditional branch: :attr:`negative_prompt`'s text conditioning, encoded once (float32, mask int64)."""
        if self._negative is None:
            self._negative = _text_fields(self.encode_negative())
        return self._negative

    def set_negative_conditioning(self, conditioning: Conditioning) -> None:
        """Use ``conditioning`` (e.g. another worker's :attr:`negative_conditioning`) as the CFG negative; its text fields alone count."""
        self._negative = _text_fields(conditioning)

    def keep_negative_only(self, *components: str) -> None:
        """Encode the negative now, then drop ``components`` (text encoders loaded for it alone, by a learner with CFG)."""
        self.set_negative_conditioning(self.negative_conditioning)
        for name in components:
            setattr(self, name, None)


def _text_fields(conditioning: Conditioning) -> Conditioning:
    """``conditioning``'s text fields as the negative keeps them: embeddings float32, the mask int64, no image fields."""

    def cast(array: np.ndarray | None, dtype: type) -> np.ndarray | None:
        return None if array is None else np.asarray(array, dtype)

    return Conditioning(
        prompt_embeds=cast(conditioning.prompt_embeds, np.float32),
        pooled_prompt_embeds=cast(conditioning.pooled_prompt_embeds, np.float32),
        prompt_mask=cast(conditioning.prompt_mask, np.int64),
    )


__all__ = [
    "LOAD_KEYWORDS",
    "CFGNegative",
    "ModelAdapter",
    "PromptTruncation",
    "TokenLimit",
    "check_num_frames",
    "classifier_free_guidance",
    "quantize_timestep",
    "to_uint8_images",
    "to_uint8_video",
]
