"""Shared by the neural rewards: where weights come from, loading them once, the NeuralReward base."""

from __future__ import annotations

import os
import re
import threading
from abc import abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from raygrpo.reward.base import Reward, RewardParams, check_batch
from raygrpo.reward.models.pixels import check_pixels

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


def model_error(reward: str, param: str, message: str) -> RewardModelError:
    """The error for a bad weights parameter: ``reward 'x': parameter 'y': message``."""
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
            raise model_error(
                reward, param, f"{str(path)!r} is a folder but holds none of {', '.join(files)}; point it at a "
                "folder written by save_pretrained (or a downloaded hub snapshot)",
            )  # fmt: skip
        return
    if path.exists() or not _HUB_ID.match(value) or value.startswith((".", "~")):
        raise model_error(
            reward, param, f"{value!r} is not a folder (and not a hub id such as {OPENAI_CLIP_L!r}); set it to a "
            "folder written by save_pretrained or to a hub id",
        )  # fmt: skip
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(value, name), str) for name in files):
        return
    if _hub_offline():
        raise model_error(
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
            raise model_error(reward, param, f"{value!r} is not of the form hf://<owner>/<repo>/<file>")
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = split
        if not isinstance(try_to_load_from_cache(repo_id, filename), str) and _hub_offline():
            raise model_error(
                reward, param, f"{filename!r} of {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                f"set, so it cannot be downloaded. " + _download_hint(repo_id, param, f"DIR/{filename}"),
            )  # fmt: skip
        return
    path = Path(value).expanduser()
    if not path.is_file():
        why = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise model_error(reward, param, f"{value!r} {why}; set it to a weights file or to hf://<owner>/<repo>/<file>")


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
        raise model_error(
            reward, param, f"cannot get {filename!r} from {repo_id!r} ({type(exc).__name__}: {exc}). "
            + _download_hint(repo_id, param, f"DIR/{filename}"),
        ) from exc  # fmt: skip


def load_or_explain(reward: str, param: str, value: str, loader: Callable[[], Any]) -> Any:
    """``loader()``, with a failure re-raised naming the reward, the parameter and how to fix it."""
    try:
        return loader()
    except RewardModelError:
        raise
    except Exception as exc:
        hint = _download_hint(value, param) if _HUB_ID.match(value) and not Path(value).exists() else ""
        raise model_error(reward, param, f"cannot load {value!r} ({type(exc).__name__}: {exc}). {hint}".rstrip()) from exc


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
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

    def _score_pixels(self, nets: Any, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[n]`` scores of ``pixels [n, 3, H, W]`` in [0, 1], differentiable: the formula of :meth:`_score_batch`
        with the processor's preprocessing in torch (raygrpo/reward/models/pixels.py)."""
        raise NotImplementedError(f"reward {self.name!r} has no torch form")

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
        check_batch(images, prompts)
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

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``[n]`` scores of ``pixels [n, 3, H, W]`` in [0, 1] with gradients through the pixels (the learner's torch
        form: raygrpo/reward/differentiable.py). The networks of :meth:`score` (frozen: eval mode, no parameter
        gradients, loaded once on ``device`` in ``dtype``); one forward pass for the whole batch, since chunks
        would not save the activations backward keeps."""
        check_pixels(self.name, pixels, prompts)
        return self._score_pixels(self.load(), pixels, list(prompts))

    def __getstate__(self) -> dict[str, Any]:
        # Networks are not shipped: the receiver loads its own copy on first use.
        state = self.__dict__.copy()
        state["_nets"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class PromptCache:
    """Per-prompt tensors (text embeddings, token ids) computed once and kept: ``cache(prompts, compute)``.

    ``compute(distinct new prompts) -> [k, ...]`` runs without gradients and outside inference mode, so the kept
    rows serve both the pools' scoring (under ``inference_mode``) and the learner's differentiable one (a tensor
    made under inference mode cannot be saved for backward). Holds at most ``limit`` prompts, the oldest dropped
    first: a prompt set larger than that costs recomputation, never unbounded memory.
    """

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str], compute: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """``[len(prompts), ...]``: each prompt's row, in order."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.rows]
        found = {p: self.rows[p] for p in prompts if p in self.rows}
        if missing:
            with torch.inference_mode(False), torch.no_grad():
                found |= dict(zip(missing, compute(missing)))
            for prompt in missing:
                self.rows[prompt] = found[prompt]
                if len(self.rows) > self.limit:
                    del self.rows[next(iter(self.rows))]
        return torch.stack([found[p] for p in prompts])


def to_inference(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` on ``device`` in ``dtype``, in eval mode, without gradients: how every reward network runs."""
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def materialise(model: nn.Module) -> nn.Module:
    """Recreate the ``position_ids`` buffers of a model built on the meta device and filled by ``assign``."""
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand(1, -1), persistent=False)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"conversion left tensors uninitialised: {leftover[:6]}")
    return model
