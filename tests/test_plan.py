"""The resource planner (python -m raygrpo.plan, raygrpo/plan/) on the tiny FLUX: its fake-tensor numbers against the
real model's, the verdict against a GPU memory size, the command line, and the driver's preflight refusing a plan
that cannot fit. The real presets' dry runs are tests/test_dry_run.py; their plans are in the README."""

from __future__ import annotations

import pytest

from raygrpo.config import load_config
from raygrpo.errors import PreflightError
from raygrpo.models import load_model
from raygrpo.plan import parse_bytes, plan_from
from raygrpo.plan.__main__ import main
from raygrpo.plan.architecture import architecture
from raygrpo.plan.measure import measure

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("without_process_group")

TINY = ROOT / "cluster" / "tiny.yaml"
GPU = ["rollout.num_gpus=1", "learner.num_gpus=1", "model.dtype=bfloat16"]


@pytest.fixture(scope="module")
def measured():
    config = load_config(TINY, GPU)
    return config, measure(config, architecture("flux", "tiny-random"))


@pytest.fixture(scope="module")
def plan(measured):
    return plan_from(*measured, mfu=0.4, gpu_memory_bytes=80 * 2**30, gpu_flops=1e15, name="tiny")


def test_fake_weights_weigh_what_the_real_ones_do(plan):
    """The rollout row's weights, measured on fake tensors, are the loaded tiny model's bytes in model.dtype."""
    import torch

    real = load_model("flux", "tiny-random", torch_dtype=torch.bfloat16)
    rollout = next(r for r in plan.roles if r.role == "rollout")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(real, name)
        expected = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        assert rollout.parts[f"weights: {name}"] == expected, name
    assert rollout.peak_bytes > sum(v for k, v in rollout.parts.items() if k.startswith("weights"))


def test_learner_row_holds_float32_shards_and_adam_states(plan):
    """One rank: AdamW keeps two float32 moments per trained parameter (exp_avg, exp_avg_sq) besides the step count."""
    import torch

    real = load_model("flux", "tiny-random", torch_dtype=torch.float32)
    params = sum(p.numel() for p in real.transformer.parameters())
    learner = next(r for r in plan.roles if r.role == "learner")
    assert learner.parts["optimizer states"] == 2 * 4 * params
    assert learner.peak_bytes >= learner.parts["optimizer states"] + learner.parts["Sharded Param"]
    assert learner.flops > 0 and plan.learner_seconds_per_step > 0 and plan.rollout_seconds_per_image > 0


def test_verdict_and_speed_follow_the_gpu(plan, measured):
    assert plan.fits
    assert "verdict: fits" in plan.table()
    small = plan_from(*measured, mfu=0.4, gpu_memory_bytes=2**20, gpu_flops=1e15, name="tiny")
    assert not small.fits and "DOES NOT FIT" in small.table()
    assert small.to_dict()["fits"] is False
    slower = plan_from(*measured, mfu=0.2, gpu_memory_bytes=80 * 2**30, gpu_flops=1e15, name="tiny")
    assert slower.learner_seconds_per_step == pytest.approx(2 * plan.learner_seconds_per_step)
    assert slower.rollout_images_per_gpu_s == pytest.approx(plan.rollout_images_per_gpu_s / 2)


def test_gradient_checkpointing_holds_less_than_the_plain_backward():
    """Checkpointed blocks keep their inputs and recompute one block at a time in the backward: at 128 px and two
    blocks of each kind the peak and its activations are below the plain backward's. (The FLOP counter's
    per-module hooks used to keep every recomputed block alive, which made checkpointing look like a loss.)"""
    from raygrpo.plan.architecture import scaled
    from raygrpo.plan.measure import learner_step

    arch = scaled(architecture("flux", "tiny-random"), {"num_layers": 2, "num_single_layers": 2})
    on, off = (
        learner_step(load_config(TINY, [*GPU, "model.height=128", "model.width=128", f"learner.gradient_checkpointing={gc}"]), arch).term
        for gc in (True, False)
    )
    assert on.peak < off.peak
    assert on.breakdown["Activation"] < off.breakdown["Activation"] / 3
    assert on.flops > off.flops  # the recompute: a second forward of every block


@pytest.fixture
def measured_once(measured, monkeypatch):
    """The planner's dry run answered with the module's measurements of the same tiny GPU config (the preflight and
    the command line differ from it only in run.* fields, which change nothing measured): they test the verdict's
    path through the entry points, not the measuring again (tests/test_plan's fixtures and cache test cover that)."""
    from raygrpo.plan import cache

    monkeypatch.setattr(cache, "measure", lambda config, *args, **kwargs: measured[1])


