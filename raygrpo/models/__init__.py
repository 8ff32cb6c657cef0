"""Model adapters: one class per image-generator family, plus tiny random builds for tests."""

from raygrpo.models.flux import FluxModel, ModelNotFoundError, quantize_timestep, resolve_pretrained
from raygrpo.models.sd3 import SD3Model
from raygrpo.models.tiny import build_tiny_flux, build_tiny_sd3, tiny_model_folder

MODEL_FAMILIES = {"flux": FluxModel, "sd3": SD3Model}


def load_model(family: str, name_or_path: str, **kwargs):
    """``MODEL_FAMILIES[family].from_pretrained(name_or_path, **kwargs)``, with a clear error for unknown families."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[family].from_pretrained(name_or_path, **kwargs)


__all__ = [
    "MODEL_FAMILIES",
    "FluxModel",
    "ModelNotFoundError",
    "SD3Model",
    "build_tiny_flux",
    "build_tiny_sd3",
    "load_model",
    "quantize_timestep",
    "resolve_pretrained",
    "tiny_model_folder",
]
