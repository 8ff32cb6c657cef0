"""FLUX adapter: the few operations rollout and learner need, with the diffusers details inside.

Everything that must agree between sampling and training lives here once: how noise is laid out
and packed, how a noise level becomes the transformer's timestep, which position ids and guidance
the transformer sees, and how latents become pixels. The code reuses FluxPipeline's own helpers
(``encode_prompt``, ``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids``) so
that outputs match the pipeline's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.network import network_device, network_dtype
from raygrpo.models.tiny import tiny_model_folder
from raygrpo.sampling import sigma_grid

TINY_RANDOM = "tiny-random"  # special ``name_or_path``: the cached tiny random FLUX of tiny.py
DEFAULT_RESOLUTION = 512
TINY_RESOLUTION = 64  # the tiny model is for fast CPU runs; 512 px would only cost time
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelNotFoundError(RuntimeError):
    """The requested pretrained model is neither a local pipeline folder nor obtainable from the hub."""


def quantize_timestep(sigmas: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep for noise levels ``sigmas``: ``floor(sigma * 1000) / 1000``.

    DanceGRPO feeds ``int(sigma * 1000) / 1000`` (on float32 sigmas) in sampling and training; the
    learner's log-probabilities only match the sampler's when both use exactly this, so computed in
    float32 as there (float64 would floor 0.7 to 0.699).
    """
    return torch.floor(sigmas.to(torch.float32) * 1000) / 1000


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment may have changed since.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _not_found(repo_id: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"Cannot find pretrained model {repo_id!r}: there is no local folder of that name, it is not in the "
        f"Hugging Face cache, and {why}.\n"
        f"To fix: download it once, e.g. `hf download {repo_id} --local-dir DIR` (`huggingface-cli download` with "
        "huggingface_hub < 1.0; gated models such as black-forest-labs/FLUX.1-dev need the license accepted on the "
        "model page and `hf auth login` / `huggingface-cli login` first), then set model.pretrained=DIR. "
        "Use model.pretrained=tiny-random for a tiny random FLUX."
    )


def resolve_pretrained(name_or_path: str | os.PathLike, *, timeout: float = 5.0) -> str:
    """Where to load ``name_or_path`` from, failing fast with an actionable :class:`ModelNotFoundError`.

    Returns a local folder for ``"tiny-random"`` (built on first use), for an existing pipeline
    folder, and for a hub id whose snapshot is in the Hugging Face cache. For a hub id that is not
    cached but reachable it returns the id itself, so each component downloads only what it needs
    (the learner never fetches the text encoders). The hub is asked once, with ``timeout`` seconds,
    and not at all under ``HF_HUB_OFFLINE=1``; huggingface_hub's own downloads retry for ~25 s.
    """
    name = str(name_or_path)
    if name == TINY_RANDOM:
        return str(tiny_model_folder("flux"))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is a folder but holds no model_index.json, so it is not a diffusers pipeline folder. "
                "Point model.pretrained at the folder that contains model_index.json (the one with transformer/, "
                "vae/, text_encoder/ ... inside)."
            )
        return str(path.resolve())
    if path.exists() or not _REPO_ID.match(name):
        raise ModelNotFoundError(
            f"Pretrained model folder {name!r} does not exist (and the name is not a hub id such as "
            "'black-forest-labs/FLUX.1-dev'). Set model.pretrained to a diffusers pipeline folder (one holding "
            "model_index.json), a hub id, or tiny-random."
        )

    from huggingface_hub import get_session, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    cached = try_to_load_from_cache(name, "model_index.json")
    if isinstance(cached, str):
        return str(Path(cached).parent)
    if _hub_offline():
        raise _not_found(name, "HF_HUB_OFFLINE is set, so the hub was not asked (unset it to download)")
    try:
        # One HEAD request without retries: a dead network must fail in seconds, not half a minute.
        response = get_session().head(
            hf_hub_url(name, "model_index.json"), headers=build_hf_headers(), timeout=timeout, follow_redirects=True
        )
        hf_raise_for_status(response)
    except GatedRepoError:
        raise _not_found(name, "it is a gated repository that this machine is not authorised for") from None
    except RepositoryNotFoundError:
        raise _not_found(name, "the hub has no such repository (or it is private and you are not logged in)") from None
    except EntryNotFoundError:
        raise _not_found(name, "the hub repository has no model_index.json, so it is not a diffusers pipeline") from None
    except Exception as error:  # network failures surface as various httpx and OSError types
        raise _not_found(name, f"the hub could not be reached ({type(error).__name__}: {error})") from None
    return name


