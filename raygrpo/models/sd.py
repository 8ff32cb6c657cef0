"""Stable Diffusion 1.x / 2.x adapter: a variance-preserving UNet presented in flow coordinates.

Rollout and learner talk to :class:`StableDiffusionModel` exactly as to the flow models
(``encode_prompt``, ``initial_noise``, ``sigma_grid``, ``velocity``, ``decode``): every algorithm and
the rollout worker stay velocity-based. The change of coordinates (derivation in
:mod:`raygrpo.sampling.ddim`)::

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                   (the UNet's VP latents)
    s   = sqrt(abar_t) + sqrt(1 - abar_t),   sigma = sqrt(1 - abar_t) / s
    y   = x_t / s = (1 - sigma) x0 + sigma eps,   v = eps - x0       (what raygrpo sees)

and back ``abar = 1 / (1 + r^2)`` with ``r = sigma / (1 - sigma)``. :meth:`StableDiffusionModel.velocity`
takes ``y`` and ``sigma``, feeds the UNet ``x = s y`` at the timestep whose ``alphas_cumprod`` is that
``abar`` (exact on the DDIM grid, linearly interpolated between training timesteps for DGPO's
continuous sigmas), and converts its prediction to ``v``:

* epsilon prediction (SD 1.x, SD 2.x-base): ``eps_hat = out``;
* v-prediction (SD 2.x 768 px): ``eps_hat = sqrt(abar) out + sqrt(1 - abar) x``;
* then ``v = (eps_hat - y) / (1 - sigma)`` (from ``y = (1 - sigma) x0 + sigma eps``).

Sampling: DanceGRPO's SD recipe samples with DDIM eta = 1 (sampler ``"ddim"``,
:func:`raygrpo.sampling.ddim.ddim_transition`), an affine image of diffusers' ``DDIMScheduler.step``;
ODE samplers (DGPO's Euler = DDIM eta 0, DPM-Solver++(2M)) run unchanged in flow coordinates.
Classifier-free guidance is applied to the UNet output of one batched forward over
``[unconditional, conditional]``, as StableDiffusionPipeline does, in rollout and in training
(DanceGRPO's SD recipe: scale 5.0 against the empty prompt in both).

Sources: diffusers ``StableDiffusionPipeline`` / ``DDIMScheduler``; DDIM (arXiv 2010.02502);
DanceGRPO's ``ddim_with_logprob`` (reference doc §3).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from raygrpo.contracts import Conditioning, ConditioningBatch
from raygrpo.models.base import CFGNegative, PromptTruncation, TokenLimit, classifier_free_guidance, to_uint8_images
from raygrpo.models.hub import DEFAULT_RESOLUTION, load_component, pretrained_source
from raygrpo.sampling.ddim import alpha_bar_to_sigma, sigma_to_alpha_bar

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
ODE_GRID_SAMPLERS = ("ode", "euler", "consistency")  # DDIM's timesteps, ending at sigma = 0 (x0 exactly)
_SNAP = 1e-3  # a timestep this close to an integer is that integer (float32 sigmas of the DDIM grid)


class StableDiffusionModel(CFGNegative):
    """A Stable Diffusion 1.x / 2.x text-to-image model as rollout and learner use it (flow coordinates).

    Components (diffusers / transformers types):

    - ``unet`` (also ``transformer``, the name rollout and learner train and sync through):
      :class:`~diffusers.UNet2DConditionModel`, epsilon or v prediction;
    - ``vae``: :class:`~diffusers.AutoencoderKL` (4 latent channels), decode only;
    - ``text_encoder`` / ``tokenizer``: :class:`~transformers.CLIPTextModel` / ``CLIPTokenizer``;
    - ``scheduler``: :class:`~diffusers.DDIMScheduler` built from the checkpoint's scheduler config
      (SD 1.x ships a PNDM config; DanceGRPO and StableDiffusionPipeline swap in DDIM the same way),
      read for ``alphas_cumprod``, ``prediction_type`` and the DDIM timestep spacing.

    Latents are ``[B, 4, H/8, W/8]`` in flow coordinates ``y`` (module docstring); prompt embeddings
    are CLIP's last hidden state ``[77, D]`` (no pooled vector). ``guidance_scale`` is the CFG scale
    :meth:`velocity` applies by default; ``<= 1`` means a single conditional forward. All modules are
    in eval mode with gradients off; the learner switches on what it trains.
    """

    family = "sd"
    guidance = "cfg"
    network_component = "unet"  # the pipeline component the trained network is (checkpoints and export name it so)

    def __init__(
        self,
        unet: UNet2DConditionModel,
        *,
        scheduler: DDIMScheduler,
        vae: AutoencoderKL | None = None,
        text_encoder: CLIPTextModel | None = None,
        tokenizer: CLIPTokenizer | None = None,
        vae_scale_factor: int | None = None,
        height: int = DEFAULT_RESOLUTION,
        width: int = DEFAULT_RESOLUTION,
        guidance_scale: float = 5.0,
    ):
        config = scheduler.config
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {config.prediction_type!r} is not supported; expected one of {PREDICTION_TYPES}")
        # StableDiffusionPipeline turns sample clipping off for SD configs; DDIM in flow coordinates has no clip.
        self.scheduler = DDIMScheduler.from_config(config, clip_sample=False, thresholding=False)
        self.unet = self.transformer = unet
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        if vae_scale_factor is None:
            vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.vae_scale_factor = vae_scale_factor
        # The UNet downsamples len(blocks) - 1 times; odd latent sides would not round-trip its skips.
        multiple = vae_scale_factor * 2 ** (len(unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} for this UNet and VAE, got {height}x{width}")
        self.height, self.width = height, width
        self.guidance_scale = float(guidance_scale)
        self.prediction_type = config.prediction_type
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()  # [T_train]
        # sigma of every training timestep, increasing in t: the table velocity() inverts.
        self.train_sigmas = alpha_bar_to_sigma(self.alphas_cumprod)  # [T_train] float64
        if not bool((self.train_sigmas[1:] > self.train_sigmas[:-1]).all()):
            raise ValueError("the scheduler's alphas_cumprod must decrease with t (noise must grow) for sigma -> timestep to be defined")
        self.max_sigma = float(self.train_sigmas[-1])
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        self._start_sigma: float | None = None
        self._grids: dict[tuple[str, int], torch.Tensor] = {}  # (sampler, T) -> grid: built once, not per group
        self._tables: dict[torch.device, torch.Tensor] = {}  # train_sigmas per device, for timestep_of
        self._prompt_cache: dict[str, Conditioning] = {}
        self._truncation = PromptTruncation(logger)

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
        guidance_scale: float = 5.0,
        max_sequence_length: int | None = None,
    ) -> StableDiffusionModel:
        """Load from a hub id, a local diffusers folder, or ``"tiny-random"``, component by component.

        ``"tiny-random"`` is the cached tiny random SD of :func:`~raygrpo.models.tiny.build_tiny_sd`.
        ``height``/``width`` default to the UNet's native size (512 for SD 1.x, 768 for SD 2.x-768,
        64 for the tiny model). ``max_sequence_length`` is accepted for a uniform loader and ignored:
        CLIP's 77 tokens are fixed. Without text encoders (the learner) and with CFG, the text encoder
        is loaded once to encode the empty prompt, then dropped.
        """
        source = pretrained_source("sd", name_or_path)

        def load(cls_, subfolder: str, **kwargs):
            return load_component(source, cls_, subfolder, device, **kwargs)

        unet = load(UNet2DConditionModel, "unet", torch_dtype=torch_dtype)
        scheduler = load(DDIMScheduler, "scheduler")  # any SD scheduler config (PNDM, DDIM, ...) becomes DDIM
        text = {}
        if load_text_encoders or guidance_scale > 1.0:
            # transformers 5 names the argument ``dtype``; ``torch_dtype`` only warns.
            text = {"tokenizer": load(CLIPTokenizer, "tokenizer"), "text_encoder": load(CLIPTextModel, "text_encoder", dtype=torch_dtype)}
        if load_vae:
            vae = load(AutoencoderKL, "vae", torch_dtype=torch_dtype)
            vae_config = vae.config
        else:
            vae = None  # latent geometry still depends on the VAE: read its config, not its weights
            vae_config = AutoencoderKL.load_config(source, subfolder="vae")
        vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        native = unet.config.sample_size * vae_scale_factor
        model = cls(
            unet,
            scheduler=scheduler,
            vae=vae,
            vae_scale_factor=vae_scale_factor,
            height=height or native,
            width=width or native,
            guidance_scale=guidance_scale,
            **text,
        )
        if text and not load_text_encoders:
            model.keep_negative_only("text_encoder", "tokenizer")  # CFG's empty prompt (StableDiffusionPipeline's default negative)
        return model

    # -------------------------------------------------------------------------------- properties
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent, as StableDiffusionPipeline.prepare_latents makes it."""
        return self.unet.config.in_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    # ------------------------------------------------------------------------------ conditioning
    def encode_prompt(self, prompt: str, image: np.ndarray | None = None) -> Conditioning:
        """CLIP's last hidden state ``[77, D]``, as ``StableDiffusionPipeline.encode_prompt`` (no clip skip).

        CLIP reads 77 tokens, the rest is dropped (with one warning per model). Cached per process
        and prompt; treat the returned arrays as read-only.
        """
        if image is not None:
            raise ValueError("Stable Diffusion is text-to-image: a prompt group with a conditioning image needs an image-to-video family")
        cached = self._prompt_cache.get(prompt)
        if cached is not None:
            return cached
        if not self.text_encoders_loaded():
            raise RuntimeError("this StableDiffusionModel was loaded with load_text_encoders=False and cannot encode prompts")
        self._truncation.check(prompt, [TokenLimit("CLIP", self.tokenizer, self.tokenizer.model_max_length)])
        tokens = self.tokenizer(
            prompt, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        device = self.text_encoder.device
        # The pipeline passes the attention mask only to encoders configured for it (not SD's CLIP).
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        with torch.inference_mode():
            embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]  # [1, 77, D]
        conditioning = Conditioning(prompt_embeds=embeds[0].float().cpu().numpy())
        self._prompt_cache[prompt] = conditioning
        return conditioning

    def text_encoders_loaded(self) -> bool:
        return self.text_encoder is not None and self.tokenizer is not None

    # ----------------------------------------------------------------------------------- latents
    def sigma_grid(self, sampler: str, num_steps: int, shift: float) -> torch.Tensor:
        """The rollout's noise levels ``[T+1]`` (float32, flow sigmas), decreasing.

        * ``"ddim"``: ``DDIMScheduler.set_timesteps(T)``'s timesteps (the checkpoint's spacing, SD's
          ``leading`` with ``steps_offset``), then the final step's ``abar_prev = final_alpha_cumprod``;
          with that grid :func:`~raygrpo.sampling.ddim.ddim_transition` is diffusers' ``step``.
        * ``"euler"`` / ``"ode"``: the same timesteps ending at sigma = 0, so the last step lands on x0.
        * ``"dpmpp_2m"``: ``DPMSolverMultistepScheduler.from_config(scheduler.config)``'s sigmas
          (``r = sqrt((1 - abar) / abar)``, final 0) mapped to ``r / (1 + r)``: diffusers' DPM-Solver++
          grid for this model (DPM-Solver++ is the same update in VP and in flow coordinates).

        ``shift`` is ignored: a VP model's schedule is fixed by its betas. The first sigma is kept as
        the start that :meth:`initial_noise` scales for.
        """
        cached = self._grids.get((sampler, num_steps))
        if cached is not None:
            self._start_sigma = float(cached[0])
            return cached.clone()
        if sampler == "dpmpp_2m":
            solver = DPMSolverMultistepScheduler.from_config(self.scheduler.config)
            solver.set_timesteps(num_steps)
            r = solver.sigmas.double()  # [T+1], last 0
            grid = r / (1 + r)
        elif sampler == "ddim" or sampler in ODE_GRID_SAMPLERS:
            scheduler = DDIMScheduler.from_config(self.scheduler.config)
            scheduler.set_timesteps(num_steps)
            timesteps = scheduler.timesteps.long()  # [T]
            if len(timesteps) > 1 and not bool((timesteps[1:] < timesteps[:-1]).all()):
                raise ValueError(f"{num_steps} DDIM steps give repeated timesteps {timesteps.tolist()}; use fewer steps")
            final = torch.tensor([float(scheduler.final_alpha_cumprod)], dtype=torch.float64)
            alpha_bars = torch.cat([self.alphas_cumprod[timesteps], final])  # [T+1]
            grid = alpha_bar_to_sigma(alpha_bars)
            if sampler != "ddim":
                grid[-1] = 0.0
        else:
            raise ValueError(
                f"sampler {sampler!r} does not apply to Stable Diffusion (a VP diffusion model); use 'ddim' (DanceGRPO) "
                f"or one of {(*ODE_GRID_SAMPLERS, 'dpmpp_2m')} (DGPO)"
            )
        grid = grid.float()
        self._grids[(sampler, num_steps)] = grid
        self._start_sigma = float(grid[0])
        return grid.clone()

    def initial_noise(self, generator: torch.Generator | None, num: int, sigma: float | None = None) -> torch.Tensor:
        """``[num, 4, h, w]`` float32: the pipeline's ``x_T ~ N(0, I)`` in flow coordinates, ``x_T / s(sigma_0)``.

        ``sigma`` is the grid's first sigma; None takes the first sigma of the last :meth:`sigma_grid`
        (call it first), else the largest training sigma with a warning. With the same generator
        state ``x_T`` is the noise ``StableDiffusionPipeline(..., generator=...)`` starts from.
        """
        if sigma is None:
            sigma = self._start_sigma
        if sigma is None:
            logger.warning("initial_noise before sigma_grid: scaling for the largest training sigma %.4f", self.max_sigma)
            sigma = self.max_sigma
        noise = randn_tensor((num, *self.latent_shape), generator=generator, device=self.device, dtype=torch.float32)
        noise = noise * self.scheduler.init_noise_sigma  # 1.0 for DDIM, as prepare_latents
        alpha_bar = sigma_to_alpha_bar(torch.tensor(float(sigma), dtype=torch.float64))
        return noise / float(alpha_bar.sqrt() + (1 - alpha_bar).sqrt())

    def timestep_of(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The (fractional) training timestep whose noise level is ``sigma``, float64 ``[B]``.

        Linear interpolation in sigma between neighbouring training timesteps, clamped to
        ``[0, T_train - 1]``; values within 1e-3 of an integer snap to it, so float32 sigmas of the
        DDIM grid give exactly the scheduler's integer timesteps.
        """
        table = self._tables.get(sigmas.device)
        if table is None:
            table = self._tables[sigmas.device] = self.train_sigmas.to(sigmas.device)  # [T_train], increasing
        sigmas = sigmas.double()
        upper = torch.searchsorted(table, sigmas).clamp(1, len(table) - 1)  # [B]
        lo, hi = table[upper - 1], table[upper]
        t = (upper - 1) + (sigmas - lo) / (hi - lo)
        t = t.clamp(0, len(table) - 1)
        nearest = t.round()
        return torch.where((t - nearest).abs() < _SNAP, nearest, t)

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        cond: ConditioningBatch,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """The (guided) flow velocity ``v = eps_hat - x0_hat`` at flow coordinates ``latents``, float32 ``[B, 4, h, w]``.

        ``latents [B, 4, h, w]`` are ``y``, ``sigmas [B]`` (or a scalar) their flow sigmas, ``cond``
        with ``prompt_embeds [B, 77, D]``. Above the largest training sigma (t = T_train - 1) the UNet
        is evaluated there and the conversion uses that sigma too, keeping ``1 / (1 - sigma)`` finite.
        ``guidance_scale`` None means ``self.guidance_scale``; above 1 one forward of batch 2B over
        ``[empty prompt, prompt]`` gives ``out_u + s (out_c - out_u)`` (the pipeline's CFG on the UNet
        output; the conversion to v is affine in it, so this is CFG on v as well). Gradients flow
        when the caller enables them.
        """
        batch = latents.shape[0]
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents have shape {tuple(latents.shape[1:])} per sample; {self.height}x{self.width} images have {self.latent_shape}"
            )
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        device, dtype = self.device, self.dtype
        # 1. Noise levels: sigma -> abar -> (s, timestep), in float64; applied in float32.
        sigma = torch.as_tensor(sigmas, device=device).double().reshape(-1).expand(batch).clamp(max=self.max_sigma)  # [B]
        alpha_bar = sigma_to_alpha_bar(sigma)  # [B]
        column = (batch, *([1] * (latents.ndim - 1)))
        scale_x = (alpha_bar.sqrt() + (1 - alpha_bar).sqrt()).reshape(column)  # [B, 1, 1, 1], x = s y
        timestep = self.timestep_of(sigma).float()  # [B]
        y = latents.to(device, torch.float32)  # [B, 4, h, w]
        x = (y * scale_x.float()).to(dtype)  # [B, 4, h, w] the UNet's VP latents
        embeds = cond.prompt_embeds.to(device, dtype)  # [B, 77, D]
        # 2. One forward; with CFG the unconditional half first, as the pipeline concatenates.
        guided = scale > 1.0
        if guided:
            negative = torch.as_tensor(self.negative_conditioning.prompt_embeds, device=device, dtype=dtype)[None]  # [1, 77, D]
            if negative.shape[1:] != embeds.shape[1:]:
                raise ValueError(
                    f"prompt_embeds are {tuple(embeds.shape[1:])} per sample but the empty prompt's are {tuple(negative.shape[1:])}"
                )
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])  # [2B, ...]
            embeds = torch.cat([negative.expand(batch, -1, -1), embeds])  # [2B, 77, D]
        out = self.unet(x, timestep, encoder_hidden_states=embeds, return_dict=False)[0].float()  # [(2)B, 4, h, w]
        if guided:
            out = classifier_free_guidance(out, scale)  # [B, 4, h, w]
        # 3. UNet output -> eps_hat -> flow velocity.
        if self.prediction_type == "v_prediction":
            eps = alpha_bar.sqrt().reshape(column).float() * out + (1 - alpha_bar).sqrt().reshape(column).float() * (y * scale_x.float())
        else:
            eps = out
        return (eps - y) / (1 - sigma).reshape(column).float()  # [B, 4, h, w]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Clean latents ``x0 [B, 4, h, w]`` (y = x at sigma 0) to uint8 images ``[B, H, W, 3]``, as the pipeline's output path."""
        if self.vae is None:
            raise RuntimeError("this StableDiffusionModel was loaded with load_vae=False and cannot decode")
        images = []
        for chunk in torch.as_tensor(latents).split(batch_size or len(latents)):
            chunk = chunk / self.vae.config.scaling_factor
            decoded = self.vae.decode(chunk.to(self.vae.device, self.vae.dtype), return_dict=False)[0]
            images.append(to_uint8_images(decoded, self.image_processor))
        return np.concatenate(images)

    def __repr__(self) -> str:
        loaded = [n for n in ("vae", "text_encoder") if getattr(self, n) is not None]
        return (
            f"StableDiffusionModel({self.height}x{self.width}, {self.prediction_type}, cfg={self.guidance_scale}, "
            f"dtype={self.dtype}, device={self.device}, loaded={['unet', *loaded]})"
        )
