"""Tiny, randomly initialised reward models with the real architectures, for tests and smoke runs.

Each builder writes into a folder exactly what the real reward loads, in the same format: a
transformers ``CLIPModel`` with its tokenizer and image processor written by ``save_pretrained``
(as on the hub), a ``.pth`` aesthetic head with the published key layout, an open_clip-layout
``.pt`` checkpoint like ``HPS_v2.1_compressed.pt``. So the rewards are tested through their real
loading code, pointed at the folder instead of a hub id. Nothing is downloaded: the tokenizers come
from :func:`raygrpo.models.tiny.build_clip_tokenizer`.

Sizes are toy (width 32, 2 layers, 32 px images), except where the real reward fixes a width: the
aesthetic head takes 768-d embeddings, so the tiny CLIP built for it projects to 768.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from raygrpo.models.tiny import TINY_WORDS, build_clip_tokenizer
from raygrpo.reward.models.clip import clip_processor_class

IMAGE_SIZE = 32  # the tiny CLIPs' input resolution; any image size is resized to it
# Fewer BPE merges than the pipelines' tokenizers: learning them is quick and every word of the
# built-in list that tests use still comes out as one piece.
_NUM_MERGES = 400
_CONTEXT = 77  # CLIP's context length; the rewards cut prompts to it


def _tokenizer():
    return build_clip_tokenizer(_NUM_MERGES)


def _image_processor(size: int = IMAGE_SIZE):
    """CLIP's preprocessing (shortest side -> ``size`` bicubic, centre crop, OpenAI mean/std) at ``size``."""
    return clip_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def save_tiny_clip_processor(folder: str | Path, size: int = IMAGE_SIZE) -> Path:
    """Write a tokenizer and image processor into ``folder`` as a hub CLIP repository holds them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _tokenizer().save_pretrained(folder)
    _image_processor(size).save_pretrained(folder)  # preprocessor_config.json, as in openai/clip-vit-*
    return folder


def build_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 24) -> Path:
    """A tiny random transformers ``CLIPModel`` with tokenizer and image processor, saved into ``folder``.

    Text: width 32, 2 layers, 2 heads, 77 positions; vision: width 48, 2 layers, 2 heads, 8 px
    patches on 32 px images (4 x 4 patches). The widths and ``projection_dim`` (default 24) all
    differ, so a transposed or swapped projection fails loudly. Deterministic given ``seed``; the
    caller's RNG stream is left alone.
    """
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    tokenizer = _tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": _CONTEXT,
            "projection_dim": projection_dim,
            # The pooled text output is read at the end-of-text token, found through eos_token_id.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 53,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "projection_dim": projection_dim,
        },
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    save_tiny_clip_processor(folder)
    return folder


def build_tiny_aesthetic(folder: str | Path, seed: int = 0) -> Path:
    """A tiny CLIP (projecting to 768, the width the LAION head takes) and a random aesthetic head.

    Writes ``folder/clip`` (see :func:`build_tiny_clip`) and ``folder/aesthetic.pth``, a plain
    ``torch.save`` of the :class:`~raygrpo.reward.models.AestheticHead` state dict with keys
    ``layers.{0,2,4,6,7}.{weight,bias}``, the format of sac+logos+ava1-l14-linearMSE.pth.
    Returns ``folder``.
    """
    from raygrpo.reward.models import AestheticHead

    folder = Path(folder)
    build_tiny_clip(folder / "clip", seed=seed, projection_dim=768)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        head = AestheticHead(768)
    torch.save(head.state_dict(), folder / "aesthetic.pth")
    return folder


def tiny_openclip_config() -> dict[str, Any]:
    """open_clip model config of the tiny HPS model: ViT-H-14's layout at toy widths.

    As ViT-H-14 it uses GELU and no options beyond the plain ViT + text transformer. Widths
    differ between towers and from ``embed_dim`` so that transposes and swaps fail loudly.
    """
    return {
        "embed_dim": 24,
        "quick_gelu": False,
        "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 48, "head_width": 24, "patch_size": 8},
        "text_cfg": {"context_length": _CONTEXT, "vocab_size": len(_tokenizer()), "width": 32, "heads": 2, "layers": 2},
    }


def tiny_openclip_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in open_clip's ``CLIP`` layout (keys and shapes of ``model.state_dict()``).

    Built directly rather than through open_clip, which cannot be imported here (it needs
    torchvision). Scales keep activations of order one through LayerNorm'd residual blocks:
    linear weights ~ N(0, 1/fan_in), LayerNorm gains near 1.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def layer_norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1.0 + normal(width, std=0.1), f"{prefix}.bias": normal(width, std=0.1)}

    def tower(prefix: str, width: int, layers: int, mlp_ratio: float = 4.0) -> dict[str, torch.Tensor]:
        hidden, out = int(width * mlp_ratio), {}
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            out |= layer_norm(f"{p}.ln_1", width)
            out[f"{p}.attn.in_proj_weight"] = normal(3 * width, width, std=width**-0.5)
            out[f"{p}.attn.in_proj_bias"] = normal(3 * width, std=0.1)
            out[f"{p}.attn.out_proj.weight"] = normal(width, width, std=width**-0.5)
            out[f"{p}.attn.out_proj.bias"] = normal(width, std=0.1)
            out |= layer_norm(f"{p}.ln_2", width)
            out[f"{p}.mlp.c_fc.weight"] = normal(hidden, width, std=width**-0.5)
            out[f"{p}.mlp.c_fc.bias"] = normal(hidden, std=0.1)
            out[f"{p}.mlp.c_proj.weight"] = normal(width, hidden, std=hidden**-0.5)
            out[f"{p}.mlp.c_proj.bias"] = normal(width, std=0.1)
        return out

    vision, text, dim = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, patch = vision["width"], text["width"], vision["patch_size"]
    grid = vision["image_size"] // patch
    state = {
        "positional_embedding": normal(text["context_length"], tw, std=0.1),
        "text_projection": normal(tw, dim, std=tw**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "visual.class_embedding": normal(vw, std=0.5),
        "visual.positional_embedding": normal(grid * grid + 1, vw, std=0.1),
        "visual.proj": normal(vw, dim, std=vw**-0.5),
        "visual.conv1.weight": normal(vw, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "token_embedding.weight": normal(text["vocab_size"], tw, std=0.5),
    }
    state |= layer_norm("visual.ln_pre", vw) | layer_norm("visual.ln_post", vw) | layer_norm("ln_final", tw)
    state |= tower("visual.transformer", vw, vision["layers"]) | tower("transformer", tw, text["layers"])
    return state


def build_tiny_hps(folder: str | Path, seed: int = 0) -> Path:
    """A tiny HPS-v2.1-like checkpoint: open_clip ``CLIP`` weights as ``HPS_v2.1_compressed.pt`` holds them.

    Writes ``folder/HPS_v2.1_compressed.pt`` (``torch.save({"state_dict": ...})`` in float16 - the
    layout HPSv2's ``img_score.py`` loads, stored at the half precision the "compressed" name
    suggests), ``folder/open_clip_config.json`` (``{"model_cfg": ...}`` as open_clip hub repos hold
    it) and the tokenizer and image processor in ``folder/processor``. Returns ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_openclip_config()
    state = {k: v.half() for k, v in tiny_openclip_state_dict(cfg, seed).items()}
    torch.save({"state_dict": state}, folder / "HPS_v2.1_compressed.pt")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}, indent=2))
    save_tiny_clip_processor(folder / "processor")
    return folder


