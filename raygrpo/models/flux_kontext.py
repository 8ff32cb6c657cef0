"""FLUX.1 Kontext adapter (image editing): FLUX.1 with the reference image's tokens appended to the sequence.

FLUX.1 Kontext [dev] (Black Forest Labs, arXiv 2506.15742) is FLUX.1 [dev]'s guidance-distilled transformer
fine-tuned for editing; rollout and learner see it through :class:`FluxKontextModel`, a :class:`~raygrpo.models.flux.FluxModel`
with three hooks filled in. As diffusers' ``FluxKontextPipeline`` (pipelines/flux/pipeline_flux_kontext.py,
``prepare_latents`` and the denoising loop of ``__call__``) conditions:

- the reference image is preprocessed to ``[-1, 1]`` (``VaeImageProcessor``), VAE-encoded (the distribution's
  mode, ``sample_mode="argmax"``), normalised ``z' = (z - shift_factor) * scaling_factor`` and packed in 2x2
  patches like the noisy latents: ``image_latents [S_ref, D]``, once per prompt group
  (:meth:`FluxKontextModel.encode_prompt`; it rides in the group's :class:`~raygrpo.contracts.Conditioning`, as
  Wan's first frame does);
- every forward takes ``hidden_states = [x_sigma ; z'_ref]`` (``[B, S + S_ref, D]``, along the sequence) with
  RoPE ids ``(0, i, j)`` for the noisy tokens and ``(1, i, j)`` for the reference's (the first axis tells them
  apart), and the velocity is the first ``S`` output tokens: ``v = f([x_sigma ; z'_ref], t, c)[:, :S]``;
- text is FLUX.1's (CLIP pooled + T5 states) and the guidance is embedded (one forward, no CFG): the
  pipeline's default 3.5; flow_grpo's Kontext recipe samples with 2.5 (``config/grpo.py``, ``counting_flux_kontext``).

The timestep, noise, packing and decode are FLUX.1's (:mod:`raygrpo.models.flux`), so sampler and learner
agree bit for bit as there.

Reference size (a deviation from the pipeline's defaults): the reference is resized to the output size
``H x W`` (diffusers' ``VaeImageProcessor`` resize), so ``S_ref = S``. ``FluxKontextPipeline`` by default
snaps the reference to the nearest of its ``PREFERRED_KONTEXT_RESOLUTIONS`` (about 1 Mpx, ``_auto_resize``)
and rescales the output to ``max_area`` 1024²; with the reference already ``H x W``, ``_auto_resize=False`` and
``max_area=H*W`` it computes exactly what this adapter does (tests/test_flux_kontext_model.py). flow_grpo's
``scripts/train_flux_kontext.py`` resizes every reference to ``resolution x resolution`` likewise. A fixed
``S_ref`` lets groups of different prompts batch together (:meth:`~raygrpo.contracts.ConditioningBatch.concat`
needs equal shapes) and fixes the cost: every forward runs ``2S`` image tokens.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.flux import FluxModel
from raygrpo.models.hub import ModelNotFoundError

_IMAGE_CACHE = 32  # encoded reference images kept per process (prompts repeat every epoch)
KONTEXT_PIPELINES = ("FluxKontextPipeline",)  # the model_index.json classes flux_kontext loads


class FluxKontextModel(FluxModel):
    """A FLUX.1 Kontext image-editing model as rollout and learner use it.

    Components: FLUX.1's (see :class:`~raygrpo.models.flux.FluxModel`); the VAE also encodes each group's
    reference image. Latents are FLUX.1's packed ``[B, S, D]``; the conditioning adds ``image_latents
    [S, D]`` (the packed reference, the output's size). The learner loads the transformer alone: the
    reference arrives encoded with each rollout.
    """

    family = "flux_kontext"
    pipeline_class = FluxKontextPipeline

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._image_cache: OrderedDict[bytes, np.ndarray] = OrderedDict()

    @classmethod
    def _check_source(cls, source: str) -> None:
        """Refuse a pipeline folder of another FLUX variant (FLUX.1 text-to-image, Fill, ...) before its weights load.

        Its transformer would take the appended tokens without having been trained on them. A folder without
        a readable index passes (the component loads then say what is missing).
        """
        try:
            name = FluxKontextPipeline.load_config(source).get("_class_name")
        except OSError:
            return
        if name not in KONTEXT_PIPELINES:
            hint = " (FLUX.1 text-to-image: model.family flux)" if name == "FluxPipeline" else ""
            raise ModelNotFoundError(
                f"{source} holds a {name}{hint}; model.family flux_kontext loads {list(KONTEXT_PIPELINES)} checkpoints "
                "such as black-forest-labs/FLUX.1-Kontext-dev"
            )

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """FLUX.1's text conditioning of ``prompt`` and the packed VAE latents ``image_latents [S, D]`` of ``image``.

        ``image``: the group's reference, ``[H0, W0, 3]`` uint8 of any size (resized to the output size, see the
        module docstring). Text encodings are cached per prompt and image encodings per image content; treat the
        returned arrays as read-only.
        """
        if image is None:
            raise ValueError(
                f"flux_kontext edits an image and the prompt {prompt!r} came without a conditioning image: give "
                "data.prompt_file as a .jsonl ({'prompt': ..., 'image': path}) or a .parquet with an image column"
            )
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"the reference image must be a uint8 array [H, W, 3], got {desc}")
        if self.text_encoder is None or self.vae is None:
            raise RuntimeError(
                "this FluxKontextModel was loaded with load_text_encoders=False or load_vae=False (the learner's view) "
                "and cannot encode"
            )
        text = self._encode_text(prompt)
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).digest()
        if key not in self._image_cache:
            self._image_cache[key] = self._encode_reference(image)
            if len(self._image_cache) > _IMAGE_CACHE:
                self._image_cache.popitem(last=False)
        return Conditioning(text.prompt_embeds, text.pooled_prompt_embeds, image_latents=self._image_cache[key])

    @torch.inference_mode()
    def _encode_reference(self, image: np.ndarray) -> np.ndarray:
        """``[S, D]`` packed reference latents, by FluxKontextPipeline's own ``prepare_latents``."""
        vae = self.vae
        pixels = self.image_processor.preprocess(Image.fromarray(image), height=self.height, width=self.width)  # [1, 3, H, W]
        c, h, w = self.unpacked_latent_shape
        zeros = torch.zeros(1, *self.latent_shape, device=vae.device)  # given, so prepare_latents draws no noise
        _, reference, _, _ = self.pipeline.prepare_latents(
            pixels.to(vae.device, vae.dtype), 1, c, self.height, self.width, vae.dtype, vae.device, None, zeros
        )  # [1, S, D]
        return reference[0].float().cpu().numpy()

    # ------------------------------------------------------------------------- the network's input
    def _image_position_ids(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[2S, 3]``: the noisy tokens' ids ``(0, i, j)``, then the reference's ``(1, i, j)`` (FluxKontextPipeline.prepare_latents)."""
        ids = super()._image_position_ids(device, dtype)  # [S, 3]
        reference = ids.clone()
        reference[:, 0] = 1
        return torch.cat([ids, reference])

    def _network_input(self, latents: torch.Tensor, cond: ConditioningBatch) -> torch.Tensor:
        """``[B, 2S, D]``: the noisy tokens followed by the reference's, as the pipeline concatenates them."""
        if cond.image_latents is None:
            raise ValueError("flux_kontext needs image_latents in the conditioning (encode_prompt with a reference image)")
        reference = cond.image_latents.to(latents.device, latents.dtype)  # [B, S, D]
        if reference.shape != latents.shape:
            raise ValueError(
                f"image_latents are {tuple(reference.shape)} but the latents {tuple(latents.shape)}: encode the reference "
                f"with this model's size ({self.height}x{self.width})"
            )
        return torch.cat([latents, reference], dim=1)


__all__ = ["KONTEXT_PIPELINES", "FluxKontextModel"]
