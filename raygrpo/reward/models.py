"""Neural reward models: CLIP score, PickScore, the LAION aesthetic predictor and HPS v2.1, plus a
wrapper that scores videos by averaging an image reward over frames.

Each reward loads real weights with ``from_pretrained`` (or, for checkpoints shipped as a single
file, ``torch.load``/safetensors) from a local folder or a Hugging Face hub id, so a config can point
at a downloaded copy on a machine without internet. A weights file that lives in a hub repository is
written ``hf://<owner>/<repo>/<file>``.

Loading is lazy: constructing a reward only checks that its weights can be found (a local path that
exists, or a hub id that is cached or downloadable), which is what the run's preflight does on the
driver; the networks are loaded on the first :meth:`NeuralReward.score`, once per reward object, in
the reward actor. Pickling drops the loaded networks, so a reward object stays cheap to ship.

Scores are computed without gradients, in eval mode, ``batch_size`` images at a time, on ``device``
(any torch device string; a Ray reward actor with ``num_gpus`` sees its GPU as ``cuda``). Images
are handed to the models' own preprocessing as PIL images, so they are resized and normalised as the
reference implementations do it.

open_clip is not used: it imports torchvision at import time, and the torchvision wheels that pip
finds next to a CPU build of torch 2.13 fail to load (``operator torchvision::nms does not exist``).
HPS v2.1, an open_clip checkpoint, is therefore converted into a transformers ``CLIPModel`` (see
:func:`openclip_to_transformers`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from abc import abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, field_validator
from torch import nn

from raygrpo.reward.builtin import Reward, RewardParams, _check_batch, _mark_non_finite, make_reward

HF_PREFIX = "hf://"  # marks a single weights file inside a hub repository: hf://owner/repo/path/to/file
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

OPENAI_CLIP_L = "openai/clip-vit-large-patch14"
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # processor (BPE vocab + 224 px preprocessing) of every CLIP-H model here

# open_clip's ViT-H-14 (model_configs/ViT-H-14.json in github.com/mlfoundations/open_clip): the
# architecture HPS v2.1 fine-tunes. GELU, not QuickGELU: HPSv2 builds it with force_quick_gelu=False.
OPENCLIP_VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RewardModelError(ValueError):
    """A reward's weights cannot be found or loaded.

    A ValueError so that the run's preflight, which builds every reward on the driver, reports it
    next to the other config problems instead of crashing.
    """


# --------------------------------------------------------------------------------------------------
# Where weights come from


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the environment may have changed since.
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _download_hint(repo_id: str, param: str, what: str = "DIR") -> str:
    return (
        f"To fix: download it once where the hub is reachable, e.g. `hf download {repo_id} --local-dir DIR` "
        f"(`huggingface-cli download` with huggingface_hub < 1.0), then set params.{param}={what}; "
        "or let this machine reach the hub (unset HF_HUB_OFFLINE)."
    )


def _error(reward: str, param: str, message: str) -> RewardModelError:
    return RewardModelError(f"reward {reward!r}: parameter {param!r}: {message}")


def check_model_source(reward: str, param: str, value: str, files: tuple[str, ...]) -> None:
    """Fail fast, without network, when ``value`` can be neither a local folder nor a hub id.

    A local folder must hold one of ``files`` (what ``from_pretrained`` reads first). A hub id is
    accepted when one of ``files`` is in the Hugging Face cache, or when the hub may be asked;
    under ``HF_HUB_OFFLINE`` an uncached id is an error here rather than a slow failure later.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in files):
            raise _error(
                reward, param, f"{str(path)!r} is a folder but holds none of {', '.join(files)}; point it at a "
                "folder written by save_pretrained (or a downloaded hub snapshot)",
            )  # fmt: skip
        return
    if path.exists() or not _HUB_ID.match(value) or value.startswith((".", "~")):
        raise _error(
            reward, param, f"{value!r} is not a folder (and not a hub id such as {OPENAI_CLIP_L!r}); set it to a "
            "folder written by save_pretrained or to a hub id",
        )  # fmt: skip
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(value, name), str) for name in files):
        return
    if _hub_offline():
        raise _error(
            reward, param, f"{value!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be "
            "downloaded. " + _download_hint(value, param),
        )  # fmt: skip


