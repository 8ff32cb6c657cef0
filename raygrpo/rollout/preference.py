"""The rollout role of offline preference training (Diffusion-DPO, DCPO: raygrpo/algorithms/dcpo.py).

:class:`PreferenceRolloutWorker` is a :class:`~raygrpo.rollout.worker.RolloutWorker` that, for each prompt group,

1. samples ``group_size`` evaluation images of the current policy with the algorithm's ODE sampler, as any rollout
   worker does: the rewards score them, so the reward metrics, galleries and dashboard show how the policy does.
   Only the pairs ``algorithm.eval_groups`` / ``eval_every`` pick do (all by default); the others skip this step;
2. encodes the group's preference pair (record ``prompt_id`` of ``data.prompt_file``): both images through the VAE
   into clean latents in the family's flow coordinates (:func:`image_latents`), both captions through the text
   encoders, and ships them with the group's Rollout (:class:`~raygrpo.data.preferences.PreferenceRollout`).

It is the data role because it already holds the VAE and the text encoders, which the learner does not load. Encoded
pairs are kept (up to ``CACHE_PAIRS``), so a pair seen again in a later epoch is not encoded again.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict

import numpy as np
import torch

from raygrpo.algorithms.dcpo import evaluates
from raygrpo.config import Config
from raygrpo.contracts import GroupMedia, PromptGroup, RolloutInfo
from raygrpo.data.preferences import EncodedPair, PreferenceRollout, check_captions, load_preferences, pair_captions
from raygrpo.rollout.worker import RolloutWorker

OFFLINE_ALGORITHMS = ("diffusion_dpo", "dcpo")  # algorithm names whose rollout role is this worker
CACHE_PAIRS = 4096  # encoded pairs kept per worker (SD 1.5 at 512 px: about 0.6 MB each)


def image_latents(model, images: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, H, W, 3]`` uint8 images to clean latents ``[B, *latent_shape]`` float32 in the family's flow coordinates:
    the inverse of the adapter's ``decode`` (a VAE latent sampled with ``generator``, then FLUX/SD3 ``(z - shift) *
    scale``, FLUX packed into tokens; SD ``z * scale``)."""
    family, vae = model.family, model.vae
    if family not in ("flux", "sd3", "sd"):
        raise ValueError(f"preference pairs are images; model.family {family!r} has no image latents here (flux, sd3, sd)")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator).float()  # [B, C, h, w]
    if family == "sd":
        return (z * vae.config.scaling_factor).cpu()
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    if family == "flux":
        from diffusers import FluxPipeline

        z = FluxPipeline._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3])  # [B, S, D]
    return z.cpu()


class PreferenceRolloutWorker(RolloutWorker):
    def __init__(self, config: Config):
        super().__init__(config)
        self.records = load_preferences(config.data.prompt_file)
        self.captions = getattr(config.algorithm, "captions", None)  # None: Diffusion-DPO (the prompt for both)
        check_captions(self.records, self.captions)
        self.encoded: OrderedDict[int, EncodedPair] = OrderedDict()

    @torch.no_grad()
    def generate(self, group: PromptGroup) -> tuple[PreferenceRollout, GroupMedia, RolloutInfo]:
        """The evaluation samples of ``group`` and, with them, its encoded preference pair; a pair the step does not
        evaluate (:func:`~raygrpo.algorithms.dcpo.evaluates`) is only encoded."""
        if not evaluates(group, self.config.algorithm, self.config.train.steps):
            return self._encoded_only(group)
        rollout, media, info = super().generate(group)
        pair = self._encoded(group)
        fields = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
        rollout = PreferenceRollout(**fields, pair=pair)
        return rollout, media, dataclasses.replace(info, rollout_bytes=rollout.nbytes)

    def _encoded_only(self, group: PromptGroup) -> tuple[PreferenceRollout, GroupMedia, RolloutInfo]:
        """The pair alone: no sampling, no decoding. The group's G members are placeholders (zero latents, which the
        loss never reads) and its media hold no image, which the rewards answer with ``Scores.not_evaluated``. Stamped
        with the version the group asks for: nothing in it depends on the policy."""
        start = time.perf_counter()
        pair = self._encoded(group)
        sigmas = self.model.sigma_grid(self.spec.sampler, self.config.rollout.num_steps, self.config.rollout.shift)  # [T+1]
        placeholders = np.zeros((group.group_size, *pair.latents.shape[1:]), np.float32)  # [G, ...]
        rollout = PreferenceRollout(group, group.policy_version, pair.preferred, sigmas.cpu().numpy(), placeholders, pair=pair)
        media = GroupMedia(group=group, images=np.zeros((0, self.model.height, self.model.width, 3), np.uint8))
        seconds = time.perf_counter() - start
        return rollout, media, RolloutInfo(group.group_id, group.policy_version, seconds, rollout.nbytes, busy_seconds=seconds)

    def _encoded(self, group: PromptGroup) -> EncodedPair:
        if group.prompt_id in self.encoded:
            self.encoded.move_to_end(group.prompt_id)
            return self.encoded[group.prompt_id]
        record = self.records[group.prompt_id]
        size = (self.model.height, self.model.width)
        images = np.stack([record.preferred.load(size), record.rejected.load(size)])  # [2, H, W, 3]
        latents = image_latents(self.model, images, torch.Generator(device=self.model.vae.device).manual_seed(group.seed))
        z_w, z_l = pair_captions(record, self.captions)
        pair = EncodedPair(latents.numpy(), self.model.encode_prompt(z_w), self.model.encode_prompt(z_l))
        self.encoded[group.prompt_id] = pair
        if len(self.encoded) > CACHE_PAIRS:
            self.encoded.popitem(last=False)
        return pair
