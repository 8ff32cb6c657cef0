"""Model adapters: one class per generator family (the contract: :class:`~raygrpo.models.base.ModelAdapter`),
where models come from (:mod:`raygrpo.models.hub`), and tiny random builds for tests."""

from raygrpo.models.base import ModelAdapter, quantize_timestep
from raygrpo.models.flux import FluxModel
from raygrpo.models.flux2 import Flux2Model
from raygrpo.models.flux_kontext import FluxKontextModel
from raygrpo.models.hub import TINY_RANDOM, ModelFolderError, ModelNotFoundError, check_pretrained, resolve_pretrained, tiny_model_folder
from raygrpo.models.hunyuan_video import HunyuanVideoModel
from raygrpo.models.qwen_image import QwenImageEditModel, QwenImageModel
from raygrpo.models.sd import StableDiffusionModel
from raygrpo.models.sd3 import SD3Model
from raygrpo.models.tiny import build_tiny_flux, build_tiny_sd3
from raygrpo.models.wan import WanI2VModel
from raygrpo.models.wan_t2v import WanT2VModel

MODEL_FAMILIES: dict[str, type[ModelAdapter]] = {
    "flux": FluxModel,
    "sd3": SD3Model,
    "sd": StableDiffusionModel,
    "hunyuan_video": HunyuanVideoModel,
    "wan_i2v": WanI2VModel,
    "wan_t2v": WanT2VModel,
    "flux_kontext": FluxKontextModel,
    "flux2": Flux2Model,
    "qwen_image": QwenImageModel,
    "qwen_image_edit": QwenImageEditModel,
}
VIDEO_FAMILIES = {"hunyuan_video", "wan_i2v", "wan_t2v"}  # latents [C, F_lat, h, w]; decode gives [B, F, H, W, 3]
EXPERT_FAMILIES = {"wan_i2v", "wan_t2v"}  # Wan 2.2 A14B checkpoints hold two experts: from_pretrained(train_expert=...)
IMAGE_CONDITIONED_FAMILIES = {"wan_i2v", "flux_kontext", "qwen_image_edit"}  # encode_prompt(prompt, image): each prompt group carries its image


def load_model(family: str, name_or_path: str, **kwargs) -> ModelAdapter:
    """``MODEL_FAMILIES[family].from_pretrained(name_or_path, **kwargs)``, with a clear error for unknown families."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(MODEL_FAMILIES)}")
    # Callers pass the config's num_frames whatever the family: None means the family's default, and
    # image families take no such argument.
    if family not in VIDEO_FAMILIES and kwargs.get("num_frames") is not None:
        raise ValueError(f"model.num_frames is for video families ({sorted(VIDEO_FAMILIES)}), not {family!r}")
    if kwargs.get("num_frames", 0) is None or family not in VIDEO_FAMILIES:
        kwargs.pop("num_frames", None)
    # model.train_expert picks one of Wan 2.2's two experts (raygrpo/models/wan_experts.py); other families have one network.
    if kwargs.get("train_expert", "high") != "high" and family not in EXPERT_FAMILIES:
        raise ValueError(f"model.train_expert is for the Wan families ({sorted(EXPERT_FAMILIES)}), not {family!r}")
    if family not in EXPERT_FAMILIES:
        kwargs.pop("train_expert", None)
    return MODEL_FAMILIES[family].from_pretrained(name_or_path, **kwargs)


__all__ = [
    "IMAGE_CONDITIONED_FAMILIES",
    "MODEL_FAMILIES",
    "TINY_RANDOM",
    "VIDEO_FAMILIES",
    "Flux2Model",
    "FluxKontextModel",
    "FluxModel",
    "HunyuanVideoModel",
    "ModelAdapter",
    "ModelFolderError",
    "ModelNotFoundError",
    "QwenImageEditModel",
    "QwenImageModel",
    "SD3Model",
    "StableDiffusionModel",
    "WanI2VModel",
    "WanT2VModel",
    "build_tiny_flux",
    "build_tiny_sd3",
    "check_pretrained",
    "load_model",
    "quantize_timestep",
    "resolve_pretrained",
    "tiny_model_folder",
]