def _split_hf_file(value: str) -> tuple[str, str] | None:
    """``(repo_id, filename)`` of ``hf://owner/repo/file``, or None for anything else."""
    if not value.startswith(HF_PREFIX):
        return None
    parts = value[len(HF_PREFIX) :].split("/", 2)
    if len(parts) < 3 or not all(parts) or not _HUB_ID.match(f"{parts[0]}/{parts[1]}"):
        return None
    return f"{parts[0]}/{parts[1]}", parts[2]


def check_file_source(reward: str, param: str, value: str) -> None:
    """Like :func:`check_model_source`, for one weights file: a local file or ``hf://owner/repo/file``."""
    if value.startswith(HF_PREFIX):
        split = _split_hf_file(value)
        if split is None:
            raise _error(reward, param, f"{value!r} is not of the form hf://<owner>/<repo>/<file>")
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = split
        if not isinstance(try_to_load_from_cache(repo_id, filename), str) and _hub_offline():
            raise _error(
                reward, param, f"{filename!r} of {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                f"set, so it cannot be downloaded. " + _download_hint(repo_id, param, f"DIR/{filename}"),
            )  # fmt: skip
        return
    path = Path(value).expanduser()
    if not path.is_file():
        why = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise _error(reward, param, f"{value!r} {why}; set it to a weights file or to hf://<owner>/<repo>/<file>")


def fetch_file(reward: str, param: str, value: str) -> str:
    """Local path of a weights file given as a path or ``hf://owner/repo/file`` (downloaded if needed)."""
    split = _split_hf_file(value)
    if split is None:
        return str(Path(value).expanduser())
    from huggingface_hub import hf_hub_download

    repo_id, filename = split
    try:
        return hf_hub_download(repo_id, filename)
    except Exception as exc:
        raise _error(
            reward, param, f"cannot get {filename!r} from {repo_id!r} ({type(exc).__name__}: {exc}). "
            + _download_hint(repo_id, param, f"DIR/{filename}"),
        ) from exc  # fmt: skip


def _load(reward: str, param: str, value: str, loader: Callable[[], Any]) -> Any:
    """``loader()``, with a failure re-raised naming the reward, the parameter and how to fix it."""
    try:
        return loader()
    except RewardModelError:
        raise
    except Exception as exc:
        hint = _download_hint(value, param) if _HUB_ID.match(value) and not Path(value).exists() else ""
        raise _error(reward, param, f"cannot load {value!r} ({type(exc).__name__}: {exc}). {hint}".rstrip()) from exc


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch pickle file (``weights_only``: no code runs on load)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Training scripts often wrap the weights as {"state_dict": ...} (HPSv2 does).
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    # Weights saved from a DistributedDataParallel wrapper carry a "module." prefix on every key.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


# --------------------------------------------------------------------------------------------------
# Shared machinery


class NeuralRewardParams(RewardParams):
    device: str = "cpu"
    """Torch device the networks run on, e.g. "cpu", "cuda", "cuda:1"."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights and activations; embeddings are compared in float32 whatever this is."""
    batch_size: int = Field(16, ge=1)
    """Images per forward pass."""

    @field_validator("device")
    @classmethod
    def _parse_device(cls, device: str) -> str:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"not a torch device: {device!r} ({exc})") from None
        return device


