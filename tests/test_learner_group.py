"""The multi-rank learner: 2 FSDP2 ranks on CPU (gloo) make the update one rank makes on the same batch.

The numeric checks run the ranks in the session's 2 plain torch processes (tests/two_ranks.py): the same
``Learner`` class the Ray actors hold, without Ray's CPU scheduling in the way (ENVIRONMENT.md). The
``LearnerGroup`` itself, with real Ray actors, is checked in the slow test at the end.

Tolerance: parameters agree to 1e-5 absolute (they are O(0.1-1); one update moves them by up to
lr = 5e-3 or 1e-2). The two runs do the same fp32 arithmetic except the order of the gradient sum:
2 ranks sum their own samples' gradients and FSDP averages the two partial sums, one rank sums all
of them in sequence. That reorders fp32 additions: absolute noise ~1e-7 of the summed terms.
AdamW's first step moves each parameter by lr * g / (|g| + eps), which magnifies that noise where
|g| is near eps; the tests use eps = 1e-6 instead of 1e-8 so those elements stay well behaved
(measured max difference ~3e-7 with eps 1e-6, up to 7.5e-6 with 1e-8). Anything wrong (a missing
factor M, a gradient not averaged, another rank's noise or timesteps) moves parameters by ~lr.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raygrpo.algorithms.advantages import group_advantages
from raygrpo.config import ConfigError, load_config
from raygrpo.contracts import PromptGroup, TrainGroup
from raygrpo.learner.fsdp import full_state_dict
from raygrpo.learner.learner import Learner
from raygrpo.learner.shard import RankBatch, split_batch
from raygrpo.rollout.worker import RolloutWorker

from .conftest import ROOT
from .students import check_two_updates_on_two_ranks, resume_on_ranks
from .two_ranks import RankJob

G = 4
TOLERANCE = 1e-5


def make_config(preset: str, *overrides: str):
    base = [f"algorithm.group_size={G}", "model.max_sequence_length=16", "algorithm.groups_per_step=2", "optimizer.eps=1e-6"]
    if preset == "tiny.yaml":
        base += ["rollout.num_steps=6", "algorithm.grad_accum_samples=16"]  # one window: every sample of the step
    else:
        base += ["rollout.micro_batch_size=4"]
    return load_config(ROOT / "cluster" / preset, [*base, *overrides])


def make_batch(config, n_groups: int) -> list[TrainGroup]:
    """``n_groups`` real rollouts of the tiny FLUX with made-up rewards; TrainGroup.rollout holds the Rollout (in process)."""
    worker = RolloutWorker(config)
    batch = []
    for k in range(n_groups):
        rollout, _, _ = worker.generate(PromptGroup(k, k, f"a lighthouse number {k}", G, seed=20 + k, policy_version=0))
        rewards = np.random.default_rng(k).normal(size=(1, G))
        ddof = config.algorithm.advantage_ddof
        advantages = group_advantages(rewards, 5.0, config.algorithm.advantage_eps, ddof).astype(np.float32)
        batch.append(TrainGroup(rollout, k, advantages, np.ones(1, np.float32), np.arange(G)))
    return batch


# name -> (preset, overrides, groups); "sync_every" re-runs dancegrpo with a gradient all-reduce on every backward
SCENARIOS = {
    "dancegrpo": ("tiny.yaml", [], 2),
    "dancegrpo_sync_every": ("tiny.yaml", ["learner.reduce_every_backward=true"], 2),
    "dgpo": ("tiny_dgpo.yaml", [], 2),
    "dgpo_padded": ("tiny_dgpo.yaml", [], 3),  # 3 groups on 2 ranks: rank 1 holds one real group and one padding slot
    "dgpo_lora": ("tiny_dgpo.yaml", ["model.lora={rank: 4, alpha: 8}", "algorithm.reference=frozen", "optimizer.lr=0.05"], 2),
    "dancegrpo_bf16": ("tiny.yaml", ["model.dtype=bfloat16"], 2),  # fp32 master weights, bf16 compute (FSDP MixedPrecisionPolicy)
    # dgpo_lora one member per forward, with activation checkpointing inside the FSDP units
    "dgpo_micro_checkpointed": (
        "tiny_dgpo.yaml",
        ["model.lora={rank: 4, alpha: 8}", "algorithm.reference=frozen", "optimizer.lr=0.05", "algorithm.micro_batch_size=1",
         "learner.gradient_checkpointing=true"],
        2,
    ),  # fmt: skip
}


def _update_on_ranks(rank: int, world: int, folder: Path, name: str, batch: list[TrainGroup]) -> dict | None:
    """A job of the 2-rank session: one update of scenario ``name`` on this rank's part of ``batch``; rank 0 returns the
    gathered parameters, the exported weights, the metrics and how many gradient reduce-scatters FSDP made."""
    preset, overrides, _ = SCENARIOS[name]
    learner = Learner(make_config(preset, *overrides, f"learner.num_ranks={world}"), rank, world)
    assert learner.sharded and all(hasattr(p, "to_local") for p in learner.parameters)
    part = split_batch(batch, world)[rank]
    reduce_scatter, calls = torch.distributed.reduce_scatter_single, []
    # Count FSDP's gradient reduce-scatters (it calls torch.distributed.reduce_scatter_single).
    torch.distributed.reduce_scatter_single = _counting(reduce_scatter, calls)
    try:
        metrics = learner.update(part)
    finally:
        torch.distributed.reduce_scatter_single = reduce_scatter
    params = full_state_dict(learner.model.transformer, None, None)
    message = learner.export_weights()
    if name in ("dgpo", "dgpo_lora"):
        learner.save(str(folder / "saved"))  # gathered, written by rank 0
    if rank != 0:
        assert message is None
        return None
    return {"params": params, "message": message, "metrics": metrics, "reduce_scatters": len(calls)}


def _counting(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return counted


# Two updates and an exact resume on 2 ranks (tests/students.py), name -> (preset, overrides): the shadows swapped in
# for no-grad forwards (DGPO's fast-EMA reference and slow EMA, updated every step; DiffusionNFT's old policy) differ
# from the policy from the second update on, where a stale gathered shard would show.
TWO_UPDATES = {
    "dgpo": ("tiny_dgpo.yaml", ["algorithm.slow_ema_every=1"]),
    "diffusionnft": ("tiny_diffusionnft.yaml", ["rollout.num_steps=4"]),
}


def rank_jobs() -> dict[str, RankJob]:
    """This module's jobs of the session's 2-rank processes (tests/two_ranks.py): one update per scenario, and two
    updates with an exact resume per :data:`TWO_UPDATES` entry."""
    jobs = {}
    for name, (preset, overrides, n) in SCENARIOS.items():
        jobs[f"learner_group.{name}"] = RankJob(_update_on_ranks, (name, make_batch(make_config(preset, *overrides), n)))
    for name, (preset, overrides) in TWO_UPDATES.items():
        batch = make_batch(make_config(preset, *overrides), 4)
        config = make_config(preset, *overrides, "learner.num_ranks=2")
        jobs[f"learner_group.{name}_two_updates"] = RankJob(resume_on_ranks, (config, batch[:2], batch[2:]))
    return jobs


@pytest.fixture(scope="module")
def two_rank_results(two_ranks):
    """Per scenario: its one-rank Learner after ``update(batch)``, its metrics and what rank 0 of the 2-rank run returned."""
    results = {}
    for name, (preset, overrides, _) in SCENARIOS.items():
        (batch,) = two_ranks.jobs[f"learner_group.{name}"].args[1:]
        one = Learner(make_config(preset, *overrides))
        metrics = one.update(RankBatch.whole(batch))
        results[name] = (one, metrics, two_ranks[f"learner_group.{name}"])
    return results


def _max_param_diff(one: Learner, params: dict[str, torch.Tensor]) -> float:
    state = one.model.transformer.state_dict()
    assert set(state) == set(params)
    return max(float((state[k].float() - params[k].float()).abs().max()) for k in state)


@pytest.mark.parametrize("name", ["dancegrpo", "dgpo", "dgpo_padded", "dgpo_micro_checkpointed"])
def test_two_ranks_make_the_one_rank_update(two_rank_results, name):
    one, metrics, two = two_rank_results[name]
    start = Learner(one.config).model.transformer.state_dict()
    moved = max(float((one.model.transformer.state_dict()[k] - v).abs().max()) for k, v in start.items())
    assert moved > 100 * TOLERANCE  # the update did something the comparison can see
    assert _max_param_diff(one, two["params"]) < TOLERANCE
    # LearnerMetrics are global: both ranks' samples, the same loss and gradient norm
    assert two["metrics"].samples == metrics.samples == SCENARIOS[name][2] * G
    assert two["metrics"].loss == pytest.approx(metrics.loss, rel=1e-4, abs=1e-6)
    assert two["metrics"].grad_norm == pytest.approx(metrics.grad_norm, rel=1e-4)


def test_accumulating_without_gradient_sync_gives_the_same_update(two_rank_results):
    """no_sync on every backward but a window's last equals learner.reduce_every_backward (a reduce-scatter per backward)."""
    one, _, windowed = two_rank_results["dancegrpo"]
    _, _, every = two_rank_results["dancegrpo_sync_every"]
    backwards = one.config.trained_timesteps * G  # per rank: its 4 samples x 3 trained steps, one window
    assert backwards > 1
    diff = max(float((windowed["params"][k] - every["params"][k]).abs().max()) for k in windowed["params"])
    assert diff < TOLERANCE
    # and it saves the communication: one reduce-scatter per FSDP unit per window instead of per backward
    assert windowed["reduce_scatters"] > 0 and every["reduce_scatters"] == backwards * windowed["reduce_scatters"]


