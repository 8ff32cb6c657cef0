"""A checkpoint's architecture without its weights: component configs, and fake-tensor modules built from them.

:func:`architecture` finds the ``config.json`` numbers of every component of ``model.pretrained``: the
bundled files of ``raygrpo/models/configs/`` for the presets' hub ids, a local pipeline folder's own
files, or the family's tiny build. :func:`build_component` builds one component from them at its true
size under an active ``FakeTensorMode`` (no memory, no compute), or with fewer repeated blocks
(:class:`Depth`), which the planner extrapolates from (raygrpo/plan/measure.py says why that is exact).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raygrpo.models.hub import PIPELINE_COMPONENTS, TINY_RANDOM, tiny_model_folder

CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"

# The repeated blocks of each trained network, by config key: how many of each kind the network has.
# SD3's last joint block is special (context_pre_only) and always one; MMDiT-X (SD3.5) puts dual attention
# in the blocks listed in dual_attention_layers, the first ones.
BLOCK_KEYS = {
    "FluxTransformer2DModel": ("num_layers", "num_single_layers"),
    "Flux2Transformer2DModel": ("num_layers", "num_single_layers"),
    "HunyuanVideoTransformer3DModel": ("num_layers", "num_single_layers"),
    "WanTransformer3DModel": ("num_layers",),
    "SkyReelsV2Transformer3DModel": ("num_layers",),
    "QwenImageTransformer2DModel": ("num_layers",),
    "SD3Transformer2DModel": ("dual_attention_blocks", "joint_blocks"),
}


class ArchitectureError(ValueError):
    """No architecture config for ``model.pretrained``; the message lists the bundled ones."""


@dataclass(frozen=True)
class Architecture:
    """Every component's constructor config (``_class_name`` included), as ``from_pretrained`` would build it."""

    family: str
    source: str  # the bundled file, the folder, or "tiny-random"
    components: dict[str, dict[str, Any]]

    @property
    def network(self) -> str:
        """The trained network's component name."""
        return "unet" if "unet" in self.components else "transformer"

    def blocks(self) -> dict[str, int]:
        """How many repeated blocks of each kind the trained network has (empty: not a block stack, e.g. a UNet)."""
        config = self.components[self.network]
        keys = BLOCK_KEYS.get(config["_class_name"], ())
        if config["_class_name"] == "SD3Transformer2DModel":
            dual = len(config.get("dual_attention_layers") or ())
            return {"dual_attention_blocks": dual, "joint_blocks": config["num_layers"] - 1 - dual}
        return {key: int(config[key]) for key in keys}


def bundled() -> dict[str, Path]:
    """Hub id -> bundled architecture file (every id a file names, its aliases included)."""
    found = {}
    for path in sorted(CONFIGS.glob("*/*.json")):
        data = json.loads(path.read_text())
        for hub_id in [data["hub_id"], *data.get("also", [])]:
            found[hub_id] = path
    return found


def architecture(family: str, pretrained: str) -> Architecture:
    """The component configs of ``pretrained`` for ``family``; :class:`ArchitectureError` if there are none."""
    if family not in PIPELINE_COMPONENTS:
        raise ArchitectureError(f"unknown model family {family!r}; known: {sorted(PIPELINE_COMPONENTS)}")
    folder = Path(tiny_model_folder(family)) if pretrained == TINY_RANDOM else Path(pretrained).expanduser()
    if folder.is_dir():
        return Architecture(family, pretrained, _folder_components(folder, family))
    files = bundled()
    if pretrained not in files:
        raise ArchitectureError(
            f"no architecture config for model.pretrained={pretrained!r}: the planner knows {sorted(files)} "
            f"(raygrpo/models/configs/), local pipeline folders and tiny-random. Add its config.json numbers under "
            f"raygrpo/models/configs/{family}/ (see the README there), or point model.pretrained at a downloaded folder."
        )
    data = json.loads(files[pretrained].read_text())
    if files[pretrained].parent.name != family:
        raise ArchitectureError(f"{pretrained} is a {files[pretrained].parent.name} checkpoint, but model.family is {family!r}")
    return Architecture(family, str(files[pretrained].relative_to(CONFIGS.parents[1])), data["components"])


