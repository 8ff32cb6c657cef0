"""CLIP-based rewards: CLIP score, PickScore, the LAION aesthetic predictor, HPS v2.1 (converted from open_clip)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from raygrpo.reward.models.loading import (
    LAION_CLIP_H,
    OPENAI_CLIP_L,
    OPENCLIP_VIT_H_14,
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


def clip_processor_class():
    """transformers' PIL-backed CLIP image processor.

    The PIL backend when transformers has one: it gives the same pixels whether or not torchvision is
    installed, and it is the code path the reference implementations (PickScore, DDPO's aesthetic
    scorer; HPSv2 and ImageReward resize PIL images with torchvision, which calls PIL too) ran
    with. Older transformers have only ``CLIPImageProcessor``, which is that same code.
    """
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers without image-processing backends
        from transformers import CLIPImageProcessor as processor_class
    return processor_class


def _clip_image_processor(value: str):
    """The CLIP image processor saved in ``value`` (a folder or hub id)."""
    return clip_processor_class().from_pretrained(value)


class ClipEncoder:
    """A transformers ``CLIPModel`` with its tokenizer and image processor, giving unit embeddings.

    ``images`` and ``texts`` return ``[n, projection_dim]`` float32 L2-normalised embeddings:
    the pooled (CLS / end-of-text) output of each tower through its projection, as
    ``CLIPModel.get_image_features`` / ``get_text_features`` compute them. ``model`` is moved to
    ``device`` and ``dtype`` here; ``temperature`` is ``exp(logit_scale)`` read before that cast
    (in bfloat16, ln(100) would round to 4.59 and scale every PickScore by 0.99).
    """

    def __init__(self, model, tokenizer, image_processor, device: torch.device, dtype: torch.dtype):
        self.temperature = float(model.logit_scale.detach().float().exp())
        self.model = to_inference(model, device, dtype)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.dtype = dtype
        # Prompts are cut at CLIP's context length (77), as every reference scorer does; some
        # tokenizers report an unbounded model_max_length, so the position table decides.
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
        self.text_cache = PromptCache()

    def images(self, images: np.ndarray) -> torch.Tensor:
        """Embeddings of uint8 images ``[n, H, W, 3]`` through the processor (PIL): the pools' path."""
        # PIL images, so that the processor cannot mistake the channel axis of small images.
        pil = [Image.fromarray(np.ascontiguousarray(image)) for image in images]
        return self.embed(self.image_processor(images=pil, return_tensors="pt")["pixel_values"])

    def pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``pixels [n, 3, H, W]`` in [0, 1] with gradients: the processor's steps in torch."""
        return self.embed(self.torch_processor(pixels))

    @cached_property
    def torch_processor(self) -> TorchImageProcessor:
        # Built on first use: a processor without a torch form must not stop the pools' scoring.
        return TorchImageProcessor.from_processor(self.image_processor)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[n, projection_dim]`` unit embeddings of preprocessed ``pixel_values [n, 3, h, w]``."""
        pooled = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def texts(self, prompts: list[str]) -> torch.Tensor:
        # A group repeats one prompt, and training repeats the prompt set: each prompt is encoded once.
        return self.text_cache(prompts, self._encode_texts)

    def _encode_texts(self, prompts: list[str]) -> torch.Tensor:
        # Padding to the full context makes a prompt's embedding independent of its batch mates
        # (CLIP's text tower is causal, so padding after the end-of-text token changes nothing).
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)


def load_clip_encoder(reward: NeuralReward, model_param: str, model: str, processor_param: str, processor: str) -> ClipEncoder:
    """Load a transformers ``CLIPModel`` from ``model`` and its tokenizer/image processor from ``processor``."""
    from transformers import AutoTokenizer, CLIPModel

    name = reward.name
    # Loaded in float32 and cast by ClipEncoder, which first reads the temperature at full precision.
    net = load_or_explain(name, model_param, model, lambda: CLIPModel.from_pretrained(model, dtype=torch.float32))
    tokenizer = load_or_explain(name, processor_param, processor, lambda: AutoTokenizer.from_pretrained(processor))
    image_processor = load_or_explain(name, processor_param, processor, lambda: _clip_image_processor(processor))
    return ClipEncoder(net, tokenizer, image_processor, reward.device, reward.torch_dtype)


_MODEL_FILES = ("config.json",)
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


# --------------------------------------------------------------------------------------------------
# CLIP score and PickScore


class ClipScore(NeuralReward):
    """CLIP score: ``scale * cos(E_img(image), E_txt(prompt))``, the cosine of CLIP's projected embeddings.

    From CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision", 2021, arXiv 2103.00020); used as a text-alignment reward by DanceGRPO (Xue et al.
    2025, arXiv 2505.07818, with apple/DFN5B-CLIP-ViT-H-14-378). The default ``scale = 1`` gives the
    raw cosine, the convention of DanceGRPO's reported numbers (SD1.4: 0.363 -> 0.395); set
    ``scale: 100`` for the "x100" convention of many papers. (CLIPScore of Hessel et al. 2021,
    ``2.5 * max(cos, 0)``, is not the same number.)

    ``model``: a transformers-format CLIP (``CLIPModel`` folder or hub id). open_clip-only checkpoints
    are not read here; apple/DFN5B-CLIP-ViT-H-14-378 also ships a transformers ``config.json`` and
    weights, which work. ``processor``: where the tokenizer and image processor are (default: ``model``).
    """

    name = "clip_score"

    class Params(NeuralRewardParams):
        model: str = OPENAI_CLIP_L
        processor: str | None = None
        scale: float = 1.0

    def _processor(self) -> str:
        return self.params.processor or self.params.model

    def _check_sources(self) -> None:
        check_model_source(self.name, "model", self.params.model, _MODEL_FILES)
        if self.params.processor is not None:
            check_model_source(self.name, "processor", self.params.processor, _PROCESSOR_FILES)

    def _load_nets(self) -> ClipEncoder:
        return load_clip_encoder(self, "model", self.params.model, "processor" if self.params.processor else "model", self._processor())

    def _score_batch(self, clip: ClipEncoder, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        return self._score_embeddings(clip, clip.images(images), prompts)

    def _score_pixels(self, clip: ClipEncoder, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._score_embeddings(clip, clip.pixels(pixels), prompts)

    def _score_embeddings(self, clip: ClipEncoder, image_embeds: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The score of unit image embeddings ``[n, d]``, the one formula of both paths."""
        return self.params.scale * (image_embeds * clip.texts(prompts)).sum(-1)


