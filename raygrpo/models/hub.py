"""Where a model comes from: hub ids, local pipeline folders and the tiny random builds.

Every adapter's ``from_pretrained`` goes through here: :func:`pretrained_source` turns
``model.pretrained`` into a folder or a hub id (``"tiny-random"`` into the family's cached tiny
build), and :func:`load_component` loads one pipeline component from it. The driver's preflight
calls :func:`check_pretrained`, so that a missing or damaged folder is reported before any actor
starts rather than as an actor's traceback.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from raygrpo.models.tiny import TINY_IMAGE_BUILDERS, TINY_IMAGE_VERSIONS
from raygrpo.models.tiny_flux2 import TINY_FLUX2_BUILDERS, TINY_FLUX2_VERSIONS
from raygrpo.models.tiny_flux_kontext import TINY_KONTEXT_BUILDERS, TINY_KONTEXT_VERSIONS
from raygrpo.models.tiny_qwen_image import TINY_QWEN_IMAGE_BUILDERS, TINY_QWEN_IMAGE_VERSIONS
from raygrpo.models.tiny_video import TINY_VIDEO_BUILDERS, TINY_VIDEO_VERSIONS
from raygrpo.models.tiny_wan22 import TINY_WAN22_BUILDERS, TINY_WAN22_VERSIONS

TINY_RANDOM = "tiny-random"  # special ``model.pretrained``: the family's cached tiny random build
DEFAULT_RESOLUTION = 512  # the image families' default size (px) where the model does not say otherwise
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# The pipeline folders each family's from_pretrained reads when it loads everything (rollout's view).
# check_pretrained requires them of a local folder; tests/test_adapter_contract.py checks that the
# adapters read exactly these.
PIPELINE_COMPONENTS = {
    "flux": ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "sd3": (
        "transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3",
    ),  # fmt: skip
    "sd": ("unet", "scheduler", "vae", "text_encoder", "tokenizer"),
    "hunyuan_video": ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "wan_i2v": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "image_encoder", "image_processor"),
    "wan_t2v": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer"),
    "flux_kontext": ("transformer", "scheduler", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    "flux2": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer"),
    "qwen_image": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer"),
    "qwen_image_edit": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer", "processor"),
}

# Keyed by tiny build: "skyreels_v2_i2v" is a build of the wan_i2v family, not a family of its own.
TINY_BUILDERS = {**TINY_IMAGE_BUILDERS, **TINY_VIDEO_BUILDERS}
TINY_VERSIONS = {**TINY_IMAGE_VERSIONS, **TINY_VIDEO_VERSIONS}
TINY_BUILDERS |= TINY_KONTEXT_BUILDERS  # FLUX.1 Kontext (raygrpo/models/tiny_flux_kontext.py)
TINY_VERSIONS |= TINY_KONTEXT_VERSIONS
TINY_BUILDERS |= TINY_WAN22_BUILDERS  # Wan 2.2 A14B (two experts) and TI2V-5B (raygrpo/models/tiny_wan22.py)
TINY_VERSIONS |= TINY_WAN22_VERSIONS
TINY_BUILDERS |= TINY_FLUX2_BUILDERS  # FLUX.2 [klein] base and [dev] (raygrpo/models/tiny_flux2.py)
TINY_VERSIONS |= TINY_FLUX2_VERSIONS
TINY_BUILDERS |= TINY_QWEN_IMAGE_BUILDERS  # Qwen-Image and Qwen-Image-Edit (raygrpo/models/tiny_qwen_image.py)
TINY_VERSIONS |= TINY_QWEN_IMAGE_VERSIONS


class ModelNotFoundError(RuntimeError):
    """The requested pretrained model is neither a local pipeline folder nor obtainable from the hub."""


class ModelFolderError(ModelNotFoundError):
    """A local pipeline folder lacks a component the family loads, or holds a file that does not parse."""


# ------------------------------------------------------------------------------------- tiny builds
def tiny_cache_root() -> Path:
    """``$RAYGRPO_CACHE``, or ``~/.cache/raygrpo``."""
    return Path(os.environ.get("RAYGRPO_CACHE") or Path.home() / ".cache" / "raygrpo").expanduser()


def tiny_model_folder(build: str, seed: int = 0) -> Path:
    """The cached tiny model ``build`` (a family, or ``"skyreels_v2_i2v"``) for ``seed``, built on first use."""
    if build not in TINY_BUILDERS:
        raise ValueError(f"no tiny builder for model family {build!r}; known families: {sorted(TINY_BUILDERS)}")
    folder = tiny_cache_root() / f"tiny-{build}-{TINY_VERSIONS[build]}-seed{seed}"
    return TINY_BUILDERS[build](folder, seed=seed)


# --------------------------------------------------------------------------------- hub and folders
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
        "Use model.pretrained=tiny-random for a tiny random model of the family."
    )


def resolve_pretrained(name_or_path: str | os.PathLike, *, timeout: float = 5.0) -> str:
    """Where to load ``name_or_path`` from, failing fast with an actionable :class:`ModelNotFoundError`.

    Returns a local folder for ``"tiny-random"`` (the tiny FLUX, built on first use; adapters map it
    to their own family's build with :func:`pretrained_source`), for an existing pipeline folder,
    and for a hub id whose snapshot is in the Hugging Face cache. For a hub id that is not cached
    but reachable it returns the id itself, so each component downloads only what it needs (the
    learner never fetches the text encoders). The hub is asked once, with ``timeout`` seconds, and
    not at all under ``HF_HUB_OFFLINE=1``; huggingface_hub's own downloads retry for ~25 s.
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


def pretrained_source(family: str, name_or_path: str | os.PathLike) -> str:
    """What ``family``'s ``from_pretrained`` loads from: its own tiny build for ``"tiny-random"``, else :func:`resolve_pretrained`."""
    if str(name_or_path) == TINY_RANDOM:
        return str(tiny_model_folder(family))
    return resolve_pretrained(name_or_path)


def _incomplete(source: str, subfolder: str) -> ModelFolderError:
    return ModelFolderError(
        f"{source} has no {subfolder}/ folder, so the download is incomplete. Download the whole "
        "pipeline (`hf download <id> --local-dir DIR`) and set model.pretrained=DIR."
    )


def load_component(source: str, cls_: type, subfolder: str, device: str | torch.device, **kwargs: Any) -> Any:
    """``cls_.from_pretrained(source, subfolder=...)`` in eval mode without gradients, or a clear error for a missing part."""
    if Path(source).is_dir() and not (Path(source) / subfolder).is_dir():
        raise _incomplete(source, subfolder)
    module = cls_.from_pretrained(source, subfolder=subfolder, **kwargs)
    if isinstance(module, torch.nn.Module):
        module = module.to(device).eval().requires_grad_(False)
    return module


def init_defaults(cls_: type) -> dict[str, Any]:
    """The keyword defaults of ``cls_.__init__``: what ``from_pretrained`` uses for keys a config file lacks."""
    return {name: p.default for name, p in inspect.signature(cls_.__init__).parameters.items() if p.default is not p.empty}


def component_config(source: str, cls_: type, subfolder: str) -> dict[str, Any]:
    """A component's ``config.json`` completed with ``cls_``'s defaults: the arguments ``from_pretrained`` builds it with.

    ``load_config`` returns only what the file holds, and files written by older diffusers lack the
    arguments added since (the learner reads the VAE's geometry without loading the VAE).
    """
    return {**init_defaults(cls_), **cls_.load_config(source, subfolder=subfolder)}


def tiny_stamp(source: str) -> dict[str, Any]:
    """The ``raygrpo_tiny.json`` of a tiny build (empty for real checkpoints)."""
    path = Path(source) / "raygrpo_tiny.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# -------------------------------------------------------------------------------------- preflight
# The file that makes a folder the component it is, by the component's name without its number:
# any one of them must be there. Every other component is a network with a config.json.
_MAIN_FILES = {
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model"),
    "image_processor": ("preprocessor_config.json", "processor_config.json"),
    "processor": ("preprocessor_config.json", "processor_config.json"),  # Qwen-Image-Edit's Qwen2-VL processor
}


def _parse_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        why = f"is not valid JSON ({error.msg}: line {error.lineno} column {error.colno})"
    except UnicodeDecodeError as error:
        why = f"is not text ({error.reason} at byte {error.start})"
    raise ModelFolderError(
        f"{path} {why}: the file is damaged, perhaps by an interrupted download or an edit. Download the pipeline "
        "again (`hf download <id> --local-dir DIR`) or restore the file, then set model.pretrained=DIR."
    )


def check_pretrained(family: str, pretrained: str | os.PathLike) -> None:
    """Fail now, with :class:`ModelNotFoundError` naming the file and the fix, if ``family`` cannot load ``pretrained``.

    For a local folder: ``model_index.json`` parses, every component folder the family loads
    (:data:`PIPELINE_COMPONENTS`) is there with its main file (``config.json``,
    ``scheduler_config.json``, a tokenizer or processor file), and every JSON file in those folders
    parses (a damaged one raises :class:`ModelFolderError` with the JSON error's line and column), and
    every ``.safetensors`` file is as long as its header says (a truncated download is named; the
    tensors themselves are not read). For a hub id: :func:`resolve_pretrained` (cached, or reachable). For
    ``"tiny-random"``: nothing, the actors build it.
    """
    if family not in PIPELINE_COMPONENTS:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(PIPELINE_COMPONENTS)}")
    if str(pretrained) == TINY_RANDOM:
        return
    source = resolve_pretrained(pretrained)
    if not Path(str(pretrained)).expanduser().is_dir():
        return  # a hub id: its files arrive with the download, as each component needs them
    folder = Path(source)
    index = _parse_json(folder / "model_index.json")
    if not isinstance(index, dict):
        raise ModelFolderError(f"{folder / 'model_index.json'} holds a JSON {type(index).__name__}, not the object of a diffusers pipeline")
    # A pipeline's own index settles its optional parts: Wan 2.2 I2V-A14B has no image encoder ([null, null]) and
    # a second expert, transformer_2 (raygrpo/models/wan_experts.py).
    declared = [c for c in PIPELINE_COMPONENTS[family] if index.get(c, [""])[0] is not None]
    for component in declared + [c for c in ("transformer_2",) if (index.get(c) or [None])[0] is not None]:
        subfolder = folder / component
        if not subfolder.is_dir():
            raise _incomplete(str(folder), component)
        main_files = _MAIN_FILES.get(component.rstrip("_0123456789"), ("config.json",))
        if not any((subfolder / name).is_file() for name in main_files):
            raise ModelFolderError(
                f"{subfolder} holds none of {list(main_files)}, so the {component} of the pipeline cannot load: the download "
                "is incomplete. Download the whole pipeline (`hf download <id> --local-dir DIR`) and set model.pretrained=DIR."
            )
        for path in sorted(subfolder.glob("*.json")):
            _parse_json(path)
        for path in sorted(subfolder.glob("*.safetensors")):
            _check_safetensors(path)


def _check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header giving each tensor's byte range, then the
    data: the file must reach the end of the last range. Reads the header only."""
    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                problem = f"its header claims {length} bytes, the file has {size}"
            else:
                header = json.loads(f.read(length))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
                if 8 + length + end > size:
                    problem = f"its tensors need {8 + length + end} bytes, the file has {size}"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        problem = f"its header cannot be read ({type(exc).__name__}: {exc})"
    if problem:
        raise ModelFolderError(
            f"{path} is damaged or cut short: {problem}. Download it again (`hf download <id> --local-dir DIR`) "
            "and set model.pretrained=DIR."
        )


__all__ = [
    "DEFAULT_RESOLUTION",
    "PIPELINE_COMPONENTS",
    "TINY_BUILDERS",
    "TINY_RANDOM",
    "TINY_VERSIONS",
    "ModelFolderError",
    "ModelNotFoundError",
    "check_pretrained",
    "component_config",
    "init_defaults",
    "load_component",
    "pretrained_source",
    "resolve_pretrained",
    "tiny_cache_root",
    "tiny_model_folder",
    "tiny_stamp",
]