def _folder_components(folder: Path, family: str) -> dict[str, dict[str, Any]]:
    components = {}
    for name in PIPELINE_COMPONENTS[family]:
        for file in ("config.json", "scheduler_config.json"):
            path = folder / name / file
            if path.is_file():
                config = json.loads(path.read_text())
                if "_class_name" not in config and config.get("architectures"):
                    config["_class_name"] = config["architectures"][0]  # transformers names its class so
                components[name] = config
    return components


def scaled(arch: Architecture, blocks: dict[str, int]) -> Architecture:
    """``arch`` with the trained network cut to ``blocks`` repeated blocks of each kind (see :data:`BLOCK_KEYS`)."""
    config = dict(arch.components[arch.network])
    if config["_class_name"] == "SD3Transformer2DModel":
        dual, joint = blocks["dual_attention_blocks"], blocks["joint_blocks"]
        config["num_layers"] = dual + joint + 1
        config["dual_attention_layers"] = list(range(dual))
    else:
        config.update(blocks)
    return Architecture(arch.family, arch.source, {**arch.components, arch.network: config})


# Config keys that count repeated layers of the same width, at the top of a component's config or in its nested
# ``text_config`` / ``vision_config``: transformers' encoders (CLIP and T5 / UMT5 "num_hidden_layers" / "num_layers",
# Llama, Qwen3, Mistral, Qwen2.5-VL's vision tower "depth") and the diffusers UNet's / 2-D VAEs' resnets per level
# ("layers_per_block"; a level's first layer changes the width, the ones after it repeat it).
LAYER_KEYS = ("num_hidden_layers", "num_layers", "depth", "layers_per_block")


def shallow(arch: Architecture) -> Architecture:
    """``arch`` with one repeated layer of each kind in every component, for the dry-run test (``measure(depth="shallow")``).

    The trained network keeps one block of each kind (:func:`scaled`; a UNet, which has no block stack, one resnet
    and attention layer per level: ``layers_per_block`` 1, up levels 2); every other component one layer per
    :data:`LAYER_KEYS` count: the text and image encoders (FLUX's T5 has 24 layers and CLIP 12: about a third of a
    shallow rollout dry run before), a second expert, the VAE's resnets per level. Every width, level, head count,
    sequence length, resolution and batch size stays the real one, so the same shape, dtype and device errors
    surface; memory and FLOPs are not the model's (the planner runs ``depth="full"``, never this)."""
    blocks = arch.blocks()
    cut = scaled(arch, {k: min(1, n) for k, n in blocks.items()}) if blocks else arch
    components = {
        name: config if name == arch.network and blocks else _one_layer_each(config) for name, config in cut.components.items()
    }  # fmt: skip
    return Architecture(arch.family, arch.source, components)


def _one_layer_each(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: min(1, v) if k in LAYER_KEYS and isinstance(v, int) else v for k, v in config.items()}
    for nested in ("text_config", "vision_config"):
        if isinstance(config.get(nested), dict):
            out[nested] = _one_layer_each(config[nested])
    return out


def _library_class(name: str) -> type:
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        cls = getattr(library, name, None)
        if cls is not None:
            return cls
    raise ArchitectureError(f"no diffusers or transformers class named {name!r}")


def build_component(arch: Architecture, name: str, dtype: torch.dtype) -> Any:
    """Component ``name`` of ``arch`` in eval mode without gradients, its floating tensors in ``dtype``.

    Call it inside a ``FakeTensorMode`` for a weightless module. The dtype is set as torch's default
    while building, not cast afterwards: ``Module.to`` cannot swap fake parameters in place.
    Schedulers are real (they are small and read their tables on the host).
    """
    config = {k: v for k, v in arch.components[name].items() if not k.startswith("_") or k == "_class_name"}
    cls = _library_class(config.pop("_class_name"))
    if name == "scheduler":
        return cls.from_config(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if hasattr(cls, "config_class") and not hasattr(cls, "from_config"):  # transformers
            known = cls.config_class().to_dict()
            module = cls(cls.config_class(**{k: v for k, v in config.items() if k in known}))
        else:
            module = cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return module.eval().requires_grad_(False)
