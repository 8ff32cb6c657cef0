"""Dry runs of every real preset at its true widths, sequence lengths, resolution, frames, group and micro-batch
sizes (raygrpo/plan/measure.py): one rollout step and one learner step through the real adapters on fake tensors.

One block of each kind per network (``depth="shallow"``) keeps it fast; every layer's shapes are the real ones,
so shape, dtype and device errors of the real sizes surface here. The video VAEs (tiled / causal decoders that
loop over tiles and frames) are dry-run at full size by the planner only.
"""

from __future__ import annotations


import pytest

from raygrpo.config import load_config
from raygrpo.models import VIDEO_FAMILIES
from raygrpo.plan.architecture import architecture
from raygrpo.plan.measure import measure

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("without_process_group")

REAL_PRESETS = ["flux", "flux_dgpo", "sd3", "sd3_dgpo", "sd15", "hunyuan_t2v", "wan_i2v", "wan22_t2v", "wan22_i2v", "flux2_klein", "flux_kontext", "qwen_image"]


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_preset_dry_runs_at_real_size(name):
    config = load_config(ROOT / "cluster" / f"{name}.yaml")
    arch = architecture(config.model.family, config.model.pretrained)
    measured = measure(config, arch, depth="shallow", track=False, media=config.model.family not in VIDEO_FAMILIES)
    rollout = measured.rollout
    assert set(rollout.params) >= {arch.network, "vae"}, "the rollout worker holds the network and the VAE"
    assert all(size > 0 for size in rollout.params.values())
    # One latent per sample at the preset's size: 16 channels for the flow families (FLUX.2: 32), 4 for SD's VAE.
    h, w = config.model.height // 8, config.model.width // 8
    frames = (config.model.num_frames - 1) // 4 + 1 if config.model.num_frames else 1
    channels = 4 if config.model.family == "sd" else 32 if config.model.family == "flux2" else 16  # FLUX.2's VAE: 32
    assert rollout.latent_bytes == 4 * channels * frames * h * w
    assert rollout.conditioning_bytes > 0
    assert set(measured.learner) == {config.learner.gradient_checkpointing}
    assert all(m.optimizer_bytes > 0 for m in measured.learner.values()), "AdamW made states for the trained shards"


def test_a_size_the_network_cannot_take_fails_the_dry_run():
    """SD3's learned position table bounds the image size: the dry run says so before any GPU would."""
    config = load_config(ROOT / "cluster" / "sd3.yaml", ["model.height=6400", "model.width=512"])
    arch = architecture(config.model.family, config.model.pretrained)
    with pytest.raises(ValueError, match="position table allows images up to 6144 px"):
        measure(config, arch, depth="shallow", track=False, media=False)
