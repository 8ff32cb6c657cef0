"""Tiny, randomly initialised video pipelines of the real HunyuanVideo, Wan 2.1 and SkyReels-V2 image-to-video architectures.

As :mod:`raygrpo.models.tiny`: built offline from the same diffusers/transformers classes as the
real checkpoints (``HunyuanVideoPipeline``, ``WanImageToVideoPipeline``, ``SkyReelsV2ImageToVideoPipeline``), saved with
``save_pretrained`` and used only through ``from_pretrained``. Sizes are chosen so that a whole
rollout of a group runs in well under a second on one CPU core: 5 frames (2 latent frames, the
VAEs' real 4x temporal compression) at 32x32 px (the real 8x spatial compression, 4x4 latents).

The one tokenizer ``tiny.py`` does not have is HunyuanVideo's Llama tokenizer: a byte-fallback BPE
trained here with the ``tokenizers`` library on the same word list, plus HunyuanVideo's chat-template
special tokens. The real template's ``crop_start`` (95) counts *Llama-3* tokens; this tokenizer
splits the template differently, so its own count is measured at build time and recorded in
``raygrpo_tiny.json`` (``prompt_template``), which :class:`~raygrpo.models.hunyuan_video.HunyuanVideoModel`
reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raygrpo.models.tiny import TINY_WORDS, build_clip_tokenizer, build_t5_tokenizer, save_tiny_build, tiny_clip_config, tiny_t5_config

TINY_VIDEO_VERSIONS = {"hunyuan_video": "v1", "wan_i2v": "v1", "skyreels_v2_i2v": "v1"}
TINY_NUM_FRAMES = 5  # 4k+1 frames; 5 -> 2 latent frames through the 4x temporal compression
TINY_VIDEO_RESOLUTION = 32  # px; 4x4 latents through the 8x spatial compression

_LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def hunyuan_prompt_template() -> str:
    """The diffusers HunyuanVideoPipeline's default chat template (the text; its crop_start is Llama-3's)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"]


def build_llama_tokenizer(vocab_size: int = 1200):
    """A byte-fallback BPE in a ``PreTrainedTokenizerFast`` with Llama-3's special tokens, right padding.

    Right padding as HunyuanVideo's tokenizer: the pipeline crops the template prefix off the
    *front* of the padded sequence, which is only right when padding is at the end.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bytes_ = [f"<0x{i:02X}>" for i in range(256)]  # byte fallback: no character is ever unknown
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = list(TINY_WORDS) + hunyuan_prompt_template().replace("{}", " ").split()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", *_LLAMA_SPECIALS, *bytes_], show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token="<unk>",
        additional_special_tokens=_LLAMA_SPECIALS[2:],
        padding_side="right",
        model_max_length=1024,
    )


def template_crop_start(tokenizer, template: str) -> int:
    """Tokens of ``template`` before the prompt: the common prefix of two differently filled templates."""
    a = tokenizer(template.format("red cat"))["input_ids"]
    b = tokenizer(template.format("blue dog"))["input_ids"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _build_hunyuan_pipeline(seed: int):
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer = build_llama_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    text_width, clip_width = 32, 16  # different, so swapped encoders fail loudly

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,  # one dual-stream block
        num_single_layers=1,
        num_refiner_layers=1,  # the token refiner in front of the text stream
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,  # HunyuanVideo is guidance-distilled
        text_embed_dim=text_width,
        pooled_projection_dim=clip_width,
        rope_axes_dim=(2, 2, 4),  # sums to attention_head_dim, as the real (16, 56, 56) to 128
    ).eval()

    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),  # four blocks: the real x8 spatial, x4 temporal geometry
        layers_per_block=1,
        norm_num_groups=4,
        mid_block_add_attention=True,
    ).eval()

    torch.manual_seed(seed + 2)
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=48,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-3]: keep it a transformer layer's output
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()

    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModel(tiny_clip_config(tokenizer_2, clip_width, projection_dim=clip_width)).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)  # HunyuanVideo's own
    pipeline = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    template = hunyuan_prompt_template()
    return pipeline, {"prompt_template": {"template": template, "crop_start": template_crop_start(tokenizer, template)}}


def _wan_i2v_components(seed: int, transformer_cls: type, image_encoder_cls: type) -> dict:
    """Every component of a tiny Wan 2.1-architecture image-to-video pipeline but its scheduler."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPImageProcessor, CLIPVisionConfig, UMT5Config, UMT5EncoderModel

    tokenizer = build_t5_tokenizer()
    z_dim, text_width, image_width = 8, 32, 16

    torch.manual_seed(seed)
    transformer = transformer_cls(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=z_dim + 4 + z_dim,  # noisy latents + 4 first-frame mask channels + image latents (Wan 2.1 i2v: 16+4+16)
        out_channels=z_dim,
        text_dim=text_width,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_width,  # the i2v variant: CLIP image states enter through their own cross-attention
        added_kv_proj_dim=2 * 8,  # heads x head dim, as the real 5120 = 40 x 128
        rope_max_seq_len=32,
    ).eval()

    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # the real x4 temporal, x8 spatial geometry
        latents_mean=[0.1 * (i - z_dim / 2) for i in range(z_dim)],
        latents_std=[1.0 + 0.25 * i for i in range(z_dim)],
    ).eval()

    torch.manual_seed(seed + 2)
    text_encoder = UMT5EncoderModel(tiny_t5_config(UMT5Config, tokenizer, text_width)).eval()

    torch.manual_seed(seed + 3)
    image_encoder = image_encoder_cls(
        CLIPVisionConfig(
            hidden_size=image_width,
            intermediate_size=37,
            projection_dim=image_width,
            num_hidden_layers=3,  # the pipeline reads hidden_states[-2]
            num_attention_heads=2,
            image_size=32,
            patch_size=8,  # 16 patches + the class token
        )
    ).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],  # CLIP's statistics
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )

    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "image_processor": image_processor,
        "image_encoder": image_encoder,
        "transformer": transformer,
    }