class NeuralReward(Reward):
    """A reward computed by networks: checked at construction, loaded on first use, scored in batches.

    Subclasses implement :meth:`_check_sources` (cheap, no network: make a bad path a config error),
    :meth:`_load_nets` (returns whatever :meth:`_score_batch` needs) and :meth:`_score_batch`.
    """

    params: NeuralRewardParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._lock = threading.Lock()
        self._nets: Any = None
        self._check_sources()

    def _check_sources(self) -> None:
        """Raise :class:`RewardModelError` when some weights can certainly not be found."""

    @abstractmethod
    def _load_nets(self) -> Any:
        """Load the networks (eval mode, no grad, on ``device``); called once per object."""

    @abstractmethod
    def _score_batch(self, nets: Any, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """``[n]`` scores of at most ``batch_size`` images."""

    @property
    def device(self) -> torch.device:
        return torch.device(self.params.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params.dtype]

    def load(self) -> Any:
        """The loaded networks, loading them on the first call (thread-safe)."""
        with self._lock:
            if self._nets is None:
                self._nets = self._load_nets()
            return self._nets

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        _check_batch(images, prompts)
        if len(images) == 0:
            return np.zeros(0, np.float32)
        nets = self.load()
        size = self.params.batch_size
        parts = []
        with torch.inference_mode():
            for start in range(0, len(images), size):
                values = self._score_batch(nets, images[start : start + size], list(prompts[start : start + size]))
                parts.append(values.detach().float().cpu().numpy())
        return np.concatenate(parts).astype(np.float32)

    def __getstate__(self) -> dict[str, Any]:
        # Networks are not shipped: the receiver loads its own copy on first use.
        state = self.__dict__.copy()
        state["_nets"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _prepare(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _clip_processor_class():
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
    return _clip_processor_class().from_pretrained(value)


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
        self.model = _prepare(model, device, dtype)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.dtype = dtype
        # Prompts are cut at CLIP's context length (77), as every reference scorer does; some
        # tokenizers report an unbounded model_max_length, so the position table decides.
        self.max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))

    def images(self, images: np.ndarray) -> torch.Tensor:
        # PIL images, so that the processor cannot mistake the channel axis of small images.
        pil = [Image.fromarray(np.ascontiguousarray(image)) for image in images]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def texts(self, prompts: list[str]) -> torch.Tensor:
        # A group repeats one prompt: encode each distinct prompt once.
        unique = list(dict.fromkeys(prompts))
        # Padding to the full context makes a prompt's embedding independent of its batch mates
        # (CLIP's text tower is causal, so padding after the end-of-text token changes nothing).
        tokens = self.tokenizer(unique, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device))
        embeds = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
        index = torch.tensor([unique.index(p) for p in prompts], device=embeds.device)
        return embeds[index]


