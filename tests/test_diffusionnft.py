"""DiffusionNFT: the reward mapping, the loss (implicit policies, adaptive weights, beta) against hand-computed values,
its gradient at initialisation, the noise-level draws, the old policy's EMA schedule and that rollout samples with
it, the config's errors, and a short run of the tiny preset."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raygrpo.algorithms.diffusionnft import DiffusionNFT, adaptive_x0_loss, nft_policy_loss, no_grad_forwards, reward_weight
from raygrpo.config import ConfigError, load_config
from raygrpo.learner.ema import fast_ema_decay, slow_ema_decay
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch
from raygrpo.models import tiny_model_folder
from raygrpo.rollout.worker import RolloutWorker

from .conftest import ROOT, train_in_process
from .test_dgpo import G, rollout_and_group  # a group of G = 4 sampled by a worker, with its advantages

PRESET = ROOT / "cluster" / "tiny_diffusionnft.yaml"


def nft_config(*overrides: str):
    base = [f"algorithm.group_size={G}", "model.max_sequence_length=16", "rollout.micro_batch_size=4"]
    return load_config(PRESET, [*base, *overrides])


# ----- the math on tiny tensors -----


def test_reward_mapping_clips_the_advantage_then_maps_it_to_zero_one():
    adv = torch.tensor([-20.0, -5.0, -1.0, 0.0, 2.5, 5.0, 7.0])
    assert reward_weight(adv, adv_clip_max=5.0).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0])
    assert reward_weight(adv, adv_clip_max=2.0).tolist() == pytest.approx([0.0, 0.0, 0.25, 0.5, 1.0, 1.0, 1.0])


def test_loss_against_hand_computed_values():
    """One sample of two elements: x0 = (1, -1), eps = (0, 1), t = 1/2, so x_t = (1/2, 0); v_old = 0, v = (2, 2),
    beta = 1/2, A_max = 5, A = -1 (r = 0.4). By hand:
    v+ = (1, 1), x0+ = x_t - t v+ = (0, -1/2), x0+ - x0 = (-1, 1/2): w+ = 3/4, l+ = (1 + 1/4)/2 / w+ = 5/6;
    v- = (-1, -1), x0- = (1, 1/2), x0- - x0 = (0, 3/2): w- = 3/4, l- = (9/4)/2 / w- = 3/2;
    L = A_max/beta (r l+ + (1 - r) l-) = 10 (0.4 * 5/6 + 0.6 * 3/2) = 37/3.
    With w detached: dl+/dv = 2 (x0+ - x0)/D (-t beta)/w+ = (1/3, -1/6), dl-/dv = 2 (x0- - x0)/D (t beta)/w- = (0, 1/2),
    dL/dv = 10 (0.4 (1/3, -1/6) + 0.6 (0, 1/2)) = (4/3, 7/3)."""
    x0, x_t = torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 0.0]])
    v = torch.tensor([[2.0, 2.0]], requires_grad=True)
    r = reward_weight(torch.tensor([-1.0]), 5.0)
    loss = nft_policy_loss(v, torch.zeros(1, 2), x_t, x0, torch.tensor([0.5]), r, beta=0.5, adv_clip_max=5.0)
    assert loss.tolist() == pytest.approx([37 / 3])
    loss.sum().backward()
    assert v.grad.tolist() == [pytest.approx([4 / 3, 7 / 3])]
    # the adaptive weight's floor: a perfect prediction gives 0, not a division by 0
    assert adaptive_x0_loss(x0.clone(), x0).tolist() == [0.0]


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_at_initialisation_the_loss_is_weighted_flow_matching_and_its_gradient_does_not_depend_on_beta(beta):
    """v_theta = v_old: L = A_max/beta mean(d^2)/mean|d| and dL/dv = -2 t A d / (D mean|d|), d = x_t - t v - x0."""
    gen = torch.Generator().manual_seed(0)
    b, shape = 3, (2, 3, 4)
    d_count = 2 * 3 * 4
    x0, eps, v0 = (torch.randn(b, *shape, generator=gen) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.2])
    advantages = torch.tensor([1.5, -0.7, 0.0])
    column = t.reshape(-1, 1, 1, 1)
    x_t = (1 - column) * x0 + column * eps
    v = v0.clone().requires_grad_(True)
    loss = nft_policy_loss(v, v0, x_t, x0, t, reward_weight(advantages, 5.0), beta, 5.0)
    loss.sum().backward()
    d = x_t - column * v0 - x0  # [b, ...] the clean prediction's error
    w = d.abs().flatten(1).mean(dim=1)  # [b]
    torch.testing.assert_close(loss, 5.0 / beta * (d**2).flatten(1).mean(dim=1) / w)
    expected = -2 * column * advantages.reshape(-1, 1, 1, 1) * d / (d_count * w.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(v.grad, expected)
    assert v.grad[2].abs().max() < 1e-6 * v.grad[0].abs().max()  # A = 0 (r = 1/2): the positive and negative pulls cancel


def test_ema_schedules():
    # released decay_type 1: min(0.001 k, 0.5); decay_type 2 (OCR): 0 for 75 steps, then min(0.0075 (k - 75), 0.999)
    assert [fast_ema_decay(k, 0.5, 0.001) for k in (0, 1, 300, 1000)] == pytest.approx([0.0, 0.001, 0.3, 0.5])
    assert [fast_ema_decay(k, 0.999, 0.0075, delay=75) for k in (1, 75, 115, 1000)] == pytest.approx([0.0, 0.0, 0.3, 0.999])
    assert slow_ema_decay(1, 0.9) == pytest.approx(2 / 11) and slow_ema_decay(500, 0.9) == 0.9


# ----- the config -----


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.family=sd3", "model.guidance_scale=4.5"], r"CFG-free, but model.guidance_scale=4.5 turns on classifier-free guidance"),
        (["model.family=sd3", "model.guidance_scale=1.0", "model.train_guidance_scale=4.5"], r"model.train_guidance_scale=4.5"),
        # CFG by variant: the tiny FLUX.2 is [klein] base, whose guidance is classifier-free; Wan text-to-video guides so too.
        (["model.family=flux2", "model.guidance_scale=4.0"], r"CFG-free, but model.guidance_scale=4 .*model.family='flux2'"),
        (["model.family=wan_t2v", "model.guidance_scale=5.0"], r"CFG-free, but model.guidance_scale=5 .*model.family='wan_t2v'"),
        (["rollout.num_steps=2", "algorithm.timestep_fraction=0.3"], r"timestep_fraction=0.3 of rollout.num_steps=2 trains no noise level"),
        (["algorithm.optimizer_steps_per_update=3"], r"optimizer_steps_per_update=3 does not divide the 8 samples"),
        (["algorithm.clip_range=0.1"], r"algorithm.clip_range: unknown key"),
        (["algorithm.beta=0"], r"algorithm.beta: Input should be greater than 0"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESET, ["algorithm.group_size=4", *overrides])


def test_guidance_distilled_families_keep_their_guidance_value():
    """FLUX embeds its guidance in one forward: not CFG, so 3.5 is allowed; SD3 at 1.0 is CFG-free; so is FLUX.2 [dev]."""
    assert load_config(PRESET).model.guidance_scale == 3.5
    assert load_config(PRESET, ["model.family=sd3", "model.guidance_scale=1.0"]).model.family == "sd3"
    dev = load_config(PRESET, ["model.family=flux2", f"model.pretrained={tiny_model_folder('flux2_dev')}", "model.guidance_scale=4.0"])
    assert dev.model.guidance_kind() == "embedded"


def test_the_learner_asks_the_adapter_when_the_config_cannot_tell():
    """A FLUX.2 hub id not downloaded yet: the config cannot read its variant; the loaded adapter knows it."""
    config = nft_config("model.family=flux2", "model.pretrained=example-org/FLUX.2-klein-base-4B", "model.guidance_scale=4.0")
    assert config.model.guidance_kind() == "unknown"
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"CFG-free, but model.guidance_scale=4 "):
        DiffusionNFT(config).setup(SimpleNamespace(guidance="cfg"), parameters, lora=False)  # [klein] base
    DiffusionNFT(config).setup(SimpleNamespace(guidance="embedded"), parameters, lora=False)  # [dev]: its guidance is an embedding


# ----- on the real tiny FLUX -----


@pytest.fixture(scope="module")
def nft_pair():
    torch.set_num_threads(1)
    config = nft_config()
    return config, RolloutWorker(config), Learner(config)


def test_each_sample_trains_at_its_own_grid_levels_with_its_own_noise(nft_pair, monkeypatch):
    """9 of the 10 grid levels per sample, distinct, drawn per sample; the first update starts at v_theta = v_old."""
    config, worker, learner = nft_pair
    rollout, group = rollout_and_group(worker)
    assert rollout.trajectory is None and rollout.log_probs is None
    calls = []
    original = learner.model.velocity

    def recording(latents, sigmas, *args, **kwargs):
        calls.append((latents.detach().clone(), sigmas.detach().clone(), torch.is_grad_enabled()))
        return original(latents, sigmas, *args, **kwargs)

    monkeypatch.setattr(learner.model, "velocity", recording)
    metrics = learner.update(RankBatch.whole([group]))
    grid = rollout.sigmas[:-1].tolist()
    trained = [(x, s) for x, s, grad in calls if grad]
    # per level the policy with gradients, and without them the old policy and the reference (what the planner counts)
    assert len(trained) == 9 and len(calls) == 9 * (1 + no_grad_forwards(config.algorithm)) == 27
    per_sample = np.array([s.tolist() for _, s in trained]).T  # [G, 9]
    assert all(len(set(row)) == 9 and set(row) <= set(np.float32(grid).tolist()) for row in per_sample.tolist())
    assert len({tuple(row) for row in per_sample.tolist()}) > 1  # each sample its own levels
    x0 = torch.as_tensor(rollout.final_latents)
    x, s = trained[0]
    eps = (x - (1 - s.reshape(-1, 1, 1)) * x0) / s.reshape(-1, 1, 1)
    assert not torch.allclose(eps[0], eps[1])  # i.i.d. noise per sample
    assert metrics.extras["old_deviation"] == 0.0 and metrics.extras["kl"] == 0.0  # v_theta = v_old = v_ref at the start
    assert np.isnan(metrics.ratio_mean) and np.isnan(metrics.first_ratio_max_abs_dev)  # no importance ratio


def test_the_old_policy_follows_its_schedule_and_is_what_rollout_samples_with(nft_pair):
    """theta_old <- d_k theta_old + (1 - d_k) theta after each update (d_k = min(rate k, max)); the exported weights
    are theta_old, the live weights come back; the evaluation EMA lags the live weights."""
    _, worker, _ = nft_pair
    config = nft_config("algorithm.old_ema_decay_rate=0.3", "algorithm.old_ema_max_decay=0.5", "optimizer.lr=0.05")
    learner = Learner(config)
    expected = [p.detach().clone() for p in learner.parameters]
    for step in range(1, 4):
        _, group = rollout_and_group(worker, step, seed=step)
        learner.update(RankBatch.whole([group]))
        d = min(0.3 * step, 0.5)
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, learner.parameters)]
    old = learner.algorithm.old.values
    for e, o in zip(expected, old):
        torch.testing.assert_close(o, e)
    live = [p.detach().clone() for p in learner.parameters]
    exported = learner.export_weights()
    names = [n for n, p in learner.model.transformer.named_parameters() if p.requires_grad]
    assert all(torch.equal(torch.from_numpy(exported.arrays[n]), o) for n, o in zip(names, old))
    assert any(not torch.equal(o, p) for o, p in zip(old, live))
    assert all(torch.equal(p.detach(), p0) for p, p0 in zip(learner.parameters, live))
    assert any(not torch.equal(e, p) for e, p in zip(learner.algorithm.ema.values, live))


def test_micro_batches_and_optimizer_steps_per_update(nft_pair):
    """Micro-batches of 1 give the whole group's update (each sample's loss is its own); two optimizer steps per
    update run two windows of half the samples and move the old policy once, after the second."""
    _, worker, _ = nft_pair
    batch = RankBatch.whole([rollout_and_group(worker, k, seed=20 + k)[1] for k in range(2)])
    results = []
    for size in ("null", "1"):
        learner = Learner(nft_config(f"algorithm.micro_batch_size={size}"))
        start = [p.detach().clone() for p in learner.parameters]
        learner.optimizer = torch.optim.SGD(learner.parameters, lr=1.0)
        learner.rng = np.random.default_rng(5)
        metrics = learner.update(batch)
        results.append((metrics, [p.detach() - p0 for p, p0 in zip(learner.parameters, start)]))
    (whole, step), (split, split_step) = results
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    scale = max(float(d.abs().max()) for d in step)
    assert scale > 0 and max(float((a - b).abs().max()) for a, b in zip(step, split_step)) < 1e-4 * scale
    learner = Learner(nft_config("algorithm.optimizer_steps_per_update=2"))
    start = [v.clone() for v in learner.algorithm.old.values]
    moved = []
    original = learner.algorithm.old.update
    learner.algorithm.old.update = lambda decay: moved.append(decay) or original(decay)
    metrics = learner.update(batch)
    assert metrics.optimizer_steps == 2 and moved == [pytest.approx(0.002)]  # once, at k = 2
    assert any(not torch.equal(a, b) for a, b in zip(start, learner.algorithm.old.values))


@pytest.mark.usefixtures("without_process_group")
def test_the_planner_counts_every_forward_of_a_step():
    """A step's FLOPs: levels x groups x micro-batches x (the measured term: v_old's forward, the policy's forward and
    backward; plus the reference's forward); the shadows (old policy, evaluation EMA, frozen copy) are counted."""
    from raygrpo.plan import plan_from
    from raygrpo.plan.architecture import architecture
    from raygrpo.plan.measure import measure

    config = load_config(PRESET, ["rollout.num_gpus=1", "learner.num_gpus=1", "model.dtype=bfloat16", "algorithm.micro_batch_size=4"])
    measured = measure(config, architecture("flux", "tiny-random"))
    m = measured.learner[config.learner.gradient_checkpointing]
    assert 0 < m.no_grad_flops < m.term.flops
    params = sum(p.numel() for p in Learner(nft_config()).parameters)
    assert m.shadow_bytes == 3 * 4 * params  # old, EMA, frozen base: float32 copies of the trained parameters
    plan = plan_from(config, measured, mfu=0.4, gpu_memory_bytes=80 * 2**30, gpu_flops=1e15, name="tiny")
    learner = next(r for r in plan.roles if r.role == "learner")
    assert learner.flops == 9 * 2 * 2 * (m.term.flops + m.no_grad_flops)  # 9 levels, 2 groups, 2 micro-batches of 4


@pytest.mark.slow
def test_the_tiny_preset_runs_two_steps_in_process(tmp_path):
    run_dir, rows = train_in_process(PRESET, tmp_path, "train.steps=2")
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["learner/loss"]) and r["learner/samples"] == 16 for r in rows)
    assert rows[0]["learner/old_deviation"] == 0.0  # the first update starts at v_theta = v_old
    assert rows[0]["rollout/bytes_per_sample"] < 2 * 4 * 16 * 16 + 1000  # one latent + its share of the conditioning