def _build_wan_i2v_pipeline(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPVisionModel

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # Wan 2.1 480p's shift
    return WanImageToVideoPipeline(scheduler=scheduler, **_wan_i2v_components(seed, WanTransformer3DModel, CLIPVisionModel)), {}


def _build_skyreels_v2_i2v_pipeline(seed: int):
    """SkyReels-V2-I2V's layout: its transformer class, the CLIP vision encoder with projection behind a
    CLIPProcessor, a UniPC flow scheduler (shift 5, its I2V setting); the rest as the tiny Wan."""
    from diffusers import SkyReelsV2ImageToVideoPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler
    from transformers import CLIPProcessor, CLIPVisionModelWithProjection

    parts = _wan_i2v_components(seed, SkyReelsV2Transformer3DModel, CLIPVisionModelWithProjection)
    parts["image_processor"] = CLIPProcessor(image_processor=parts["image_processor"], tokenizer=build_clip_tokenizer())
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    return SkyReelsV2ImageToVideoPipeline(scheduler=scheduler, **parts), {}


def build_tiny_hunyuan_video(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random HunyuanVideo text-to-video pipeline into ``folder`` (kept if already built).

    Sizes: transformer of 1 dual-stream + 1 single-stream block and 1 token-refiner block, 2 heads
    x 8 dims, RoPE axes (2, 2, 4), guidance embedding, 4 latent channels, patch 1x2x2; causal 3-D
    VAE with 4 blocks of 8 channels (x8 spatial, x4 temporal); Llama encoder of width 32 (3
    layers, the pipeline reads the third-last hidden state) and CLIP text encoder of width 16.
    Deterministic given ``seed``.
    """
    return save_tiny_build(folder, seed, "hunyuan_video", TINY_VIDEO_VERSIONS["hunyuan_video"], _build_hunyuan_pipeline)


def build_tiny_wan_i2v(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Wan 2.1 image-to-video pipeline into ``folder`` (kept if already built).

    Sizes: transformer of 2 blocks, 2 heads x 8 dims, 8 latent channels, input 8 + 4 + 8 channels
    (noise, first-frame mask, image latents), image cross-attention of width 16; Wan VAE with base
    width 8 (x8 spatial, x4 temporal) and per-channel latent statistics; UMT5 encoder of width 32;
    CLIP vision encoder of width 16 on 32 px images with 8 px patches. Deterministic given ``seed``.
    """
    return save_tiny_build(folder, seed, "wan_i2v", TINY_VIDEO_VERSIONS["wan_i2v"], _build_wan_i2v_pipeline)


def build_tiny_skyreels_v2_i2v(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random SkyReels-V2 image-to-video pipeline into ``folder`` (kept if already built).

    The sizes of :func:`build_tiny_wan_i2v` in SkyReels-V2-I2V's classes (``SkyReelsV2Transformer3DModel``,
    ``CLIPVisionModelWithProjection``, ``CLIPProcessor``, ``UniPCMultistepScheduler``); model.family
    wan_i2v loads it (``model.pretrained`` = the folder). Deterministic given ``seed``.
    """
    return save_tiny_build(folder, seed, "skyreels_v2_i2v", TINY_VIDEO_VERSIONS["skyreels_v2_i2v"], _build_skyreels_v2_i2v_pipeline)


# Keyed by tiny build ("skyreels_v2_i2v" is a build of the wan_i2v family); raygrpo.models.hub caches them.
TINY_VIDEO_BUILDERS = {
    "hunyuan_video": build_tiny_hunyuan_video,
    "wan_i2v": build_tiny_wan_i2v,
    "skyreels_v2_i2v": build_tiny_skyreels_v2_i2v,
}

__all__ = [
    "TINY_NUM_FRAMES",
    "TINY_VIDEO_BUILDERS",
    "TINY_VIDEO_RESOLUTION",
    "TINY_VIDEO_VERSIONS",
    "build_llama_tokenizer",
    "build_tiny_skyreels_v2_i2v",
    "build_tiny_hunyuan_video",
    "build_tiny_wan_i2v",
    "hunyuan_prompt_template",
    "template_crop_start",
]