def load_clip_encoder(reward: NeuralReward, model_param: str, model: str, processor_param: str, processor: str) -> ClipEncoder:
    """Load a transformers ``CLIPModel`` from ``model`` and its tokenizer/image processor from ``processor``."""
    from transformers import AutoTokenizer, CLIPModel

    name = reward.name
    # Loaded in float32 and cast by ClipEncoder, which first reads the temperature at full precision.
    net = _load(name, model_param, model, lambda: CLIPModel.from_pretrained(model, dtype=torch.float32))
    tokenizer = _load(name, processor_param, processor, lambda: AutoTokenizer.from_pretrained(processor))
    image_processor = _load(name, processor_param, processor, lambda: _clip_image_processor(processor))
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
        return self.params.scale * (clip.images(images) * clip.texts(prompts)).sum(-1)


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

    def _score_batch(self, clip: ClipEncoder, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        cosine = (clip.images(images) * clip.texts(prompts)).sum(-1)
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
        state = _load(self.name, "head", p.head, lambda: _load_state_dict(fetch_file(self.name, "head", p.head)))
        width = clip.model.config.projection_dim
        weight = state.get("layers.0.weight")
        if weight is None or weight.ndim != 2:
            raise _error(self.name, "head", f"{p.head!r} has no 'layers.0.weight'; keys: {sorted(state)[:8]}")
        if weight.shape[1] != width:
            raise _error(
                self.name, "head", f"the head takes {weight.shape[1]}-d embeddings but {p.clip_model!r} projects "
                f"to {width}-d; use the CLIP the head was trained on (ViT-L/14 for the LAION heads)",
            )  # fmt: skip
        head = AestheticHead(width)
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise _error(self.name, "head", f"{p.head!r} does not fit the aesthetic MLP: {exc}") from None
        return clip, _prepare(head, self.device, torch.float32)  # a few thousand FLOPs: keep full precision

    def _score_batch(self, nets: tuple[ClipEncoder, AestheticHead], images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        clip, head = nets
        return head(clip.images(images)).squeeze(-1)


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
    return _materialise(model)  # the position-id buffers are not in any state dict


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
            raise _error(
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
        tokenizer = _load(name, "processor", p.processor, lambda: AutoTokenizer.from_pretrained(p.processor))
        image_processor = _load(name, "processor", p.processor, lambda: _clip_image_processor(p.processor))
        cfg = _load(name, "openclip_config", p.openclip_config or "ViT-H-14", self._model_cfg)
        state = _load(name, "checkpoint", p.checkpoint, lambda: _load_state_dict(fetch_file(name, "checkpoint", p.checkpoint)))
        model = _load(name, "checkpoint", p.checkpoint, lambda: openclip_to_transformers(state, cfg, tokenizer))
        return ClipEncoder(model, tokenizer, image_processor, self.device, self.torch_dtype)


# --------------------------------------------------------------------------------------------------
# ImageReward (BLIP ViT + BERT with cross-attention + MLP), run as transformers BLIP modules

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


def _materialise(model: nn.Module) -> nn.Module:
    """Recreate the ``position_ids`` buffers of a model built on the meta device and filled by ``assign``."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(1, -1), persistent=False)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"conversion left tensors uninitialised: {leftover[:6]}")
    return model


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
    return _materialise(vision_model), _materialise(text_model), head


class ImageRewardNets:
    """ImageReward's three parts plus its tokenizer and image processor, on one device."""

    def __init__(self, vision, text, head, tokenizer, image_processor, device: torch.device, dtype: torch.dtype):
        self.vision, self.text, self.head = vision, text, head
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.device, self.dtype = device, dtype

    def __call__(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        pil = [Image.fromarray(np.ascontiguousarray(image)) for image in images]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt")
        out = self.text(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
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
            raise _error(self.name, "architecture", f"{self.params.architecture!r} is not a file; give a JSON file")

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

        tok = _load(name, "tokenizer", p.tokenizer, tokenizer)
        arch = _load(name, "architecture", p.architecture or "ImageReward-v1.0", self._architecture)
        state = _load(name, "checkpoint", p.checkpoint, lambda: _load_state_dict(fetch_file(name, "checkpoint", p.checkpoint)))
        vision, text, head = _load(name, "checkpoint", p.checkpoint, lambda: imagereward_to_transformers(state, arch))
        if len(tok) > text.config.vocab_size:
            raise _error(name, "tokenizer", f"{len(tok)} tokens but the text encoder has {text.config.vocab_size} embeddings")
        size = int(arch["vision_config"].get("image_size", 224))
        processor = _clip_style_processor(size)
        dev, dtype = self.device, self.torch_dtype
        return ImageRewardNets(
            _prepare(vision, dev, dtype), _prepare(text, dev, dtype), _prepare(head, dev, torch.float32), tok, processor, dev, dtype
        )

    def _score_batch(self, nets: ImageRewardNets, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        return nets(images, prompts)


def _clip_style_processor(size: int):
    """Resize the short side to ``size`` (bicubic), centre-crop ``size``, CLIP mean/std: ImageReward's ``_transform``."""
    return _clip_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# --------------------------------------------------------------------------------------------------
# Video: an image reward averaged over frames


class RewardSpec(RewardParams):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


class FrameAverage(Reward):
    """Score of a video = mean of an image reward over up to ``max_frames`` uniformly spaced frames.

    A wrapper of this project, not a published reward: the plain mean of per-frame scores, which is
    how frame-wise CLIP or aesthetic scores of videos are commonly computed (DanceGRPO itself trains
    its video models on VideoAlign, a video reward model). Frames are ``round(linspace(0, F - 1, min(F, max_frames)))``, so the first and last
    frames are always scored. Accepts videos ``[N, F, H, W, 3]`` and, unchanged, images
    ``[N, H, W, 3]`` (scored by the inner reward directly). A video is invalid in
    :meth:`score_with_errors` when any of its scored frames is.

    Params: ``reward``: ``{"kind": ..., "params": {...}}`` of any registered reward;
    ``max_frames``: at most this many frames per video are scored.
    """

    name = "frame_average"

    class Params(RewardParams):
        reward: RewardSpec
        max_frames: int = Field(8, ge=1)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        spec = self.params.reward
        try:
            self.inner = make_reward(spec.kind, spec.params)
        except ValueError as exc:
            raise ValueError(f"reward {self.name!r}: parameter 'reward': {exc}") from exc

    def frame_indices(self, num_frames: int) -> np.ndarray:
        count = min(num_frames, self.params.max_frames)
        return np.unique(np.rint(np.linspace(0, num_frames - 1, count)).astype(np.int64))

    def _frames(self, videos: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, list[str], int]:
        if not isinstance(videos, np.ndarray) or videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
            desc = f"{videos.dtype} array of shape {videos.shape}" if isinstance(videos, np.ndarray) else type(videos).__name__
            raise ValueError(f"videos must be a uint8 array [N, F, H, W, 3] (or images [N, H, W, 3]), got {desc}")
        if len(prompts) != len(videos):
            raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
        if videos.shape[1] == 0:
            raise ValueError("videos have no frames")
        index = self.frame_indices(videos.shape[1])
        frames = videos[:, index].reshape(-1, *videos.shape[2:])
        return frames, [p for p in prompts for _ in index], len(index)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        if _is_image_batch(images):
            return self.inner.score(images, prompts)
        frames, frame_prompts, k = self._frames(images, prompts)
        values = np.asarray(self.inner.score(frames, frame_prompts), dtype=np.float64).reshape(len(images), k)
        return values.mean(axis=1).astype(np.float32)

    def score_with_errors(
        self, images: np.ndarray, prompts: list[str], *, policy_version: int = 0
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        if _is_image_batch(images):
            return self.inner.score_with_errors(images, prompts, policy_version=policy_version)
        frames, frame_prompts, k = self._frames(images, prompts)
        values, valid, errors = self.inner.score_with_errors(frames, frame_prompts, policy_version=policy_version)
        values = np.asarray(values, dtype=np.float64).reshape(len(images), k)
        valid = np.asarray(valid, dtype=bool).reshape(len(images), k)
        index = self.frame_indices(images.shape[1])
        video_errors: list[str | None] = []
        for i in range(len(images)):
            bad = np.flatnonzero(~valid[i])  # the first invalid frame's error stands for the video
            video_errors.append(f"frame {int(index[bad[0]])}: {errors[i * k + bad[0]]}" if len(bad) else None)
        return _mark_non_finite(values.mean(axis=1), video_errors)


def _is_image_batch(array: Any) -> bool:
    """``[N, H, W, 3]``: handed to the inner reward as is (anything else must be a video batch)."""
    return isinstance(array, np.ndarray) and array.ndim == 4 and array.shape[-1] == 3


NEURAL_REWARDS: dict[str, type[Reward]] = {
    cls.name: cls for cls in (ClipScore, PickScore, Aesthetic, HpsV21, ImageRewardScore, FrameAverage)
}

__all__ = [
    "IMAGEREWARD_ARCHITECTURE",
    "NEURAL_REWARDS",
    "OPENCLIP_VIT_H_14",
    "Aesthetic",
    "AestheticHead",
    "ClipEncoder",
    "ClipScore",
    "FrameAverage",
    "HpsV21",
    "ImageRewardScore",
    "NeuralReward",
    "NeuralRewardParams",
    "PickScore",
    "RewardModelError",
    "check_file_source",
    "check_model_source",
    "fetch_file",
    "imagereward_to_transformers",
    "load_clip_encoder",
    "openclip_to_transformers",
]