def build_bert_tokenizer():
    """An uncased WordPiece ``BertTokenizer`` over the built-in word list (+ single characters as
    word starts and ``##`` continuations, so any ASCII word tokenises without ``[UNK]``)."""
    import string

    from transformers import BertTokenizer

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(dict.fromkeys(TINY_WORDS))
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces += list(chars) + ["##" + c for c in chars]
    return BertTokenizer(vocab={p: i for i, p in enumerate(dict.fromkeys(pieces))})


# BLIP ViT (timm) key -> transformers BlipVisionModel key; the tiny builder writes the checkpoint in
# ImageReward's layout, so it renames the other way.
_BLIP_VIT_NAMES = [
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding.", "patch_embed.proj."),
    ("post_layernorm.", "norm."),
    ("encoder.layers.", "blocks."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".self_attn.qkv.", ".attn.qkv."),
    (".self_attn.projection.", ".attn.proj."),
]


def tiny_imagereward_architecture(vocab_size: int) -> dict[str, Any]:
    """ImageReward's layout (BLIP ViT + BERT with cross-attention) at toy widths, as BlipVision/TextConfig kwargs."""
    return {
        "vision_config": {
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
        },
        "text_config": {
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 40,  # >= the 35 tokens ImageReward reads
            "encoder_hidden_size": 48,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "bos_token_id": None,
            "eos_token_id": None,
            "sep_token_id": 3,
        },
    }


