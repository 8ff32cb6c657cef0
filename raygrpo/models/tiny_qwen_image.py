"""Tiny, randomly initialised Qwen-Image and Qwen-Image-Edit pipelines of the real architectures.

As :mod:`raygrpo.models.tiny`: built offline from the classes of the real checkpoints
(``QwenImagePipeline`` / ``QwenImageEditPipeline`` over ``QwenImageTransformer2DModel``,
``AutoencoderKLQwenImage``, ``Qwen2_5_VLForConditionalGeneration`` and a ``Qwen2Tokenizer``), saved
with ``save_pretrained`` and used only through ``from_pretrained``.

The tokenizer is a byte-level BPE (as Qwen2's) trained with the ``tokenizers`` library on the shared
word list, with Qwen's chat and vision special tokens. The pipelines drop the chat template's system
prefix from the encoder's output by a fixed count (``prompt_template_encode_start_idx``: 34 for
Qwen-Image, 64 for Qwen-Image-Edit), counted in the real tokenizer's tokens; this tokenizer splits the
template differently, so its own count is measured at build time and recorded in
``raygrpo_tiny.json`` (``prompt_template_encode_start_idx``), which the adapter reads (as the tiny
HunyuanVideo records its ``crop_start``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from raygrpo.models.tiny import TINY_WORDS, save_tiny_build

TINY_QWEN_IMAGE_VERSIONS = {"qwen_image": "v1", "qwen_image_edit": "v1"}
TINY_QWEN_RESOLUTION = 64  # px; 8x8 latents through the 8x VAE, 4x4 = 16 packed tokens

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen-Image's scheduler/scheduler_config.json (Qwen/Qwen-Image): exponential time shift with mu from the image's token count.
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


def build_qwen_tokenizer(vocab_size: int = 1200):
    """A byte-level BPE ``Qwen2Tokenizer`` with Qwen's special tokens: pads with ``<|endoftext|>`` on the right, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte is a token: nothing is ever unknown
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS, initial_alphabet=alphabet, show_progress=False)
    corpus = [" " + word for word in (*TINY_WORDS, *" ".join(_templates()).split())]  # words after a space, as in running text
    tokenizer.train_from_iterator(corpus, trainer)
    qwen = Qwen2Tokenizer(
        vocab=tokenizer.get_vocab(), merges=_merges(tokenizer), eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )  # the class the pipelines name
    qwen.add_special_tokens({"additional_special_tokens": _SPECIALS[1:]})  # already in the vocabulary: their ids stay
    return qwen