def test_command_line_exit_codes(capsys, measured_once):
    assert main([str(TINY), *GPU, "--gpu-memory", "1MiB", "--json"]) == 1
    assert '"fits": false' in capsys.readouterr().out
    assert main([str(TINY), "model.pretrained=no-such/model"]) == 2
    assert "no architecture config" in capsys.readouterr().err


def test_preflight_refuses_a_plan_that_cannot_fit(tmp_path, measured_once):
    from raygrpo.run import preflight

    config = load_config(TINY, [*GPU, "ray.address=auto", f"run.output_root={tmp_path}"])  # a cluster: no local GPU count
    with pytest.raises(PreflightError, match="resource plan does not fit") as error:
        preflight(config, check_rewards=False, gpu_memory_bytes=2**20)
    assert "DOES NOT FIT" in str(error.value)


def test_a_plan_is_measured_once_per_config_and_code(measured, tmp_path, monkeypatch):
    """The preflight's cache: the same config plans from the file, another config (or other code) measures again."""
    from raygrpo.plan import cache, make_plan

    config, measurements = measured
    calls = []
    monkeypatch.setattr(cache, "measure", lambda *args, **kwargs: calls.append(args[0]) or measurements)
    first = make_plan(config, cache=tmp_path, compare=True)
    again = make_plan(config, cache=tmp_path, compare=True)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert again.to_dict() == first.to_dict()  # the measurements came back whole from the file
    make_plan(load_config(TINY, [*GPU, "learner.num_ranks=2", "algorithm.groups_per_step=2"]), cache=tmp_path)
    assert len(calls) == 2
    monkeypatch.setattr(cache, "_source_digest", lambda: b"other code")
    make_plan(config, cache=tmp_path, compare=True)
    assert len(calls) == 3


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("141GB") == 141 * 10**9 and parse_bytes("80") == 80 * 2**30
    with pytest.raises(ValueError, match="80GiB"):
        parse_bytes("eighty")


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.kl_beta=0"],  # 1: the fast EMA, reference and the clip's old policy at once
        [],  # 2: the fast EMA, and the frozen base for the KL
        ["algorithm.reference=frozen", "algorithm.micro_batch_size=2"],  # 3: frozen base, fast EMA, the split group's policy
    ],
    ids=["fast-ema", "fast-ema-kl", "frozen-split"],
)
def test_dgpo_no_grad_forwards_are_the_forwards_dgpo_runs(overrides, monkeypatch):
    """What the planner counts DGPO's FLOPs with (no_grad_forwards) against the rows one real update feeds the network."""
    import numpy as np
    import torch

    from raygrpo.algorithms.dgpo import no_grad_forwards
    from raygrpo.contracts import PromptGroup, Rollout, TrainGroup
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import RankBatch
    from raygrpo.plan.fake import conditioning

    g = 4
    config = load_config(ROOT / "cluster" / "tiny_dgpo.yaml", [f"algorithm.group_size={g}", "algorithm.num_train_timesteps=1", *overrides])
    learner = Learner(config)
    model = learner.model
    sigmas = model.sigma_grid(config.algorithm.sampler, config.rollout.num_steps, config.rollout.shift)
    rollout = Rollout(
        PromptGroup(0, 0, "", g, 0, 0), 0, conditioning(config, architecture("flux", "tiny-random"), model),
        np.asarray(sigmas, np.float32), np.zeros((g, *model.latent_shape), np.float32),
    )  # fmt: skip
    rows = {True: 0, False: 0}  # rows fed with / without gradients
    velocity = model.velocity

    def counted(x, *args, **kwargs):
        rows[torch.is_grad_enabled()] += len(x)
        return velocity(x, *args, **kwargs)

    monkeypatch.setattr(model, "velocity", counted)
    advantages = np.asarray([[1.0, -1.0, 0.5, -0.5]], np.float32)
    learner.update(RankBatch.whole([TrainGroup(rollout, 0, advantages, np.ones(1, np.float32), np.arange(g))]))
    assert rows[True] == g  # one sigma, one group: each member once with gradients
    assert rows[False] == no_grad_forwards(config.algorithm, g) * g


def test_dgpo_plan_counts_the_reference_forward():
    """DGPO's term runs the reference without gradients before the policy: both are measured, the first apart."""
    config = load_config(ROOT / "cluster" / "tiny_dgpo.yaml", GPU)
    measured = measure(config, architecture(config.model.family, config.model.pretrained))
    learner = measured.learner[config.learner.gradient_checkpointing]
    assert 0 < learner.no_grad_flops < learner.term.flops  # a forward alone costs less than forward + backward
    assert learner.shadow_bytes > 0  # the fast and slow EMA (and, without LoRA, the frozen copy) of the trained shards