def build_tiny_imagereward(folder: str | Path, seed: int = 0) -> Path:
    """A tiny ImageReward: ``folder/ImageReward.pt``, ``folder/architecture.json``, ``folder/tokenizer``.

    The checkpoint holds the ``state_dict()`` of ImageReward's ``ImageReward`` module: keys
    ``blip.visual_encoder.*`` (BLIP's timm-style ViT), ``blip.text_encoder.*`` (BLIP's BERT, with its
    ``embeddings.position_ids`` buffer), the unused ``blip.vision_proj`` / ``blip.text_proj`` and
    ``mlp.layers.*``. Weights are drawn by transformers' own BLIP initialisation (plus noise on the
    LayerNorms and biases, which it sets to constants) and renamed to that layout. The tokenizer is
    :func:`build_bert_tokenizer`; the text vocabulary has 2 extra rows for the [DEC] and [ENC] tokens
    the reward adds, as bert-base-uncased's 30522 + 2 = 30524. Returns ``folder``.
    """
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from raygrpo.reward.models import AestheticHead

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_bert_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    arch = tiny_imagereward_architecture(len(tokenizer) + 2)
    (folder / "architecture.json").write_text(json.dumps(arch, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = BlipVisionModel(BlipVisionConfig(**arch["vision_config"]))
        text = BlipTextModel(BlipTextConfig(**arch["text_config"]), add_pooling_layer=False)
        head = AestheticHead(arch["text_config"]["hidden_size"])
        with torch.no_grad():
            for name, param in [*vision.named_parameters(), *text.named_parameters(), *head.named_parameters()]:
                if "norm" in name.lower() or name.endswith("bias") or "embedding" in name:
                    param.add_(torch.randn_like(param) * 0.1)
        width, text_width = arch["vision_config"]["hidden_size"], arch["text_config"]["hidden_size"]
        state = {}
        for key, tensor in vision.state_dict().items():
            for hf_name, blip_name in _BLIP_VIT_NAMES:
                key = key.replace(hf_name, blip_name)
            state[f"blip.visual_encoder.{key}"] = tensor
        state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
        state["blip.text_encoder.embeddings.position_ids"] = torch.arange(arch["text_config"]["max_position_embeddings"])[None]
        state |= {"blip.vision_proj.weight": torch.randn(256, width), "blip.vision_proj.bias": torch.zeros(256)}
        state |= {"blip.text_proj.weight": torch.randn(256, text_width), "blip.text_proj.bias": torch.zeros(256)}
        state |= {f"mlp.{k}": v for k, v in head.state_dict().items()}
    torch.save(state, folder / "ImageReward.pt")
    return folder


__all__ = [
    "IMAGE_SIZE",
    "build_bert_tokenizer",
    "build_tiny_aesthetic",
    "build_tiny_clip",
    "build_tiny_hps",
    "build_tiny_imagereward",
    "save_tiny_clip_processor",
    "tiny_imagereward_architecture",
    "tiny_openclip_config",
    "tiny_openclip_state_dict",
]
