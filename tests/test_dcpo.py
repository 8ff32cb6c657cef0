"""Diffusion-DPO and DCPO (raygrpo/algorithms/dcpo.py): the loss against hand-computed values, the preference data,
the learner half on a toy network, and each tiny preset for two steps in process."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raygrpo.algorithms.base import WindowGroup
from raygrpo.algorithms.dcpo import DiffusionDPO, diffusion_dpo_loss, dpo_logit, evaluates, loss_space, squared_error
from raygrpo.config import ConfigError, load_config
from raygrpo.contracts import Conditioning, PromptGroup, TrainGroup
from raygrpo.data.preferences import (
    EncodedPair,
    PreferenceFileError,
    PreferenceRollout,
    load_preferences,
    pair_captions,
    write_synthetic_preferences,
)

from .conftest import ROOT, train_in_process
from .two_ranks import RankJob

PROMPTS = ["a cat on a mat", "a red car on a road"]


def test_loss_against_hand_computed_values():
    err_w, err_l = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])
    ref_w, ref_l = torch.tensor([1.5, 1.5]), torch.tensor([1.5, 1.5])
    # logit = -beta/2 [(l_w - ref_w) - (l_l - ref_l)]: pair 0 -> -1 * (-0.5 - 0.5) = 1, pair 1 -> -1
    assert dpo_logit(err_w, err_l, ref_w, ref_l, beta=2.0).tolist() == [1.0, -1.0]
    loss = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=2.0)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.exp(1))])
    # Policy = reference: log 2 whatever beta; the gradient lowers the preferred error and raises the rejected one.
    err_w, err_l = torch.tensor([0.7], requires_grad=True), torch.tensor([0.9], requires_grad=True)
    at_start = diffusion_dpo_loss(err_w, err_l, torch.tensor([0.7]), torch.tensor([0.9]), beta=5000.0)
    assert at_start.item() == pytest.approx(math.log(2))
    at_start.sum().backward()
    assert err_w.grad.item() == pytest.approx(5000 / 4) and err_l.grad.item() == pytest.approx(-5000 / 4)  # beta/2 * sigmoid(0)


def test_epsilon_space_is_the_papers_epsilon_error():
    torch.manual_seed(0)
    x0, eps, v = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    s = sigma[:, None, None, None]
    x_t = (1 - s) * x0 + s * eps
    eps_theta = x_t + (1 - s) * v  # the epsilon a velocity v implies at x_t in flow coordinates
    expected = ((eps - eps_theta) ** 2).flatten(1).mean(1)
    assert torch.allclose(squared_error(v, eps - x0, sigma, "epsilon"), expected, atol=1e-6)
    assert torch.allclose(squared_error(v, eps - x0, sigma, "velocity"), ((eps - x0 - v) ** 2).flatten(1).mean(1))


def _config(preset: str = "tiny_dcpo.yaml", *overrides: str):
    return load_config(ROOT / "cluster" / preset, list(overrides))


def test_config_picks_the_loss_space_and_refuses_what_cannot_work():
    assert loss_space(_config()) == "velocity"
    assert loss_space(_config("tiny_dcpo.yaml", "model.family=sd", "model.guidance_scale=1.0", "algorithm.loss_space=auto")) == "epsilon"
    for overrides, message in [
        (["data.prompt_file=null", "data.prompts=[a cat]"], "preference pairs"),
        (["model.family=sd", "model.guidance_scale=7.5"], "train_guidance_scale: 1.0"),
        (["algorithm.captions=whatever"], "captions"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config("tiny_dcpo.yaml", *overrides)


def test_jsonl_and_parquet_pairs_and_the_captions_of_each_variant(tmp_path):
    path = write_synthetic_preferences(tmp_path / "set", PROMPTS, size=16, seed=1)
    records = load_preferences(path)
    assert [r.prompt for r in records] == PROMPTS
    preferred, rejected = records[0].preferred.load((8, 8)), records[0].rejected.load()
    assert preferred.shape == (8, 8, 3) and rejected.shape == (16, 16, 3)
    assert _jpeg_bytes(records[0].preferred.load()) < _jpeg_bytes(rejected)  # the preferred image is the smoother one
    r = records[0]
    assert pair_captions(r, None) == (r.prompt, r.prompt)
    assert pair_captions(r, "captioner") == (r.preferred_caption, r.rejected_caption)
    assert pair_captions(r, "perturbed") == (r.prompt, r.perturbed_prompt)
    assert pair_captions(r, "hybrid") == (r.preferred_caption, r.perturbed_rejected_caption)
    # Parquet with in-line image bytes (Hugging Face's struct), and a record without DCPO captions.
    png = (tmp_path / "set" / "0000_preferred.png").read_bytes()
    table = pa.table({"prompt": ["x"], "preferred": [{"bytes": png, "path": None}], "rejected": [png]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    (record,) = load_preferences(tmp_path / "pairs.parquet")
    assert record.preferred.load().shape == (16, 16, 3)
    assert pair_captions(record, None) == ("x", "x")
    with pytest.raises(PreferenceFileError, match=r"row 0: .*needs preferred_caption and perturbed_rejected_caption"):
        pair_captions(record, "hybrid")


def test_bad_records_name_the_line_and_the_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "preferred": "a.png", "rejected": "b.png"}) + "\n" + json.dumps({"prompt": " ", "preferred": "a.png", "rejected": "b.png"}) + "\n")
    with pytest.raises(PreferenceFileError, match="line 2: the prompt is empty"):
        load_preferences(bad)
    bad.write_text(json.dumps({"prompt": "a", "preferred": "a.png"}) + "\n")
    with pytest.raises(PreferenceFileError, match="line 1: rejected missing"):
        load_preferences(bad)
    bad.write_text(json.dumps({"prompt": "a", "preferred": "nope.png", "rejected": "nope.png"}) + "\n")
    with pytest.raises(PreferenceFileError, match=r"line 1 \(preferred\): image .*nope.png"):
        load_preferences(bad)[0].preferred.load()


class _ToyModel:
    """A velocity network small enough to reason about: v = W x + the caption's mean embedding."""

    def __init__(self):
        torch.manual_seed(0)
        self.transformer = torch.nn.Linear(4, 4)

    def sigma_grid(self, sampler, num_steps, shift):
        return torch.linspace(1, 0, num_steps + 1)

    def velocity(self, latents, sigmas, cond):
        return self.transformer(latents) + cond.prompt_embeds.mean(dim=1, keepdim=True)