class PickScore(ClipScore):
    """PickScore: ``scale * exp(logit_scale) * cos(E_img, E_txt)`` of a CLIP-H fine-tuned on Pick-a-Pic.

    From Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
    Generation", 2023 (arXiv 2305.01569); weights yuvalkirstain/PickScore_v1 (a transformers
    ``CLIPModel``), processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as in the model card.
    ``exp(logit_scale)`` is the model's learned temperature (about 100), so raw PickScores are
    around 20-23. The default ``scale = 1/26`` divides by 26 as Flow-GRPO's ``pickscore_scorer.py``
    does (arXiv 2505.05470), which puts the reward near 0.8-0.9; ``scale: 1`` gives the raw score.
    """

    name = "pickscore"

    class Params(NeuralRewardParams):
        model: str = "yuvalkirstain/PickScore_v1"
        processor: str | None = LAION_CLIP_H
        scale: float = 1.0 / 26.0

    def _score_embeddings(self, clip: ClipEncoder, image_embeds: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cosine = (image_embeds * clip.texts(prompts)).sum(-1)
        return self.params.scale * clip.temperature * cosine


# --------------------------------------------------------------------------------------------------
# LAION aesthetic predictor


class AestheticHead(nn.Module):
    """The MLP of the LAION "improved aesthetic predictor" (sac+logos+ava1-l14-linearMSE).

    Linear(in, 1024) - Dropout(0.2) - Linear(1024, 128) - Dropout(0.2) - Linear(128, 64) -
    Dropout(0.1) - Linear(64, 16) - Linear(16, 1), with no activations (the "linear" in
    linearMSE), in an ``nn.Sequential`` called ``layers``, so the state-dict keys are those of the
    published file: ``layers.{0,2,4,6,7}.{weight,bias}``
    (github.com/christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``).
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class Aesthetic(NeuralReward):
    """LAION aesthetic score (v2, "improved aesthetic predictor"): ``MLP(normalize(E_img(image)))``.

    From github.com/christophschuhmann/improved-aesthetic-predictor: the L2-normalised CLIP ViT-L/14
    image embedding (768-d) through :class:`AestheticHead`; scores are on the AVA 1-10 scale
    (typical images 4-7). Used as a reward by DDPO (arXiv 2305.13301) and Flow-GRPO. Prompts are
    ignored.

    ``clip_model``: a transformers CLIP (default openai/clip-vit-large-patch14, the ViT-L/14 the head
    was trained on); its projection width must equal the head's input width. ``head``: the MLP's
    weights (.pth or .safetensors), a local file or ``hf://owner/repo/file``. The default is the copy
    that TRL's DDPO example loads into this same ``layers.*`` module
    (``hf://trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth``); it is understood to be the
    sac+logos+ava1-l14-linearMSE weights, which can also be given directly as a downloaded file.
    """

    name = "aesthetic"

    class Params(NeuralRewardParams):
        clip_model: str = OPENAI_CLIP_L
        processor: str | None = None
        head: str = "hf://trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"

    def _check_sources(self) -> None:
        check_model_source(self.name, "clip_model", self.params.clip_model, _MODEL_FILES)
        if self.params.processor is not None:
            check_model_source(self.name, "processor", self.params.processor, _PROCESSOR_FILES)
        check_file_source(self.name, "head", self.params.head)

    def _load_nets(self) -> tuple[ClipEncoder, AestheticHead]:
        p = self.params
        clip = load_clip_encoder(
            self, "clip_model", p.clip_model, "processor" if p.processor else "clip_model", p.processor or p.clip_model
        )
        state = load_or_explain(self.name, "head", p.head, lambda: read_state_dict(fetch_file(self.name, "head", p.head)))
        width = clip.model.config.projection_dim
        weight = state.get("layers.0.weight")
        if weight is None or weight.ndim != 2:
            raise model_error(self.name, "head", f"{p.head!r} has no 'layers.0.weight'; keys: {sorted(state)[:8]}")
        if weight.shape[1] != width:
            raise model_error(
                self.name, "head", f"the head takes {weight.shape[1]}-d embeddings but {p.clip_model!r} projects "
                f"to {width}-d; use the CLIP the head was trained on (ViT-L/14 for the LAION heads)",
            )  # fmt: skip
        head = AestheticHead(width)
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise model_error(self.name, "head", f"{p.head!r} does not fit the aesthetic MLP: {exc}") from None
        return clip, to_inference(head, self.device, torch.float32)  # a few thousand FLOPs: keep full precision

    def _score_batch(self, nets: tuple[ClipEncoder, AestheticHead], images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        clip, head = nets
        return head(clip.images(images)).squeeze(-1)

    def _score_pixels(self, nets: tuple[ClipEncoder, AestheticHead], pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        clip, head = nets
        return head(clip.pixels(pixels)).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# HPS v2.1 (an open_clip checkpoint, run as a transformers CLIPModel)

_OPENCLIP_KEYS = {
    "top": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"},
    "vision_cfg": {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"},
    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
}
_OPENCLIP_IGNORED = {"attn_mask", "visual.attn_mask"}  # causal-mask buffers some open_clip versions saved


def _check_openclip_cfg(cfg: Mapping[str, Any]) -> None:
    """Reject open_clip options this converter does not translate (timm/HF towers, layer scale, ...)."""
    problems = sorted(set(cfg) - _OPENCLIP_KEYS["top"])
    for part in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg.get(part), Mapping):
            raise ValueError(f"open_clip model config has no {part!r}")  # noqa: TRY004 - a bad config file, not a bad argument type
        problems += [f"{part}.{k}" for k in sorted(set(cfg[part]) - _OPENCLIP_KEYS[part])]
    if problems:
        raise ValueError(
            f"unsupported open_clip model options {problems}: only plain ViT image towers with a CLIP text "
            "transformer (the ViT-B/L/H/g family) convert to a transformers CLIPModel"
        )


def openclip_to_transformers(state_dict: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any], tokenizer) -> Any:
    """A transformers ``CLIPModel`` holding the weights of an open_clip ViT ``CLIP``.

    open_clip's ``CLIP`` (github.com/mlfoundations/open_clip, ``model.py`` / ``transformer.py``) and
    transformers' ``CLIPModel`` compute the same function; only the layout differs:

    - blocks ``[visual.]transformer.resblocks.i.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`` ->
      ``{vision,text}_model.encoder.layers.i.{layer_norm1, self_attn, layer_norm2, mlp.fc1, mlp.fc2}``;
      ``nn.MultiheadAttention``'s fused ``in_proj_{weight,bias}`` ([3w, w], rows q|k|v) split into
      ``{q,k,v}_proj``;
    - vision: ``conv1`` (no bias) -> ``patch_embedding``, ``class_embedding``,
      ``positional_embedding`` -> ``position_embedding.weight``, ``ln_pre`` -> ``pre_layrnorm``,
      ``ln_post`` -> ``post_layernorm``, ``proj`` [w, d] (used as ``x @ proj``) -> ``visual_projection.weight = proj.T``;
    - text: ``token_embedding``, ``positional_embedding``, ``ln_final`` -> ``final_layer_norm``,
      ``text_projection`` [w, d] -> ``text_projection.weight = text_projection.T``; ``logit_scale`` as is.

    Both pool the vision tower at the class token after the final LayerNorm and the text tower at the
    end-of-text token (open_clip: argmax of the token ids, which is end-of-text in CLIP's vocabulary;
    transformers: the first ``eos_token_id``, taken from ``tokenizer``); both use a causal text mask,
    LayerNorm eps 1e-5, and GELU or, with ``quick_gelu``, QuickGELU. ``model_cfg`` is open_clip's
    model config (``embed_dim``, ``quick_gelu``, ``vision_cfg``, ``text_cfg``); options outside the
    plain ViT family raise ``ValueError``, as do missing or unexpected weights.
    """
    from transformers import CLIPConfig, CLIPModel

    _check_openclip_cfg(model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = int(vision["width"]), int(text["width"])
    config = CLIPConfig(
        text_config={
            "vocab_size": int(text["vocab_size"]),
            "hidden_size": t_width,
            "intermediate_size": int(t_width * float(text.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(text["layers"]),
            "num_attention_heads": int(text["heads"]),
            "max_position_embeddings": int(text["context_length"]),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": int(model_cfg["embed_dim"]),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": v_width,
            "intermediate_size": int(v_width * float(vision.get("mlp_ratio", 4.0))),
            "num_hidden_layers": int(vision["layers"]),
            "num_attention_heads": v_width // int(vision.get("head_width", 64)),
            "image_size": int(vision["image_size"]),
            "patch_size": int(vision["patch_size"]),
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            "projection_dim": int(model_cfg["embed_dim"]),
        },
        projection_dim=int(model_cfg["embed_dim"]),
    )

    src = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []

    def take(key: str) -> torch.Tensor:
        if key not in src:
            missing.append(key)
            return torch.empty(0)
        return src.pop(key)

    def blocks(src_prefix: str, dst_prefix: str, layers: int) -> None:
        for i in range(layers):
            s, d = f"{src_prefix}.{i}", f"{dst_prefix}.{i}"
            for part in ("weight", "bias"):
                fused = take(f"{s}.attn.in_proj_{part}")  # rows: q | k | v
                for name, chunk in zip("qkv", fused.chunk(3) if fused.numel() else (fused,) * 3):
                    out[f"{d}.self_attn.{name}_proj.{part}"] = chunk
                out[f"{d}.self_attn.out_proj.{part}"] = take(f"{s}.attn.out_proj.{part}")
                out[f"{d}.layer_norm1.{part}"] = take(f"{s}.ln_1.{part}")
                out[f"{d}.layer_norm2.{part}"] = take(f"{s}.ln_2.{part}")
                out[f"{d}.mlp.fc1.{part}"] = take(f"{s}.mlp.c_fc.{part}")
                out[f"{d}.mlp.fc2.{part}"] = take(f"{s}.mlp.c_proj.{part}")

    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    for part in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{part}"] = take(f"visual.ln_pre.{part}")
        out[f"vision_model.post_layernorm.{part}"] = take(f"visual.ln_post.{part}")
        out[f"text_model.final_layer_norm.{part}"] = take(f"ln_final.{part}")
    out["visual_projection.weight"] = take("visual.proj").T.contiguous()
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", int(vision["layers"]))
    out["text_model.embeddings.token_embedding.weight"] = take("token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take("positional_embedding")
    out["text_projection.weight"] = take("text_projection").T.contiguous()
    blocks("transformer.resblocks", "text_model.encoder.layers", int(text["layers"]))
    out["logit_scale"] = take("logit_scale")
    unexpected = sorted(set(src) - _OPENCLIP_IGNORED)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not match the open_clip model config: missing {missing[:6]}"
            f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )

    # Built on the meta device and filled with the checkpoint's tensors: a ViT-H would otherwise
    # spend many seconds drawing random weights that are thrown away.
    with torch.device("meta"):
        model = CLIPModel(config)
    try:
        model.load_state_dict(out, strict=True, assign=True)
    except RuntimeError as exc:  # wrong shapes: the config does not describe this checkpoint
        raise ValueError(f"the checkpoint does not match the open_clip model config: {exc}") from None
    return materialise(model)  # the position-id buffers are not in any state dict


class HpsV21(ClipScore):
    """HPS v2.1 (Human Preference Score v2.1): ``scale * cos(E_img, E_txt)`` of a fine-tuned CLIP-H.

    From Wu et al., "Human Preference Score v2: A Solid Benchmark for Evaluating Human Preferences of
    Text-to-Image Synthesis", 2023 (arXiv 2306.09341); checkpoint ``HPS_v2.1_compressed.pt`` of the
    hub repository xswu/HPSv2 (github.com/tgxs002/HPSv2, ``hpsv2/img_score.py``): an open_clip
    ViT-H-14 whose normalised image and text features are multiplied, ``diag(img @ txt.T)``, i.e. the
    raw cosine (typically 0.2-0.35). The default ``scale = 1`` keeps that convention, which is the
    one DanceGRPO trains on and reports (its HPS numbers are of the order of 0.3); HPSv2's own
    benchmark tables print it x100.

    The checkpoint is converted to a transformers ``CLIPModel`` by :func:`openclip_to_transformers`
    (open_clip itself cannot be imported beside a CPU torch, see the module docstring).
    ``checkpoint``: a local ``.pt``/``.safetensors`` file or ``hf://owner/repo/file``.
    ``openclip_config``: a JSON file with open_clip's model config (either the bare config or
    ``open_clip_config.json``'s ``{"model_cfg": ...}``); default: open_clip's ViT-H-14, which HPS
    v2.1 uses. ``processor``: tokenizer and image processor; the default is the LAION CLIP-H one,
    whose BPE vocabulary and 224 px bicubic resize + centre crop + OpenAI mean/std match HPSv2's
    open_clip tokenizer and ``preprocess_val``.
    """

    name = "hps_v2.1"

    class Params(NeuralRewardParams):
        checkpoint: str = "hf://xswu/HPSv2/HPS_v2.1_compressed.pt"
        openclip_config: str | None = None
        processor: str = LAION_CLIP_H
        scale: float = 1.0

    def _check_sources(self) -> None:
        check_file_source(self.name, "checkpoint", self.params.checkpoint)
        if self.params.openclip_config is not None and not Path(self.params.openclip_config).expanduser().is_file():
            raise model_error(
                self.name, "openclip_config", f"{self.params.openclip_config!r} is not a file; give an open_clip model config JSON"
            )
        check_model_source(self.name, "processor", self.params.processor, _PROCESSOR_FILES)

    def _model_cfg(self) -> dict[str, Any]:
        if self.params.openclip_config is None:
            return OPENCLIP_VIT_H_14
        cfg = json.loads(Path(self.params.openclip_config).expanduser().read_text())
        return cfg.get("model_cfg", cfg)

    def _load_nets(self) -> ClipEncoder:
        from transformers import AutoTokenizer

        p, name = self.params, self.name
        tokenizer = load_or_explain(name, "processor", p.processor, lambda: AutoTokenizer.from_pretrained(p.processor))
        image_processor = load_or_explain(name, "processor", p.processor, lambda: _clip_image_processor(p.processor))
        cfg = load_or_explain(name, "openclip_config", p.openclip_config or "ViT-H-14", self._model_cfg)
        state = load_or_explain(name, "checkpoint", p.checkpoint, lambda: read_state_dict(fetch_file(name, "checkpoint", p.checkpoint)))
        model = load_or_explain(name, "checkpoint", p.checkpoint, lambda: openclip_to_transformers(state, cfg, tokenizer))
        return ClipEncoder(model, tokenizer, image_processor, self.device, self.torch_dtype)


# --------------------------------------------------------------------------------------------------
# ImageReward (BLIP ViT + BERT with cross-attention + MLP), run as transformers BLIP modules