def _templates() -> tuple[str, str]:
    """The chat templates of QwenImagePipeline and QwenImageEditPipeline (set in their ``__init__``), learned as words
    so that the system prompt costs a few tokens per prompt rather than one per byte."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline

    return QwenImagePipeline(*[None] * 5).prompt_template_encode, QwenImageEditPipeline(*[None] * 6).prompt_template_encode


def _merges(tokenizer) -> list[tuple[str, str]]:
    import json

    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(tokenizer.to_str())["model"]["merges"]]


def template_start_idx(tokenizer, template: str) -> int:
    """Tokens of ``template`` before the user's turn: what the pipeline's ``prompt_template_encode_start_idx`` drops.

    The real counts (34, 64) end after ``<|im_start|>user\\n``: the system prompt goes, the user's text (and for
    editing, the image's vision tokens) stays.
    """
    prefix = template.split("<|im_start|>user\n")[0] + "<|im_start|>user\n"
    return len(tokenizer(prefix)["input_ids"])


def _text_encoder(tokenizer, seed: int):
    """A 2-layer Qwen2.5-VL of width 32 with a 2-block vision tower (14 px patches, 2x2 merge, as the real 7B)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in _SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            # Multimodal RoPE: temporal/height/width sections of the 8 rotary pairs of a 16-dim head (real: 16/24/24 of 64).
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,  # windowed attention over 2x2 merged groups; the last block attends fully, as the real 7, 15, 23, 31
            fullatt_block_indexes=[1],
            out_hidden_size=32,  # projected to the text width
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _components(seed: int) -> dict:
    """Every component of both tiny pipelines but the editing processor."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = build_qwen_tokenizer()
    z_dim, text_width = 4, 32
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,  # packed 2x2 latent patches (real: 64 = 4 x 16)
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_width,
        axes_dims_rope=(4, 6, 6),  # frame, height, width: sums to the head dim, as the real (16, 56, 56) to 128
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three downsamplings: the real x8 spatial geometry
        latents_mean=[0.1, -0.2, 0.3, 0.0],  # per-channel statistics the pipeline normalises with (real: 16 values)
        latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()
    return {
        "tokenizer": tokenizer,
        "text_encoder": _text_encoder(tokenizer, seed + 2),
        "vae": vae,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
    }


def _build_qwen_image_pipeline(seed: int):
    from diffusers import QwenImagePipeline

    pipeline = QwenImagePipeline(**_components(seed))
    return pipeline, {"prompt_template_encode_start_idx": template_start_idx(pipeline.tokenizer, pipeline.prompt_template_encode)}


def _build_qwen_image_edit_pipeline(seed: int):
    from diffusers import QwenImageEditPipeline
    from transformers import Qwen2VLImageProcessorPil

    from raygrpo.models.qwen_processor import QwenImageTextProcessor

    parts = _components(seed)
    # Qwen2-VL's preprocessor settings (14 px patches, 2x2 merge) but for max_pixels: from 56 x 56 px (the real minimum) to 112 x 112.
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)
    pipeline = QwenImageEditPipeline(processor=QwenImageTextProcessor(images, parts["tokenizer"]), **parts)
    # The folder's model_index names the class the real checkpoint saves (this one is that class minus its video half).
    pipeline.register_to_config(processor=("transformers", "Qwen2VLProcessor"))
    return pipeline, {"prompt_template_encode_start_idx": template_start_idx(pipeline.tokenizer, pipeline.prompt_template_encode)}


def build_tiny_qwen_image(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Qwen-Image text-to-image pipeline into ``folder`` (kept if already built).

    Sizes: transformer of 2 dual-stream blocks, 2 heads x 16 dims, RoPE axes (4, 6, 6), 4 latent channels
    packed 2x2 (16 per token), text width 32; Qwen-Image VAE (Wan-2.1-style, causal 3-D) with base width 8 (x8
    spatial) and per-channel latent statistics; Qwen2.5-VL text encoder of width 32, 2 layers, with a 2-block
    vision tower; Qwen-Image's dynamic-shift scheduler config. Deterministic given ``seed``.
    """
    return save_tiny_build(folder, seed, "qwen_image", TINY_QWEN_IMAGE_VERSIONS["qwen_image"], _build_qwen_image_pipeline)


def build_tiny_qwen_image_edit(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random Qwen-Image-Edit pipeline into ``folder`` (kept if already built).

    The components of :func:`build_tiny_qwen_image` (the same seeds, so the same weights) plus the editing
    processor: Qwen2-VL's image processor (14 px patches, 2x2 merge, 56-112 px images) and the tokenizer.
    """
    return save_tiny_build(folder, seed, "qwen_image_edit", TINY_QWEN_IMAGE_VERSIONS["qwen_image_edit"], _build_qwen_image_edit_pipeline)


# raygrpo.models.hub caches them with the other tiny builds.
TINY_QWEN_IMAGE_BUILDERS = {"qwen_image": build_tiny_qwen_image, "qwen_image_edit": build_tiny_qwen_image_edit}

__all__ = [
    "QWEN_IMAGE_SCHEDULER",
    "TINY_QWEN_IMAGE_BUILDERS",
    "TINY_QWEN_IMAGE_VERSIONS",
    "TINY_QWEN_RESOLUTION",
    "build_qwen_tokenizer",
    "build_tiny_qwen_image",
    "build_tiny_qwen_image_edit",
    "template_start_idx",
]