def _window(pairs: int) -> list[WindowGroup]:
    rng = np.random.default_rng(0)
    window = []
    for k in range(pairs):
        cond = [Conditioning(prompt_embeds=rng.normal(size=(3, 4)).astype(np.float32)) for _ in range(2)]
        pair = EncodedPair(rng.normal(size=(2, 5, 4)).astype(np.float32), *cond)
        group = PromptGroup(k, k, "p", 2, k, 0)
        rollout = PreferenceRollout(group, 0, cond[0], np.linspace(1, 0, 5, dtype=np.float32), np.zeros((2, 5, 4), np.float32), pair=pair)
        train = TrainGroup(None, k, np.zeros((1, 2), np.float32), np.ones(1, np.float32), np.arange(2))
        window.append(WindowGroup(k, train, rollout, np.arange(2), None))
    return window


def test_the_learner_half_starts_at_log_2_and_one_step_makes_the_policy_prefer_the_preferred_images():
    config = _config("tiny_diffusion_dpo.yaml", "algorithm.beta=50")
    algo, model = DiffusionDPO(config), _ToyModel()
    params = list(model.transformer.parameters())
    algo.setup(model, params, lora=False)
    window = _window(3)
    draws = algo.draw(np.random.default_rng(0), 3, 2, window[0].rollout)
    for wg, draw in zip(window, draws.per_group):
        wg.draw = draw
    terms = list(algo.loss_terms(model, window, draws))
    assert [t.final for t in terms] == [False, False, True]
    assert all(t.loss.item() == pytest.approx(2 * math.log(2)) for t in terms)  # log 2 per pair, times its 2 members
    optimizer = torch.optim.SGD(params, lr=1e-2)
    torch.stack([t.loss for t in terms]).sum().backward()
    optimizer.step()
    after = list(algo.loss_terms(model, window, draws))
    assert all(t.extras["implicit_acc"].item() == 1.0 for t in after)  # every pair's logit left 0 on the right side
    assert sum(t.loss.item() for t in after) < sum(t.loss.item() for t in terms)
    with algo.frozen.swapped():  # the reference is still the start: against itself the logit is 0 again
        assert all(t.extras["dpo_logit"].item() == 0.0 for t in algo.loss_terms(model, window, draws))