class FluxModel:
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
        self._ids_cache: dict[tuple, torch.Tensor] = {}
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
        source = resolve_pretrained(name_or_path)
        local = Path(source).is_dir()

        def load(cls_, subfolder: str, **kwargs):
            if local and not (Path(source) / subfolder).is_dir():
                raise ModelNotFoundError(
                    f"{source} has no {subfolder}/ folder, so the download is incomplete. Download the whole "
                    "pipeline (`hf download <id> --local-dir DIR`) and set model.pretrained=DIR."
                )
            module = cls_.from_pretrained(source, subfolder=subfolder, **kwargs)
            if isinstance(module, torch.nn.Module):
                module = module.to(device).eval().requires_grad_(False)
            return module

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

    # -------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return network_device(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        return network_dtype(self.transformer)

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
        """A FluxPipeline over the loaded components (absent ones are None), for its helper methods."""
        if self._pipeline is None:
            self._pipeline = FluxPipeline(
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
        """CLIP pooled output and T5 hidden states of ``prompt``, computed once per process.

        The same :class:`Conditioning` object is returned for a repeated prompt; treat its arrays
        as read-only.
        """
        if image is not None:
            raise ValueError("FLUX here is text-to-image: a prompt group with a conditioning image needs an image-to-video family")
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise RuntimeError("this FluxModel was loaded with load_text_encoders=False and cannot encode prompts")
        with torch.inference_mode():
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

    def sigma_grid(self, sampler: str, num_steps: int, shift: float) -> torch.Tensor:
        """The rollout's noise levels ``[T+1]`` for ``sampler`` (:func:`raygrpo.sampling.sigma_grid`)."""
        return sigma_grid(sampler, num_steps, shift)

    def _position_ids(self, text_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (text_length, self.device, self.dtype)
        if key not in self._ids_cache:
            _, h, w = self.unpacked_latent_shape
            txt_ids = torch.zeros(text_length, 3, device=self.device, dtype=self.dtype)
            img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
            self._ids_cache[key] = (txt_ids, img_ids)
        return self._ids_cache[key]

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
        device, dtype = self.device, self.dtype
        sigmas = torch.as_tensor(sigmas, device=device).reshape(-1).expand(batch)
        timestep = quantize_timestep(sigmas).to(dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
            guidance = torch.full((batch,), scale, device=device, dtype=dtype)
        txt_ids, img_ids = self._position_ids(cond.prompt_embeds.shape[1])
        prediction = self.transformer(
            hidden_states=latents.to(device, dtype),
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled_prompt_embeds.to(device, dtype),
            encoder_hidden_states=cond.prompt_embeds.to(device, dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return prediction.float()

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
            array = self.image_processor.postprocess(decoded, output_type="np")  # float in [0, 1]
            images.append((array * 255).round().astype(np.uint8))  # as numpy_to_pil, the "pil" path
        return np.concatenate(images)

    def __repr__(self) -> str:
        loaded = [name for name in ("vae", "text_encoder", "text_encoder_2") if getattr(self, name) is not None]
        return (
            f"FluxModel({self.height}x{self.width}, guidance={self.guidance_scale}, dtype={self.dtype}, "
            f"device={self.device}, loaded={['transformer', *loaded]})"
        )