def test_a_process_in_a_process_group_measures_the_learner_in_a_child_process():
    """An in-process bf16 learner joined a one-rank group here: the dry run needs its own fake group, so it runs apart."""
    import torch

    from raygrpo.learner.fsdp import join_single_rank_group
    from raygrpo.plan.measure import _learner_step_apart

    config = load_config(TINY, GPU)
    join_single_rank_group(use_cuda=False)
    try:
        apart = _learner_step_apart(config, architecture("flux", "tiny-random"), memory_only=True)
    finally:
        torch.distributed.destroy_process_group()
    assert apart.term.peak > 0 and not torch.distributed.is_initialized()


# ------------------------------------------------------------------------- RG-LCD and Diff-Instruct*: their whole window
STUDENT = [*GPU, "algorithm.group_size=2"]  # tiny windows: one group of two members


@pytest.fixture(scope="module")
def tiny_flux():
    """The tiny FLUX loaded in float32, as the learner holds it: (its network's bytes, its VAE's bytes)."""
    import torch

    real = load_model("flux", "tiny-random", torch_dtype=torch.float32)
    size = lambda module: sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])  # noqa: E731
    return size(real.transformer), size(real.vae)


def test_di_star_holds_the_fake_score_and_its_adam_states_beyond_dancegrpo(measured, tiny_flux):
    """Diff-Instruct*'s rank keeps the fake score (a float32 copy of the trained network) and its AdamW moments, the
    frozen reference (full fine-tuning) and the pixel reward's float32 VAE: its learner exceeds DanceGRPO's on the
    same tiny FLUX by at least the fake score and its optimizer state."""
    from raygrpo.plan.measure import learner_step

    network, vae = tiny_flux
    config = load_config(ROOT / "cluster" / "tiny_di_star.yaml", STUDENT)
    di_star = learner_step(config, architecture("flux", "tiny-random"), memory_only=True)
    assert di_star.shadow_bytes == 2 * network  # the fake score and the frozen reference
    assert di_star.held_bytes == {"fake score AdamW states": 2 * network, "reward VAE (float32)": vae}
    dance = measured[1].learner[measured[0].learner.gradient_checkpointing]
    extra = (di_star.term.peak + di_star.shadow_bytes + sum(di_star.held_bytes.values())) - (dance.term.peak + dance.shadow_bytes)
    assert extra >= 3 * network  # the fake score's values and its two AdamW moments


def test_rg_lcd_counts_its_teacher_target_and_decoder(measured, tiny_flux):
    """RG-LCD's window runs the teacher and the EMA target without gradients, and the student with them through the
    VAE decoder of a pixel reward: more gradient FLOPs than two DanceGRPO terms (one member's forward and backward
    each), and the decoder's float32 weights held."""
    from raygrpo.plan.measure import learner_step

    network, vae = tiny_flux
    overrides = [*STUDENT, "algorithm.reward_source=pixel", "rewards.0.kind=contrast"]
    rg_lcd = learner_step(load_config(ROOT / "cluster" / "tiny_rg_lcd.yaml", overrides), architecture("flux", "tiny-random"))
    assert rg_lcd.held_bytes == {"reward VAE (float32)": vae}
    assert rg_lcd.shadow_bytes == 2 * network  # the target EMA and the frozen teacher
    dance = measured[1].learner[measured[0].learner.gradient_checkpointing]
    assert 0 < rg_lcd.no_grad_flops < rg_lcd.term.flops
    assert rg_lcd.term.flops - rg_lcd.no_grad_flops > 2 * dance.term.flops


def test_an_algorithm_the_planner_does_not_model_is_refused_by_name(monkeypatch):
    """An ODE-rollout learner that no branch of the planner models (here RG-LCD with its window measurement switched
    off) is refused with ArchitectureError naming it, which the run's preflight turns into a start without a plan."""
    import raygrpo.plan.measure as measure_module
    from raygrpo.plan import ArchitectureError

    monkeypatch.setattr(measure_module, "is_student", lambda config: False)
    config = load_config(ROOT / "cluster" / "tiny_rg_lcd.yaml", GPU)
    with pytest.raises(ArchitectureError, match="does not model the 'rg_lcd' learner"):
        measure_module.learner_step(config, architecture("flux", "tiny-random"), memory_only=True)