QUICK = ["algorithm.group_size=2", "algorithm.groups_per_step=2", "rollout.num_steps=4", "train.steps=2"]


def _check_two_steps(run_dir, rows) -> None:
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert rows[0]["learner/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert rows[1]["learner/loss"] < math.log(2) and all(np.isfinite(r["reward/jpeg/mean"]) for r in rows)
    assert (run_dir / "checkpoint-final" / "transformer").is_dir()


@pytest.mark.slow
def test_the_tiny_diffusion_dpo_preset_runs_two_steps_in_process(tmp_path):
    _check_two_steps(*train_in_process(ROOT / "cluster" / "tiny_diffusion_dpo.yaml", tmp_path, *QUICK))


@pytest.mark.slow
def test_evaluating_fewer_pairs_samples_less_and_trains_the_same(tmp_path):
    """tiny_dcpo.yaml twice: every pair evaluated, then only the first pair of each step; the loss is the same."""
    run_dir, every = train_in_process(ROOT / "cluster" / "tiny_dcpo.yaml", tmp_path / "every", *QUICK)
    _check_two_steps(run_dir, every)
    _, first = train_in_process(ROOT / "cluster" / "tiny_dcpo.yaml", tmp_path / "first", *QUICK, "algorithm.eval_groups=1")
    assert [r["learner/loss"] for r in first] == pytest.approx([r["learner/loss"] for r in every], abs=1e-6)
    assert [r["samples/generated"] for r in every] == [4, 4] and [r["samples/generated"] for r in first] == [2, 2]
    assert [r["groups/not_evaluated"] for r in every] == [0, 0] and [r["groups/not_evaluated"] for r in first] == [1, 1]
    assert all(np.isfinite(r["reward/jpeg/mean"]) and r["rewards/jpeg/missing"] == 0 for r in first)  # of the evaluated pair


def test_which_pairs_are_evaluated():
    algo = _config("tiny_dcpo.yaml", "algorithm.groups_per_step=4", "algorithm.eval_groups=1", "algorithm.eval_every=3").algorithm
    evaluated = [(g // 4 + 1, g % 4) for g in range(4 * 8) if evaluates(PromptGroup(g, 0, "p", 4, 0, 0), algo, steps=8)]
    assert evaluated == [(1, 0), (4, 0), (7, 0), (8, 0)]  # steps 1, 1 + 3k and the last; the first pair of each
    algo = _config("tiny_dcpo.yaml", "algorithm.groups_per_step=4").algorithm
    assert all(evaluates(PromptGroup(g, 0, "p", 4, 0, 0), algo, steps=8) for g in range(32))  # the default: every pair


@pytest.mark.slow
def test_dcpo_trains_a_lora_adapter(tmp_path):
    """DCPO-p with a LoRA adapter: the reference is the adapter switched off, so the first loss is log 2 exactly."""
    run_dir, rows = train_in_process(ROOT / "cluster" / "tiny_dcpo.yaml", tmp_path, *QUICK, "algorithm.captions=perturbed", "model.lora={rank: 4, alpha: 8}")
    assert rows[0]["learner/loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[1]["learner/loss"] != rows[0]["learner/loss"]
    assert np.isfinite(rows[1]["learner/loss"]) and (run_dir / "checkpoint-final").is_dir()


def _jpeg_bytes(image: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.tell()


def test_the_config_carries_the_captions_variant():
    assert _config().algorithm.captions == "hybrid"
    assert not hasattr(_config("tiny_diffusion_dpo.yaml").algorithm, "captions")


def test_the_planner_measures_a_pair_per_term():
    """The resource planner's learner for Diffusion-DPO / DCPO: one term per pair of the step (the reference's forward,
    the policy's forward and backward of its two rows), a frozen copy counted; a VP model's DDPM levels are read
    outside the fake mode (the SD grid needs real numbers). (RG-LCD / Diff-Instruct*: tests/test_plan.py.)"""
    from raygrpo.plan import plan_from
    from raygrpo.plan.architecture import architecture
    from raygrpo.plan.measure import measure

    gpus = ["rollout.num_gpus=1", "learner.num_gpus=1", "model.dtype=bfloat16"]
    config = load_config(ROOT / "cluster" / "tiny_dcpo.yaml", gpus)
    measured = measure(config, architecture("flux", "tiny-random"), compare=False)
    m = measured.learner[config.learner.gradient_checkpointing]
    assert m.term.flops > 0 and m.shadow_bytes > 0
    plan = plan_from(config, measured, mfu=0.4, gpu_memory_bytes=80 * 2**30, gpu_flops=1e15, name="tiny")
    learner = next(r for r in plan.roles if r.role == "learner")
    assert learner.flops == config.algorithm.groups_per_step * m.term.flops  # one term per pair, one rank


def test_a_vp_model_trains_on_its_ddpm_levels():
    """Stable Diffusion (VP): Diffusion-DPO draws t from the scheduler's own T_train levels (a 1000-step DDIM grid would
    index past the table); flow models keep the shifted Euler grid's levels."""
    from raygrpo.models import load_model

    config = load_config(ROOT / "cluster" / "tiny_dcpo.yaml", ["model.family=sd", "model.train_guidance_scale=1.0", "algorithm.train_timesteps=1000"])
    model = load_model("sd", "tiny-random", torch_dtype=torch.float32, device="cpu", height=64, width=64, guidance_scale=1.0, max_sequence_length=16)
    algo = DiffusionDPO(config)
    algo.setup(model, [p for p in model.transformer.parameters()], lora=False)
    assert torch.equal(algo.levels, model.train_sigmas.float())  # [1000], sigma of t = 0..999
    assert len(algo.levels) == 1000 and 0 < float(algo.levels.min()) < float(algo.levels.max()) < 1



def _two_updates_on_ranks(rank: int, world: int, folder, config, batch: list) -> dict | None:
    """A job of the session's 2-rank processes (tests/two_ranks.py): two updates on this rank's part of ``batch``; rank 0
    returns the gathered parameters and both losses."""
    from raygrpo.learner.fsdp import full_state_dict
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import split_batch

    learner = Learner(config, rank, world)
    losses = [learner.update(split_batch(batch, world)[rank]).loss for _ in range(2)]
    params = full_state_dict(learner.model.transformer, None, None)
    return {"params": params, "losses": losses} if rank == 0 else None


TWO_RANKS = ["algorithm.group_size=2", "algorithm.groups_per_step=2", "rollout.num_steps=2", "optimizer.eps=1e-6"]


def rank_jobs() -> dict[str, RankJob]:
    """This module's job of the session's 2-rank processes: Diffusion-DPO's two updates on two pairs."""
    from raygrpo.rollout.preference import PreferenceRolloutWorker

    worker = PreferenceRolloutWorker(_config("tiny_dcpo.yaml", *TWO_RANKS))
    batch = []
    for k in range(2):
        rollout, _, _ = worker.generate(PromptGroup(k, k, "p", 2, seed=20 + k, policy_version=0))
        batch.append(TrainGroup(rollout, k, np.zeros((1, 2), np.float32), np.ones(1, np.float32), np.arange(2)))
    return {"dcpo.two_updates": RankJob(_two_updates_on_ranks, (_config("tiny_dcpo.yaml", *TWO_RANKS, "learner.num_ranks=2"), batch))}


@pytest.mark.slow
def test_two_learner_ranks_make_the_one_rank_updates(two_ranks):
    """2 FSDP2 ranks (the session's plain processes, gloo; the Learner class the Ray actors hold) make one rank's two
    updates on two pairs. The second update is the one that sees a policy apart from the reference: FSDP2 once reused
    the reference's gathered root parameters there (raygrpo/learner/fsdp.py), a 1.7e-2 difference; tolerance as
    tests/test_learner_group.py."""
    from raygrpo.learner.learner import Learner
    from raygrpo.learner.shard import RankBatch

    two = two_ranks["dcpo.two_updates"]
    _, batch = two_ranks.jobs["dcpo.two_updates"].args
    one = Learner(_config("tiny_dcpo.yaml", *TWO_RANKS))
    losses = [one.update(RankBatch.whole(batch)).loss for _ in range(2)]
    assert losses[1] < losses[0] == pytest.approx(math.log(2), abs=1e-6) and two["losses"] == pytest.approx(losses, abs=1e-5)
    state = one.model.transformer.state_dict()
    assert max(float((state[k] - two["params"][k]).abs().max()) for k in state) < 1e-5
