"""What only the Stable Diffusion 1.x/2.x adapter does: a variance-preserving UNet presented in flow coordinates.

The DDIM grid, DDIM-eta and DPM-Solver++ steps against diffusers' schedulers on the same UNet, v-prediction,
the learner's CFG negative. Everything every adapter does (loading, encoding, noise, velocity, CFG, decode,
sampling against StableDiffusionPipeline with DDIM eta 0) is in tests/test_adapter_contract.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from raygrpo.contracts import ConditioningBatch
from raygrpo.models import StableDiffusionModel, load_model, tiny_model_folder
from raygrpo.sampling import alpha_bar_to_sigma, make_ode_solver, step_transition, vp_scale

PROMPT = "a photo of a red cat sitting on a wooden table"
CFG = 5.0  # DanceGRPO's SD recipe, rollout and training


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    return tiny_model_folder("sd")


@pytest.fixture(scope="module")
def pipe(tiny_folder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def model(tiny_folder) -> StableDiffusionModel:
    return StableDiffusionModel.from_pretrained(str(tiny_folder), guidance_scale=CFG)


def _cond(model: StableDiffusionModel, batch: int, prompt: str = PROMPT) -> ConditioningBatch:
    return ConditioningBatch.of(model.encode_prompt(prompt), batch, model.device)


def test_the_unet_is_the_trained_network_with_a_ddim_schedule(model, tiny_folder):
    assert model.transformer is model.unet and model.network_component == "unet"  # trained and synced as ``transformer``
    assert isinstance(model.scheduler, DDIMScheduler) and model.prediction_type == "epsilon"  # SD 1.x's PNDM config becomes DDIM
    assert model.height == model.width == 64  # the UNet's native size
    learner = load_model("sd", str(tiny_folder), load_text_encoders=False, load_vae=False, guidance_scale=1.0, height=128, width=96)
    assert learner.latent_shape == (4, 16, 12)
    with pytest.raises(RuntimeError, match="set_negative_conditioning"):
        learner.velocity(torch.zeros(1, 4, 16, 12), torch.tensor([0.5]), _cond(model, 1), guidance_scale=CFG)


def test_sigma_grid_maps_ddim_timesteps_exactly(model):
    grid = model.sigma_grid("ddim", 10, shift=3.0)  # shift is meaningless for a VP schedule
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(10)
    assert grid.shape == (11,) and bool((grid[1:] < grid[:-1]).all())
    assert torch.equal(model.timestep_of(grid[:-1]), scheduler.timesteps.double())  # snapped to the integers
    final = alpha_bar_to_sigma(torch.tensor(float(scheduler.final_alpha_cumprod)))
    assert float(grid[-1]) == pytest.approx(float(final))  # the last step ends at final_alpha_cumprod
    euler = model.sigma_grid("euler", 10, shift=3.0)
    assert torch.equal(euler[:-1], grid[:-1]) and float(euler[-1]) == 0.0
    # Between two training timesteps the timestep is interpolated, and the velocity stays finite.
    middle = (grid[3] + grid[4]) / 2
    t = float(model.timestep_of(middle.reshape(1)))
    assert float(scheduler.timesteps[4]) < t < float(scheduler.timesteps[3]) and t != round(t)
    with pytest.raises(ValueError, match="does not apply to Stable Diffusion.*'ddim'"):
        model.sigma_grid("dance_sde", 10, 3.0)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_eta_rollout_reproduces_diffusers_ddim_step_on_the_unet(model, eta):
    """The whole rollout loop (adapter velocity + DDIM transition) against DDIMScheduler.step on the same UNet and CFG."""
    steps = 5
    grid = model.sigma_grid("ddim", steps, 1.0)
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(steps)
    cond = _cond(model, 2)
    negative = torch.from_numpy(model.negative_conditioning.prompt_embeds)[None].expand(2, -1, -1)
    generator = torch.Generator().manual_seed(7)
    y = model.initial_noise(generator, 2)
    x = y * vp_scale(grid[0]).float()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            z = torch.randn(y.shape, generator=generator)
            step = step_transition("ddim", eta, y, model.velocity(y, grid[i].expand(2), cond), grid, i)
            y = step.sample(noise=z)
            out = model.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, cond.prompt_embeds])).sample
            unconditional, conditional = out.chunk(2)
            x = scheduler.step(unconditional + CFG * (conditional - unconditional), t, x, eta=eta, variance_noise=z).prev_sample
            scale = float(x.abs().max())
            torch.testing.assert_close(y * vp_scale(grid[i + 1]).float(), x, rtol=0, atol=2e-6 * max(scale, 1.0))


def test_dpmpp_2m_in_flow_coordinates_matches_diffusers_dpm_solver(model, pipe):
    """DGPO's DPM-Solver++(2M) on the adapter's grid is diffusers' DPMSolverMultistepScheduler on the UNet."""
    steps = 5
    grid = model.sigma_grid("dpmpp_2m", steps, 1.0)
    assert float(grid[-1]) == 0.0
    y = model.initial_noise(torch.Generator().manual_seed(5), 1, sigma=float(grid[0]))
    cond = _cond(model, 1)
    solver = make_ode_solver("dpmpp_2m", grid)
    with torch.no_grad():
        for i in range(steps):
            y = solver.step(y, model.velocity(y, grid[i].reshape(1), cond), i)
    dpm = StableDiffusionPipeline(**{**pipe.components, "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)})
    reference = dpm(PROMPT, num_inference_steps=steps, guidance_scale=CFG, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(5)).images  # fmt: skip
    torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-4)


def test_v_prediction_velocity_reproduces_diffusers_ddim_step(model):
    """SD 2.x-768 (v-prediction): the same UNet read as a v-model goes through DDIMScheduler.step alike."""
    v_scheduler = DDIMScheduler.from_config(model.scheduler.config, prediction_type="v_prediction")
    v_model = StableDiffusionModel(
        model.unet,
        scheduler=v_scheduler,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        height=64,
        width=64,
        guidance_scale=1.0,
    )
    grid = v_model.sigma_grid("ddim", 4, 1.0)
    v_scheduler.set_timesteps(4)
    cond = _cond(model, 1)
    generator = torch.Generator().manual_seed(2)
    y = v_model.initial_noise(generator, 1)
    x = y * vp_scale(grid[0]).float()
    with torch.no_grad():
        for i, t in enumerate(v_scheduler.timesteps):
            z = torch.randn(y.shape, generator=generator)
            y = step_transition("ddim", 1.0, y, v_model.velocity(y, grid[i].reshape(1), cond), grid, i).sample(noise=z)
            out = model.unet(x, t, encoder_hidden_states=cond.prompt_embeds).sample
            x = v_scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
            torch.testing.assert_close(y * vp_scale(grid[i + 1]).float(), x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        StableDiffusionModel(model.unet, scheduler=DDIMScheduler.from_config(model.scheduler.config, prediction_type="sample"))


def test_velocity_is_differentiable_and_finite_beyond_the_trained_range(tiny_folder, model):
    policy = StableDiffusionModel.from_pretrained(str(tiny_folder), load_text_encoders=False, load_vae=False, guidance_scale=CFG)
    policy.unet.requires_grad_(True)
    y = policy.initial_noise(torch.Generator().manual_seed(0), 2, sigma=1.0)
    v = policy.velocity(y, torch.tensor([1.0, 0.55]), _cond(model, 2))  # sigma 1 is evaluated at t = 999
    assert torch.isfinite(v).all()
    v.square().mean().backward()
    grads = [p.grad for p in policy.unet.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