def test_dgpo_micro_batches_still_reduce_once_per_update(two_rank_results):
    """Micro-batches of one member (a backward per member instead of per group) and recomputed blocks: the
    gradients still cross the ranks once per update, on its last backward, as for whole groups."""
    _, _, whole = two_rank_results["dgpo_lora"]
    one, _, micro = two_rank_results["dgpo_micro_checkpointed"]
    assert one.model.transformer.gradient_checkpointing and one.config.algorithm.micro_batch_size == 1
    assert micro["reduce_scatters"] == whole["reduce_scatters"] > 0


def test_lora_on_two_ranks_exports_only_the_adapter(two_rank_results):
    one, _, two = two_rank_results["dgpo_lora"]
    message = two["message"]
    assert message.partial and set(message.arrays) == one.synced_names and all("lora" in n for n in message.arrays)
    mine = one.export_weights()
    for name, array in message.arrays.items():
        np.testing.assert_allclose(array, mine.arrays[name], atol=TOLERANCE)
    assert _max_param_diff(one, two["params"]) < TOLERANCE


def test_mixed_precision_on_two_ranks_recomputes_the_bf16_rollout_exactly(two_rank_results):
    """model.dtype bf16: fp32 master weights, bf16 compute through FSDP2; the rollout ran a pure-bf16 model.

    The learner's recomputed log-probs equal the rollout's bit for bit (first ratio exactly 1), and the
    rollout side receives bf16 weights.
    """
    _, _, two = two_rank_results["dancegrpo_bf16"]
    assert two["metrics"].first_ratio_max_abs_dev == 0.0
    assert {t.dtype for t in two["params"].values()} == {torch.float32}
    assert set(two["message"].dtypes.values()) == {"bfloat16"}


