"""Qwen-Image-Edit's text-and-image processor, without the video half that transformers ties to torchvision.

``QwenImageEditPipeline`` tokenizes the prompt and the reference image with a
``transformers.Qwen2VLProcessor``: the image processor cuts the image into 14 px patches and the
processor repeats ``<|image_pad|>`` once per merged 2x2 patch group, so the Qwen2.5-VL encoder sees
one token per group. transformers 5 builds that processor only together with a video processor,
which needs torchvision (absent on the CPU machines here, see /work/shared/ENVIRONMENT.md). The
pipeline never passes videos, so :class:`QwenImageTextProcessor` is ``Qwen2VLProcessor`` with its
image processor and tokenizer only: the same ``__call__`` (transformers' own image-token expansion),
no re-implementation. The adapter builds it from the pipeline folder's ``processor/`` image config
and ``tokenizer/`` on every machine, with or without torchvision, so there is one way to load it.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoImageProcessor, Qwen2VLProcessor


class QwenImageTextProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` over an image processor and a tokenizer; ``videos`` are not accepted."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs: Any):
        # transformers reads a processor's parts from its __init__ signature: no video_processor here.
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, source: str, subfolder: str = "processor", *, tokenizer: Any, **kwargs: Any) -> QwenImageTextProcessor:
        """The pipeline folder's ``processor/`` image processor (``Qwen2VLImageProcessor``, or its PIL twin where
        torchvision is missing, as transformers itself falls back) with ``tokenizer`` (the folder's ``tokenizer/``:
        the same Qwen2 vocabulary the processor folder repeats)."""
        return cls(AutoImageProcessor.from_pretrained(source, subfolder=subfolder, **kwargs), tokenizer)


__all__ = ["QwenImageTextProcessor"]
