"""Wan 2.2: the text-to-video adapter (wan_t2v), the two experts of T2V-/I2V-A14B, TI2V-5B's per-token timesteps.

Against diffusers' own pipelines, through ``from_pretrained`` of the saved tiny builds (raygrpo/models/tiny_wan22.py):
the adapter's velocity is the pipeline's network call of the expert the pipeline would pick, decode is the pipeline's
output path; the learner view holds only the trained expert and trains only its noise levels; DanceGRPO (first ratio
exactly 1) and DGPO end to end in process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline

from raygrpo.algorithms.dancegrpo import trained_steps
from raygrpo.algorithms.dgpo import training_sigmas
from raygrpo.config import ModelConfig, load_config
from raygrpo.contracts import ConditioningBatch
from raygrpo.models import ModelNotFoundError, WanI2VModel, WanT2VModel, load_model, quantize_timestep, tiny_model_folder
from raygrpo.sampling import sigma_grid

from .conftest import run_main

PROMPT = "a red fox running through a snowy forest"
SIZE = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 32}
IMAGE = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def t2v() -> tuple[WanT2VModel, WanPipeline]:
    folder = tiny_model_folder("wan_t2v")
    return load_model("wan_t2v", str(folder), **SIZE), WanPipeline.from_pretrained(folder)


def _pipeline_call(network, latents, sigmas, embeds, image_latents=None):
    """The pipeline's network call: ``t = sigma * 1000`` at DanceGRPO's quantised sigma, image latents along the channels."""
    hidden = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
    return network(hidden_states=hidden, timestep=quantize_timestep(sigmas) * 1000, encoder_hidden_states=embeds, return_dict=False)[0]


def test_each_sample_goes_to_the_expert_that_owns_its_timestep(t2v):
    model, pipe = t2v
    assert pipe.config.boundary_ratio == 0.875 and model.experts.frozen is not None and model.network_component == "transformer"
    cond = ConditioningBatch.of(model.encode_prompt(PROMPT), 3)
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=32)
    np.testing.assert_allclose(cond.prompt_embeds[0].numpy(), embeds[0].numpy(), atol=1e-6)
    latents = model.initial_noise(torch.Generator().manual_seed(0), 3)
    sigmas = torch.tensor([0.95, 0.5, 0.875])  # high, low, and the boundary itself (the pipeline's t >= 875: high)
    with torch.no_grad():
        velocity = model.velocity(latents, sigmas, cond, guidance_scale=1.0)
        high = _pipeline_call(pipe.transformer, latents, sigmas, cond.prompt_embeds)
        low = _pipeline_call(pipe.transformer_2, latents, sigmas, cond.prompt_embeds)
    torch.testing.assert_close(velocity[[0, 2]], high[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(velocity[1], low[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(high[1], low[1], atol=1e-4)  # the experts really differ
    # Decode is the pipeline's output path: latents * std + mean through the VAE, "np" frames to uint8.
    with torch.no_grad():
        video = pipe(prompt_embeds=cond.prompt_embeds[:1], latents=latents[:1], num_inference_steps=1, guidance_scale=1.0,
                     height=32, width=32, num_frames=5, output_type="latent").frames  # fmt: skip
        expected = pipe.video_processor.postprocess_video(
            pipe.vae.decode(video * (1 / (1 / torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)))
                            + torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1), return_dict=False)[0], output_type="np")  # fmt: skip
    np.testing.assert_array_equal(model.decode(video), (np.asarray(expected) * 255).round().astype(np.uint8))


def test_the_learner_holds_and_trains_only_its_expert(t2v):
    model, _ = t2v
    folder = str(tiny_model_folder("wan_t2v"))
    learner = load_model("wan_t2v", folder, load_text_encoders=False, load_vae=False, train_expert="low", guidance_scale=1.0, **SIZE)
    assert learner.experts.frozen is None and learner.network_component == "transformer_2"
    grid = sigma_grid("dance_sde", 8, 3.0)  # [1, .95, .9, .83, ...]: levels 0-2 high-noise, 3-7 low
    owned = learner.trainable_levels(grid[:-1])
    assert owned.tolist() == [False] * 3 + [True] * 5 and (model.trainable_levels(grid[:-1]) == ~owned).all()
    cond = ConditioningBatch.of(model.encode_prompt(PROMPT), 1)
    latents = model.initial_noise(torch.Generator().manual_seed(1), 1)
    with torch.no_grad():  # the learner's expert computes what the rollout's computes at its levels
        assert torch.equal(learner.velocity(latents, grid[4:5], cond), model.velocity(latents, grid[4:5], cond, guidance_scale=1.0))
    with pytest.raises(RuntimeError, match="high-noise expert.*did not load"):
        learner.velocity(latents, grid[:1], cond)
    # DanceGRPO draws the trained expert's steps only (of the first T - 1), DGPO its noise levels only.
    rng = np.random.default_rng(0)
    for _ in range(20):
        steps = trained_steps(8, 0.6, rng, owned.numpy())
        assert len(steps) == 2 and set(steps.tolist()) <= {3, 4, 5, 6}
    algo = load_config("cluster/tiny_wan_t2v.yaml", ["algorithm={name: dgpo, sampler: dpmpp_2m}"]).algorithm
    sigmas = training_sigmas(algo, grid, 3.0, rng, learner.trainable_levels)
    assert learner.trainable_levels(sigmas).all() and len(sigmas) == algo.num_train_timesteps


def test_ti2v_5b_feeds_a_timestep_per_token():
    folder = tiny_model_folder("wan22_ti2v")
    model, pipe = load_model("wan_t2v", str(folder), **SIZE), WanPipeline.from_pretrained(folder)
    assert pipe.config.expand_timesteps and model.expand_timesteps and model.experts.boundary_ratio is None
    assert model.latent_shape == (12, 2, 2, 2)  # Wan 2.2's VAE: x16 space (2x2 patchify), x4 time
    cond = ConditioningBatch.of(model.encode_prompt(PROMPT), 2)
    latents, sigmas = model.initial_noise(torch.Generator().manual_seed(2), 2), torch.tensor([0.7, 0.3])
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"].shape), with_kwargs=True)
    with torch.no_grad():
        velocity = model.velocity(latents, sigmas, cond, guidance_scale=1.0)
        t = (quantize_timestep(sigmas) * 1000)[:, None].expand(2, 2)  # [B, F_lat * h/2 * w/2]: the pipeline's mask * t
        expected = pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=cond.prompt_embeds, return_dict=False)[0]
    hook.remove()
    torch.testing.assert_close(velocity, expected, atol=1e-5, rtol=1e-5)
    assert seen == [torch.Size([2, 2])]
    with pytest.raises(ValueError, match="one transformer"):
        load_model("wan_t2v", str(folder), train_expert="low", **SIZE)


def test_wan22_i2v_a14b_has_no_clip_and_two_experts(tmp_path):
    folder = tiny_model_folder("wan22_i2v")
    model = load_model("wan_i2v", str(folder), **SIZE)
    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    assert isinstance(model, WanI2VModel) and model.image_encoder is None and pipe.config.boundary_ratio == 0.9
    cond = model.encode_prompt(PROMPT, IMAGE)
    assert cond.image_embeds is None and cond.image_latents.shape == (4 + 8, 2, 4, 4)
    batch = ConditioningBatch.of(cond, 2)
    latents, sigmas = model.initial_noise(torch.Generator().manual_seed(3), 2), torch.tensor([0.95, 0.5])
    with torch.no_grad():
        velocity = model.velocity(latents, sigmas, batch, guidance_scale=1.0)
        high = _pipeline_call(pipe.transformer, latents[:1], sigmas[:1], batch.prompt_embeds[:1], batch.image_latents[:1])
        low = _pipeline_call(pipe.transformer_2, latents[1:], sigmas[1:], batch.prompt_embeds[1:], batch.image_latents[1:])
    torch.testing.assert_close(velocity, torch.cat([high, low]), atol=1e-5, rtol=1e-5)
    # TI2V-5B's image-to-video layout (a clean first frame inside the noisy latents) is refused by name.
    ti2v = tmp_path / "ti2v"
    ti2v.mkdir()
    index = json.loads((folder / "model_index.json").read_text()) | {"boundary_ratio": None, "transformer_2": [None, None]}
    (ti2v / "model_index.json").write_text(json.dumps(index | {"expand_timesteps": True}))
    with pytest.raises(ModelNotFoundError, match="TI2V-5B.*wan_t2v"):
        WanI2VModel.from_pretrained(str(ti2v))
    with pytest.raises(ValueError, match="both is not supported"):
        ModelConfig(family="wan_i2v", train_expert="both")
    with pytest.raises(ValueError, match="train_expert is for"):
        ModelConfig(family="flux", train_expert="low")


def _metrics(stdout: str) -> list[dict]:
    from .test_run_e2e import printed_run_dir

    run_dir = printed_run_dir(stdout)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], run_dir


@pytest.mark.slow
@pytest.mark.parametrize("expert", ["high", "low"])
def test_dancegrpo_trains_one_expert_on_policy(tmp_path, expert):
    """2 steps in process: the first ratio is exactly 1 (rollout and learner use the expert that owns each step);
    the checkpoint holds the trained expert alone, under its own pipeline folder."""
    proc = run_main(
        "cluster/tiny_wan_t2v.yaml", "run.in_process=true", "train.steps=2", "algorithm.group_size=4", "algorithm.grad_accum_samples=8",
        f"model.train_expert={expert}", f"run.output_root={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, run_dir = _metrics(proc.stdout)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["learner/loss"]) for r in records)
    assert all(r["learner/first_ratio_max_abs_dev"] == 0.0 for r in records), "on-policy ratio must be exactly 1"
    folders = {p.name for p in (run_dir / "checkpoint-final").iterdir() if p.name.startswith("transformer")}
    assert folders == {"transformer" if expert == "high" else "transformer_2"}


@pytest.mark.slow
def test_dgpo_trains_the_low_noise_expert_of_wan22_i2v(tmp_path):
    proc = run_main(
        "cluster/tiny_wan_i2v.yaml", "run.in_process=true", "train.steps=2", f"model.pretrained={tiny_model_folder('wan22_i2v')}",
        "model.train_expert=low", "algorithm={name: dgpo, group_size: 4, groups_per_step: 2, sampler: dpmpp_2m, num_train_timesteps: 2}",
        f"run.output_root={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records, _ = _metrics(proc.stdout)
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["learner/loss"]) for r in records)