def test_bf16_learner_keeps_fp32_master_weights():
    config = make_config("tiny.yaml", "model.dtype=bfloat16")
    learner = Learner(config)
    assert all(p.dtype == torch.float32 for p in learner.parameters)
    batch = make_batch(config, 1)
    metrics = learner.update(RankBatch.whole(batch))
    assert np.isfinite(metrics.loss) and learner.optimizer.state[learner.parameters[0]]["exp_avg"].dtype == torch.float32
    message = learner.export_weights()  # the rollout side holds bf16
    assert set(message.dtypes.values()) == {"bfloat16"}


def test_groups_per_step_must_split_into_whole_groups_per_rank():
    with pytest.raises(ConfigError, match="groups_per_step=3 is not a multiple of learner.num_ranks=2"):
        make_config("tiny_dgpo.yaml", "algorithm.groups_per_step=3", "learner.num_ranks=2")
    with pytest.raises(ConfigError, match="grad_accum_samples=3 is not a multiple"):
        make_config("tiny.yaml", "algorithm.grad_accum_samples=3", "learner.num_ranks=2")


def test_split_batch_gives_whole_groups_and_pads_the_last_ranks():
    groups = [TrainGroup(None, k, np.zeros((1, G), np.float32), np.ones(1, np.float32), np.arange(G)) for k in range(5)]
    parts = split_batch(groups, 4)
    assert [[g.group_id for g in part.groups] for part in parts] == [[0, 1], [2, 3], [4, 4], [4, 4]]
    assert [part.shard.padding for part in parts] == [0, 0, 1, 2]
    assert [part.shard.group_offset for part in parts] == [0, 2, 4, 6]
    assert all(part.shard.total_groups == 5 for part in parts)
    assert parts[2].is_real(0) and not parts[2].is_real(1)


