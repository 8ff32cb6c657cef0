"""ImageReward v1.0 (BLIP ViT + BERT with cross-attention + MLP head), on transformers BLIP modules."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from raygrpo.reward.models.clip import AestheticHead, clip_processor_class
from raygrpo.reward.models.loading import (
    NeuralReward,
    NeuralRewardParams,
    PromptCache,
    check_file_source,
    check_model_source,
    fetch_file,
    load_or_explain,
    materialise,
    model_error,
    read_state_dict,
    to_inference,
)
from raygrpo.reward.models.pixels import TorchImageProcessor

# ImageReward v1.0's architecture: BLIP_Pretrain(image_size=224, vit="large") with the med_config.json
# of the hub repository THUDM/ImageReward (BERT-base, 30524 tokens = bert-base-uncased + [DEC] + [ENC],
# cross-attention in every layer; encoder_width set to the ViT's 1024 by BLIP_Pretrain). BLIP's ViT
# uses LayerNorm eps 1e-6, BERT 1e-12.
IMAGEREWARD_ARCHITECTURE: dict[str, dict[str, Any]] = {
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 16,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    },
    "text_config": {
        "vocab_size": 30524,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
        "encoder_hidden_size": 1024,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
    },
}
IMAGEREWARD_MEAN = 0.16717362830052426  # ImageReward.py: rewards = (mlp(features) - mean) / std
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35  # ImageReward.py tokenises prompts with padding="max_length", max_length=35
# Keys of ImageReward's state dict that scoring never uses: BLIP_Pretrain's contrastive projections,
# and the position_ids buffer that BLIP's med.py registers as persistent.
_IMAGEREWARD_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def imagereward_to_transformers(
    state_dict: Mapping[str, torch.Tensor], architecture: Mapping[str, Any]
) -> tuple[nn.Module, nn.Module, AestheticHead]:
    """``(vision, text, mlp)``: ImageReward's weights in transformers ``BlipVisionModel`` / ``BlipTextModel``.

    ImageReward (github.com/THUDM/ImageReward, ``ImageReward.py``, ``models/BLIP``) saves
    ``blip.visual_encoder.*`` (BLIP's timm-style ViT), ``blip.text_encoder.*`` (BLIP's ``med.py``
    BERT) and ``mlp.layers.*``. Mapping (the one transformers' own BLIP conversion script uses):

    - ViT: ``cls_token`` -> ``embeddings.class_embedding``, ``pos_embed`` -> ``embeddings.position_embedding``,
      ``patch_embed.proj`` -> ``embeddings.patch_embedding``, ``blocks.i.{norm1, attn.qkv, attn.proj,
      norm2, mlp.fc1, mlp.fc2}`` -> ``encoder.layers.i.{layer_norm1, self_attn.qkv, self_attn.projection,
      layer_norm2, mlp.fc1, mlp.fc2}``, ``norm`` -> ``post_layernorm`` (both fuse q|k|v in one linear
      and split it per head the same way, and both return every token after the final LayerNorm);
    - text: ``med.py``'s names are the ones ``BlipTextModel`` (a port of it) uses, so keys only lose
      the ``blip.text_encoder.`` prefix; no pooling layer (``add_pooling_layer=False`` in BLIP_Pretrain);
    - MLP: the aesthetic-predictor layout, :class:`AestheticHead` over the text width.

    ``architecture``: ``{"vision_config": BlipVisionConfig kwargs, "text_config": BlipTextConfig kwargs}``.
    Unexpected or missing weights raise ``ValueError``.
    """
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_cfg = BlipVisionConfig(**architecture["vision_config"])
    text_cfg = BlipTextConfig(**architecture["text_config"])
    src = {k: v for k, v in state_dict.items() if not k.startswith(_IMAGEREWARD_UNUSED)}

    vision: dict[str, torch.Tensor] = {}
    renames = [
        (r"^blip\.visual_encoder\.cls_token$", "embeddings.class_embedding"),
        (r"^blip\.visual_encoder\.pos_embed$", "embeddings.position_embedding"),
        (r"^blip\.visual_encoder\.patch_embed\.proj\.", "embeddings.patch_embedding."),
        (r"^blip\.visual_encoder\.norm\.", "post_layernorm."),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
        (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    ]
    text, mlp, unexpected = {}, {}, []
    for key, tensor in src.items():
        if key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder.") :]] = tensor
        elif key.startswith("mlp."):
            mlp[key[len("mlp.") :]] = tensor
        else:
            for pattern, replacement in renames:
                new, hits = re.subn(pattern, replacement, key)
                if hits:
                    vision[new] = tensor
                    break
            else:
                unexpected.append(key)
    if unexpected:
        raise ValueError(f"the checkpoint holds weights ImageReward does not have: {unexpected[:6]}")

    with torch.device("meta"):
        vision_model = BlipVisionModel(vision_cfg)
        text_model = BlipTextModel(text_cfg, add_pooling_layer=False)
    head = AestheticHead(text_cfg.hidden_size)
    for part, model, weights in (("ViT", vision_model, vision), ("BERT", text_model, text), ("MLP", head, mlp)):
        try:
            model.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as exc:  # missing keys or wrong shapes: the architecture does not describe it
            raise ValueError(f"the checkpoint's {part} does not match the architecture: {exc}") from None
    return materialise(vision_model), materialise(text_model), head


class ImageRewardNets:
    """ImageReward's three parts plus its tokenizer and image processor, on one device."""

    def __init__(self, vision, text, head, tokenizer, image_processor, device: torch.device, dtype: torch.dtype):
        self.vision, self.text, self.head = vision, text, head
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.device, self.dtype = device, dtype
        self.token_cache = PromptCache()  # [ids | mask] rows of each prompt, tokenised once

    def __call__(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """Scores of uint8 images ``[n, H, W, 3]`` through the processor (PIL): the pools' path."""
        pil = [Image.fromarray(np.ascontiguousarray(image)) for image in images]
        return self.score(self.image_processor(images=pil, return_tensors="pt")["pixel_values"], prompts)

    def pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of ``pixels [n, 3, H, W]`` in [0, 1] with gradients: the processor's steps in torch."""
        return self.score(self.torch_processor(pixels), prompts)

    @cached_property
    def torch_processor(self) -> TorchImageProcessor:
        return TorchImageProcessor.from_processor(self.image_processor)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt")
        return torch.cat([tokens["input_ids"], tokens["attention_mask"]], dim=1)  # [k, 2 * 35]

    def score(self, pixel_values: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[n]`` scores of preprocessed ``pixel_values [n, 3, h, w]``, the one formula of both paths."""
        image_embeds = self.vision(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state
        ids, mask = self.token_cache(prompts, self._tokenize).to(self.device).chunk(2, dim=1)  # [n, 35] each
        out = self.text(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            # Every image token is attended to, as ImageReward's image_atts = ones.
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
        )
        features = out.last_hidden_state[:, 0, :].float()  # the [CLS] token
        return ((self.head(features) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


class ImageRewardScore(NeuralReward):
    """ImageReward v1.0: ``(MLP(BERT_xattn(prompt, ViT(image))[CLS]) - 0.16717) / 1.03334``.

    From Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
    Generation", NeurIPS 2023 (arXiv 2304.05977); github.com/THUDM/ImageReward ``ImageReward.py``:
    BLIP's ViT-L/16 encodes the image (224 px: bicubic resize of the short side, centre crop, CLIP
    mean/std); BERT-base with cross-attention to all image tokens reads the prompt (bert-base-uncased
    tokens, padded/truncated to 35); the [CLS] feature goes through the aesthetic-style MLP and is
    standardised with the training set's mean and std. Scores are roughly standard normal (higher
    is better). Used as a reward by Flow-GRPO and ReFL.

    The checkpoint is converted to transformers ``BlipVisionModel`` + ``BlipTextModel`` by
    :func:`imagereward_to_transformers`; the key layout is that of ImageReward's ``BLIP_Pretrain``.
    ``checkpoint``: ``ImageReward.pt`` as a local file or ``hf://owner/repo/file``; ``tokenizer``: a
    BERT tokenizer folder or hub id ([DEC] and [ENC] are added as ImageReward's ``init_tokenizer``
    does); ``architecture``: a JSON file ``{"vision_config": {...}, "text_config": {...}}`` of
    BlipVisionConfig / BlipTextConfig arguments, default ImageReward v1.0's (BLIP ViT-L + BERT-base).
    """

    name = "imagereward"

    class Params(NeuralRewardParams):
        checkpoint: str = "hf://THUDM/ImageReward/ImageReward.pt"
        tokenizer: str = "google-bert/bert-base-uncased"
        architecture: str | None = None

    def _check_sources(self) -> None:
        check_file_source(self.name, "checkpoint", self.params.checkpoint)
        check_model_source(self.name, "tokenizer", self.params.tokenizer, ("tokenizer_config.json", "vocab.txt", "tokenizer.json"))
        if self.params.architecture is not None and not Path(self.params.architecture).expanduser().is_file():
            raise model_error(self.name, "architecture", f"{self.params.architecture!r} is not a file; give a JSON file")

    def _architecture(self) -> Mapping[str, Any]:
        if self.params.architecture is None:
            return IMAGEREWARD_ARCHITECTURE
        return json.loads(Path(self.params.architecture).expanduser().read_text())

    def _load_nets(self) -> ImageRewardNets:
        from transformers import AutoTokenizer

        p, name = self.params, self.name

        def tokenizer():
            tok = AutoTokenizer.from_pretrained(p.tokenizer)
            # As ImageReward's init_tokenizer: ids 30522/30523 in bert-base-uncased, matching the 30524-row embedding.
            tok.add_special_tokens({"bos_token": "[DEC]"})
            tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            return tok

        tok = load_or_explain(name, "tokenizer", p.tokenizer, tokenizer)
        arch = load_or_explain(name, "architecture", p.architecture or "ImageReward-v1.0", self._architecture)
        state = load_or_explain(name, "checkpoint", p.checkpoint, lambda: read_state_dict(fetch_file(name, "checkpoint", p.checkpoint)))
        vision, text, head = load_or_explain(name, "checkpoint", p.checkpoint, lambda: imagereward_to_transformers(state, arch))
        if len(tok) > text.config.vocab_size:
            raise model_error(name, "tokenizer", f"{len(tok)} tokens but the text encoder has {text.config.vocab_size} embeddings")
        size = int(arch["vision_config"].get("image_size", 224))
        processor = _clip_style_processor(size)
        dev, dtype = self.device, self.torch_dtype
        vision, text, head = to_inference(vision, dev, dtype), to_inference(text, dev, dtype), to_inference(head, dev, torch.float32)
        return ImageRewardNets(vision, text, head, tok, processor, dev, dtype)

    def _score_batch(self, nets: ImageRewardNets, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        return nets(images, prompts)

    def _score_pixels(self, nets: ImageRewardNets, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return nets.pixels(pixels, prompts)


def _clip_style_processor(size: int):
    """Resize the short side to ``size`` (bicubic), centre-crop ``size``, CLIP mean/std: ImageReward's ``_transform``."""
    return clip_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
