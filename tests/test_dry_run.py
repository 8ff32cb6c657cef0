"""Dry runs of every real preset at its true widths, sequence lengths, resolution, frames, group and micro-batch
sizes (raygrpo/plan/measure.py): one rollout step and one learner step through the real adapters on fake tensors.

One layer of each kind per component (``depth="shallow"``: the network's blocks, a UNet's resnets per level, the
encoders' layers, the VAE's resnets) keeps it fast; every layer's shapes are the real ones, so shape, dtype and
device errors of the real sizes surface here. The video VAEs (tiled / causal decoders that
loop over tiles and frames) are dry-run at full size by the planner only.
"""

from __future__ import annotations

import pytest

from raygrpo.config import load_config
from raygrpo.models import VIDEO_FAMILIES
from raygrpo.plan.architecture import architecture, shallow
from raygrpo.plan.measure import measure

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("without_process_group")

REAL_PRESETS = ["flux", "flux_dgpo", "sd3", "sd3_dgpo", "sd15", "hunyuan_t2v", "wan_i2v", "wan22_t2v", "wan22_i2v", "flux2_klein", "flux_kontext", "qwen_image", "sd15_di_star", "sd21_rg_lcd"]


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


def test_the_shallow_architecture_keeps_every_width_and_one_layer_of_each_kind():
    """What the dry runs above build: every component cut to one repeated layer (FLUX's T5 and CLIP, Qwen2.5-VL's
    nested language model and vision tower, SD's UNet and VAE resnets per level), every width the real one; the
    planner's full-depth architecture is left as it is."""
    flux = architecture("flux", "black-forest-labs/FLUX.1-dev")
    cut = shallow(flux)
    assert cut.blocks() == {"num_layers": 1, "num_single_layers": 1} and flux.blocks() == {"num_layers": 19, "num_single_layers": 38}
    assert (cut.components["text_encoder"]["num_hidden_layers"], cut.components["text_encoder_2"]["num_layers"]) == (1, 1)
    assert (flux.components["text_encoder"]["num_hidden_layers"], flux.components["text_encoder_2"]["num_layers"]) == (12, 24)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        widths = {k: v for k, v in flux.components[name].items() if k not in ("num_hidden_layers", "num_layers", "layers_per_block")}
        assert {k: cut.components[name][k] for k in widths} == widths
    qwen = shallow(architecture("qwen_image", "Qwen/Qwen-Image")).components["text_encoder"]
    assert qwen["text_config"]["num_hidden_layers"] == qwen["vision_config"]["depth"] == 1 and qwen["text_config"]["hidden_size"] == 3584
    sd = shallow(architecture("sd", "CompVis/stable-diffusion-v1-4")).components
    assert sd["unet"]["layers_per_block"] == sd["vae"]["layers_per_block"] == 1 and sd["unet"]["block_out_channels"] == [320, 640, 1280, 1280]