@pytest.mark.parametrize("name", list(TWO_UPDATES))
def test_two_ranks_make_one_ranks_two_updates_and_resume_bit_exactly(two_ranks, name):
    """Two updates on 2 ranks equal one rank's: the second one runs the policy's forward after a no-grad forward of a
    swapped-in shadow (FSDP2's kept root gathers once made it use the swapped-out weights, raygrpo/learner/fsdp.py).
    The sharded (DCP) state resumes bit-exactly: parameters, AdamW moments and the algorithm's shadows, on both ranks'
    shards."""
    preset, overrides = TWO_UPDATES[name]
    two = two_ranks[f"learner_group.{name}_two_updates"]
    _, b1, b2 = two_ranks.jobs[f"learner_group.{name}_two_updates"].args
    one, straight = check_two_updates_on_two_ranks(make_config(preset, *overrides), b1, b2, two, TOLERANCE)
    assert two["optimizer_steps"] == [one.algorithm.optimizer_steps] * 2 == [2, 2] and straight.samples == 2 * G
    shadows = {"dgpo": ("fast_ema", "slow_ema", "frozen"), "diffusionnft": ("old",)}[name]
    assert {f"shadow.{s}.0" for s in shadows} <= set(two["compared"])


def test_two_ranks_save_what_one_rank_saves_in_diffusers_layouts(two_ranks, two_rank_results, tmp_path):
    """Evaluation weights gathered from the shards: the same files one unsharded rank writes, loadable by diffusers."""
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    out = two_ranks.out
    one, _, _ = two_rank_results["dgpo"]
    one.save(str(tmp_path / "one"))
    mine = FluxTransformer2DModel.from_pretrained(tmp_path / "one" / "transformer").state_dict()
    theirs = FluxTransformer2DModel.from_pretrained(out / "learner_group.dgpo" / "saved" / "transformer").state_dict()
    assert set(mine) == set(theirs) and max(float((mine[k] - theirs[k]).abs().max()) for k in mine) < TOLERANCE
    # The config names the model's class, not the FSDP subclass fully_shard made of it (export loads by that name).
    saved_config = json.loads((out / "learner_group.dgpo" / "saved" / "transformer" / "config.json").read_text())
    assert saved_config["_class_name"] == "FluxTransformer2DModel"
    one_lora, _, _ = two_rank_results["dgpo_lora"]
    one_lora.save(str(tmp_path / "one-lora"))
    files = [
        folder / "transformer_lora" / "pytorch_lora_weights.safetensors" for folder in (tmp_path / "one-lora", out / "learner_group.dgpo_lora" / "saved")
    ]
    with safe_open(files[0], "pt") as a, safe_open(files[1], "pt") as b:
        names = set(a.keys())
        assert names == set(b.keys()) and a.metadata().keys() == b.metadata().keys()
        assert all(torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=TOLERANCE) for k in names)


@pytest.mark.slow
def test_learner_group_of_two_ray_actors(ray_cluster, tmp_path):
    """The real thing: 2 rank actors in one placement group, gloo rendezvous on loopback, rollouts from the object store.
    The three actors start first: the batch and the one-rank reference are made here while they import and build."""
    import dataclasses

    import ray

    from raygrpo.learner.group import LearnerGroup
    from raygrpo.placement import resource_plan

    config = make_config("tiny_dgpo.yaml", "learner.num_ranks=2", "learner.num_cpus=1")
    resources = next(role for role in resource_plan(config) if role.role == "learner")
    assert resources.count == 2
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    group = None
    try:
        group = LearnerGroup(config, resources)
        worker = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(config)  # for the collective weight sync below
        batch = make_batch(config, 2)
        one = Learner(make_config("tiny_dgpo.yaml"))
        one.update(RankBatch.whole(batch))
        ray.get(group.ready(), timeout=300)
        metrics = group.update([dataclasses.replace(g, rollout=ray.put(g.rollout)) for g in batch])
        assert metrics.samples == 2 * G and metrics.policy_version == 1
        message = ray.get(group.export_weights())
        mine = one.export_weights()
        assert message.policy_version == 1 and set(message.arrays) == set(mine.arrays)
        assert max(float(np.abs(message.arrays[k] - mine.arrays[k]).max()) for k in mine.arrays) < TOLERANCE
        # collective weight sync: rank 0 broadcasts (both ranks gather) into a real rollout worker actor
        host, port = ray.get(group.weight_group_address(loopback=True))
        ray.get([group.join_weight_group(host, port, 2), worker.join_weight_group.remote(host, port, 1, 2)])
        names = group.weight_names()
        assert names == sorted(mine.arrays)
        sent, received = group.send_weights(), worker.receive_weights.remote(1, names)
        report = ray.get(received)
        assert (report.policy_version, report.checksum) == ray.get(sent) and ray.get(sent)[0] == 1
        group.save_state(str(tmp_path / "state"))
        assert group.load_state(str(tmp_path / "state")) == 1
        saved = group.save(str(tmp_path / "checkpoint"))
        assert (Path(saved) / "transformer" / "config.json").is_file()
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()
