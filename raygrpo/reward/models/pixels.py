"""The reward models' image preprocessing redone in torch, so that a reward is differentiable in its pixels.

The reward pools hand uint8 images to transformers' PIL image processors (``CLIPImageProcessorPil``: resize the
short side, centre crop, rescale by 1/255, normalise by mean/std; transformers ``image_processing_backends.py``,
``image_transforms.py``). :class:`TorchImageProcessor` reads those settings from the processor object and applies the
same steps to float pixels ``[n, 3, H, W]`` in [0, 1] with ``torch.nn.functional.interpolate``, so gradients reach the
pixels (the learner's path, raygrpo/reward/differentiable.py).

What differs from the PIL path, and why the scores agree only to a tolerance rather than exactly:

* no uint8 rounding: PIL resamples uint8 images, rounding and clipping to [0, 255] after each of its two separable
  passes (horizontal, then vertical); the torch path makes the same two passes and clips after each, but keeps floats;
* the filter: ``antialias=True`` gives torch's port of PIL's separable resampling (the bicubic kernel with
  a = -0.5, the support widened by the scale factor when downsampling), so the weights are PIL's; without
  antialias torch would use a = -0.75 and no widening, which is far off when downsampling (512 -> 224 px).

Sizes are computed as transformers does: the short side becomes ``shortest_edge`` and the long side
``int(shortest_edge * long / short)``; the crop starts at ``(H - h) // 2``, ``(W - w) // 2``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# PIL resampling filters (PIL.Image.Resampling values) -> torch modes whose antialiased form is PIL's filter.
_PIL_TO_TORCH = {2: "bilinear", 3: "bicubic"}
_PIL_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


def _field(size: Any, key: str) -> Any:
    """``size[key]``: transformers 5 holds sizes in a ``SizeDict`` (attributes), older versions in a plain dict."""
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


@dataclass(frozen=True)
class TorchImageProcessor:
    """A CLIP-style image processor's steps on float pixels, differentiable.

    ``shortest_edge`` or ``size`` (height, width): the resize (None: no resize); ``mode``: torch's interpolation
    (PIL bicubic -> ``bicubic``, bilinear -> ``bilinear``, both antialiased); ``crop`` (height, width) or None;
    ``scale``: what a pixel in [0, 1] is multiplied by (255 x the processor's ``rescale_factor``, or 255 when it
    does not rescale); ``mean`` / ``std``: per-channel normalisation, or None.
    """

    shortest_edge: int | None
    size: tuple[int, int] | None
    mode: str
    crop: tuple[int, int] | None
    scale: float
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, processor: Any) -> TorchImageProcessor:
        """The settings of a transformers image processor object (``size``, ``resample``, ``crop_size``, ...).

        Raises ValueError for settings without a torch form here (a resize by longest edge or pixel budget, a
        filter other than bicubic or bilinear)."""
        name = type(processor).__name__
        shortest, size, mode = None, None, "bicubic"
        if getattr(processor, "do_resize", False):
            target = processor.size
            resample = int(getattr(processor, "resample", 2))
            if resample not in _PIL_TO_TORCH:
                raise ValueError(
                    f"{name} resizes with PIL's {_PIL_NAMES.get(resample, resample)} filter, which has no torch form here "
                    "(bicubic and bilinear do): score this reward through the pools (reward_source: latent)"
                )
            mode = _PIL_TO_TORCH[resample]
            if _field(target, "shortest_edge") and not _field(target, "longest_edge"):
                shortest = int(_field(target, "shortest_edge"))
            elif _field(target, "height") and _field(target, "width"):
                size = (int(_field(target, "height")), int(_field(target, "width")))
            else:
                raise ValueError(f"{name} resizes to {target}, which has no torch form here (shortest_edge or height/width do)")
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop = (int(_field(processor.crop_size, "height")), int(_field(processor.crop_size, "width")))
        scale = 255.0 * float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else 255.0
        normalize = getattr(processor, "do_normalize", False)
        mean = tuple(float(m) for m in processor.image_mean) if normalize else None
        std = tuple(float(s) for s in processor.image_std) if normalize else None
        return cls(shortest, size, mode, crop, scale, mean, std)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` after the resize, as transformers' ``get_resize_output_image_size`` computes it."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [n, 3, H, W]`` in [0, 1] -> the model's ``pixel_values [n, 3, h, w]`` (float32, pixels' device)."""
        x = pixels.float()  # [n, 3, H, W]
        (height, width), (new_h, new_w) = x.shape[-2:], self.resized_size(x.shape[-2], x.shape[-1])
        # PIL's two separable passes, horizontal then vertical, each clipped to the pixel range: one 2-D pass would
        # keep the first pass's overshoot (up to 12-22 uint8 levels apart on noise images instead of about 1).
        if new_w != width:
            x = F.interpolate(x, size=(height, new_w), mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        if new_h != height:
            x = F.interpolate(x, size=(new_h, new_w), mode=self.mode, align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            (h, w), (H, W) = self.crop, x.shape[-2:]
            if h > H or w > W:
                raise ValueError(f"the processor crops {h}x{w} from a {H}x{W} image (it would pad): no torch form for that here")
            top, left = (H - h) // 2, (W - w) // 2
            x = x[..., top : top + h, left : left + w]  # [n, 3, h, w]
        x = x * self.scale
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
            x = (x - mean) / std
        return x


def check_pixels(name: str, pixels: torch.Tensor, prompts: list[str]) -> None:
    """ValueError naming reward ``name`` unless ``pixels`` is ``[n, 3, H, W]`` with one prompt per image."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"reward {name!r}: pixels must be [n, 3, H, W] in [0, 1], got shape {tuple(pixels.shape)}")
    if len(prompts) != len(pixels):
        raise ValueError(f"reward {name!r}: {len(pixels)} images but {len(prompts)} prompts")


__all__ = ["TorchImageProcessor", "check_pixels"]
