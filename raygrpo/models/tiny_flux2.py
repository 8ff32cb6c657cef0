"""Tiny, randomly initialised FLUX.2 pipelines: the klein layout (``Flux2KleinPipeline``) and the dev layout (``Flux2Pipeline``).

As :mod:`raygrpo.models.tiny`: the real diffusers/transformers classes at toy widths, built offline and
saved with ``save_pretrained``, used only through ``from_pretrained``.

- ``flux2`` (the family's ``tiny-random``): FLUX.2 [klein] base, ``Flux2KleinPipeline`` with
  ``is_distilled=False`` (classifier-free guidance), a ``Qwen3ForCausalLM`` text encoder and a Qwen2
  byte-level BPE tokenizer with a Qwen3-style chat template (``enable_thinking=False`` closes an empty
  think block, as the real template does);
- ``flux2_dev``: FLUX.2 [dev], ``Flux2Pipeline``, guidance embedded in the transformer, a
  ``Mistral3ForConditionalGeneration`` text encoder (Mistral text model + Pixtral vision tower) and a
  byte-level BPE tokenizer with Mistral's special tokens and a ``[SYSTEM_PROMPT]`` / ``[INST]`` chat
  template. The real pipeline's tokenizer is a ``PixtralProcessor``, which needs torchvision (not usable
  here); the pipeline's text-only encoding only calls its ``apply_chat_template``, which a tokenizer has too.

The text encoders are deep enough for the layers the pipelines read (klein: hidden states 9, 18 and 27
of 28 layers; dev: 10, 20 and 30 of 31), so the pipelines' own defaults apply unchanged. Both share the
transformer and VAE layout: ``Flux2Transformer2DModel`` (1 double + 1 single block, 2 heads x 16, RoPE on
4 axes of 4) over 2x2-patchified latents of an ``AutoencoderKLFlux2`` with 4 latent channels (16 per
token) and random batch-norm statistics (which the pipelines use to normalise latents).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raygrpo.models.tiny import TINY_WORDS, save_tiny_build

TINY_FLUX2_VERSIONS = {"flux2": "v1", "flux2_dev": "v1"}
TEXT_WIDTH = 16  # the encoders' hidden size; the transformer reads 3 layers side by side (joint_attention_dim 48)
KLEIN_LAYERS = 28  # Flux2KleinPipeline reads hidden_states (9, 18, 27)
DEV_LAYERS = 31  # Flux2Pipeline reads hidden_states (10, 20, 30)

# Qwen3's chat template reduced to what the klein pipeline renders (user turns, the generation prompt, and the
# empty think block that enable_thinking=False adds); no whitespace control, so the newlines are as written.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# Mistral Small 3.1's layout for system and user turns; the dev pipeline sends content as [{"type": "text", ...}].
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def _byte_level_bpe(corpus: list[str], vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE (GPT-2 / Qwen / Tekken style: every byte is a token, so nothing is unknown) trained on ``corpus``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def _corpus(extra: str = "") -> list[str]:
    words = list(TINY_WORDS) + extra.split()
    return [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]


def build_qwen3_tokenizer():
    """A ``Qwen2Tokenizer`` (the klein pipeline's ``Qwen2TokenizerFast``) over a byte-level BPE, with Qwen's chat tokens."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    model = json.loads(_byte_level_bpe(_corpus(), 1200, specials).to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=40960)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def build_mistral_tokenizer():
    """A byte-level BPE tokenizer with Mistral Small 3.1's special tokens and chat layout, trained on the word list
    and the FLUX.2 [dev] system message (which every prompt carries), so the template stays short in tokens."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(_corpus(SYSTEM_MESSAGE), 1200, _MISTRAL_SPECIALS),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=_MISTRAL_SPECIALS[4:],
        model_max_length=131072,
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def _tiny_transformer_and_vae(seed: int, guidance_embeds: bool):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 VAE latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,  # three text-encoder layers side by side
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # (T, H, W, L) position axes; sums to attention_head_dim as the real (32, 32, 32, 32) to 128
        guidance_embeds=guidance_embeds,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8),  # four blocks: the real x8 geometry
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()
    # The pipelines normalise patchified latents with the VAE's batch-norm statistics: non-trivial ones test that.
    vae.bn.running_mean.copy_(0.2 * torch.randn(16))
    vae.bn.running_var.copy_(0.5 + torch.rand(16))
    return transformer, vae


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # The pipelines shift the schedule by an empirical mu of resolution and steps (compute_empirical_mu).
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def _build_klein_pipeline(seed: int):
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_qwen3_tokenizer()
    transformer, vae = _tiny_transformer_and_vae(seed, guidance_embeds=False)  # klein has no guidance embedding
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=32,
            num_hidden_layers=KLEIN_LAYERS,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=True,  # as Qwen3-4B
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    pipeline = Flux2KleinPipeline(
        scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=False
    )
    return pipeline, {}


def _build_dev_pipeline(seed: int):
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = build_mistral_tokenizer()
    transformer, vae = _tiny_transformer_and_vae(seed, guidance_embeds=True)  # FLUX.2 [dev] is guidance-distilled
    torch.manual_seed(seed + 2)
    text = dict(
        model_type="mistral", vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=DEV_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    vision = dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  image_size=28, patch_size=14)  # fmt: skip
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,  # as Mistral Small 3.1
    )
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    pipeline = Flux2Pipeline(scheduler=_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return pipeline, {}


def build_tiny_flux2(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random FLUX.2 [klein] base pipeline (CFG, Qwen3 text encoder) into ``folder`` (kept if already built)."""
    return save_tiny_build(folder, seed, "flux2", TINY_FLUX2_VERSIONS["flux2"], _build_klein_pipeline)


def build_tiny_flux2_dev(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny random FLUX.2 [dev] pipeline (embedded guidance, Mistral3 text encoder) into ``folder``."""
    return save_tiny_build(folder, seed, "flux2_dev", TINY_FLUX2_VERSIONS["flux2_dev"], _build_dev_pipeline)


# raygrpo.models.hub registers these with the other tiny builds; "flux2_dev" is a second build of the flux2 family.
TINY_FLUX2_BUILDERS = {"flux2": build_tiny_flux2, "flux2_dev": build_tiny_flux2_dev}

__all__ = [
    "TINY_FLUX2_BUILDERS",
    "TINY_FLUX2_VERSIONS",
    "build_mistral_tokenizer",
    "build_qwen3_tokenizer",
    "build_tiny_flux2",
    "build_tiny_flux2_dev",
]
