"""Neural reward models (one file per family): CLIP score, PickScore, the LAION aesthetic predictor and HPS v2.1, plus a
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
reference implementations do it. :meth:`NeuralReward.score_pixels` is the same score as a differentiable function
of float pixels, the preprocessing redone in torch (``pixels.py``), for the learner (raygrpo/reward/differentiable.py).

open_clip is not used: it imports torchvision at import time, and the torchvision wheels that pip
finds next to a CPU build of torch 2.13 fail to load (``operator torchvision::nms does not exist``).
HPS v2.1, an open_clip checkpoint, is therefore converted into a transformers ``CLIPModel`` (see
:func:`openclip_to_transformers`).
"""

from __future__ import annotations

from raygrpo.reward.base import Reward
from raygrpo.reward.models.clip import (
    Aesthetic,
    AestheticHead,
    ClipEncoder,
    ClipScore,
    HpsV21,
    PickScore,
    load_clip_encoder,
    openclip_to_transformers,
)
from raygrpo.reward.models.imagereward import IMAGEREWARD_ARCHITECTURE, ImageRewardScore, imagereward_to_transformers
from raygrpo.reward.models.loading import (
    OPENCLIP_VIT_H_14,
    NeuralReward,
    NeuralRewardParams,
    RewardModelError,
    check_file_source,
    check_model_source,
    fetch_file,
)
from raygrpo.reward.models.video import FrameAverage

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
