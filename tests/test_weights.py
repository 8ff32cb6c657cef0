"""Weight export/load between learner and rollout: exact round trip, bf16 included, mismatches loud."""

import dataclasses

import numpy as np
import pytest
import torch

from raygrpo.weights import SAMPLES, WeightsMismatchError, digest, export_weights, load_weights


@pytest.mark.parametrize("verify", ["sample", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(dtype, verify):
    torch.manual_seed(0)
    source, target = torch.nn.Linear(5, 3).to(dtype), torch.nn.Linear(5, 3).to(dtype)
    message = export_weights(source, policy_version=4, verify=verify)
    assert message.policy_version == 4 and message.nbytes == sum(t.numel() * t.element_size() for t in source.state_dict().values())
    assert load_weights(target, message) == message.checksum  # what the target now holds is what was sent
    for name, tensor in source.state_dict().items():
        assert target.state_dict()[name].dtype == dtype and torch.equal(target.state_dict()[name], tensor)


def test_weights_of_another_network_fail_loudly():
    message = export_weights(torch.nn.Linear(5, 3), policy_version=1)
    with pytest.raises(RuntimeError, match="version 1"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(5, 3)), message)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(torch.nn.Linear(4, 3), message)


def test_an_export_is_a_snapshot_not_a_view_of_the_live_weights():
    module = torch.nn.Linear(3, 2)
    message = export_weights(module, policy_version=1)
    before = message.arrays["weight"].copy()
    with torch.no_grad():
        module.weight.add_(1.0)
    assert (message.arrays["weight"] == before).all()


def test_a_view_export_shares_the_tensors_memory():
    """copy=False (what Learner.publish_weights puts into the object store): no snapshot copy is made."""
    module = torch.nn.Linear(3, 2)
    message = export_weights(module, policy_version=1, copy=False)
    assert np.shares_memory(message.arrays["weight"], module.weight.detach().numpy())


@pytest.mark.parametrize("verify", ["sample", "full"])
def test_digest_tells_different_weights_apart_and_ignores_order(verify):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    message = export_weights(module, policy_version=1, verify=verify)
    state = module.state_dict()
    assert digest(dict(reversed(list(state.items()))), verify, seed=1) == message.checksum
    with torch.no_grad():
        module.weight[0, 0] += 1e-6  # one element, one ulp-scale change
    assert export_weights(module, policy_version=1, verify=verify).checksum != message.checksum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_sampled_digest_is_the_same_from_numpy_views_and_from_tensor_operations(dtype):
    """Contiguous CPU tensors are sampled through numpy views, others (a GPU learner's, a strided view) through
    tensor operations: both must give the same digest, or a sync between them would fail."""
    torch.manual_seed(0)
    tensor = torch.randn(7, 3 * SAMPLES + 5).to(dtype)  # not a multiple of the sample count
    strided = torch.empty(3 * SAMPLES + 5, 7, dtype=dtype).t()  # the same values, a non-contiguous layout
    strided.copy_(tensor)
    assert not strided.is_contiguous()
    for seed in (0, 3):
        assert digest({"w": tensor}, "sample", seed) == digest({"w": strided}, "sample", seed)
    changed = tensor.clone()
    changed.view(-1)[-1] += 1
    assert digest({"w": changed}, "sample", 0) != digest({"w": tensor}, "sample", 0)


def test_the_sampled_digest_sees_the_last_element_and_moves_its_samples_with_the_version():
    """A copy that stopped short always misses the last element; between sample points only the full digest
    sees a change, and the sample positions move with the version so a recurring fault is met later."""
    torch.manual_seed(0)
    tensor = torch.randn(4, SAMPLES)  # one element in 4 is sampled
    last, middle = tensor.clone(), tensor.clone()
    last.view(-1)[-1] += 1.0
    middle.view(-1)[2 * SAMPLES + 1] += 1.0
    caught = {"sample": [], "full": []}
    for seed in range(16):
        assert digest({"w": last}, "sample", seed) != digest({"w": tensor}, "sample", seed)
        for verify in caught:
            caught[verify].append(digest({"w": middle}, verify, seed) != digest({"w": tensor}, verify, seed))
    assert all(caught["full"])
    assert 0 < sum(caught["sample"]) < 16  # the sample misses the middle element at some versions and meets it at others


def test_a_partial_message_checksums_only_its_tensors():
    torch.manual_seed(0)
    source, target = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    message = export_weights(source, policy_version=2, names={"bias"})
    assert message.partial and set(message.arrays) == {"bias"}
    assert load_weights(target, message) == message.checksum
    assert not torch.equal(target.weight, source.weight)  # the rest is kept


def test_a_bf16_wan_rollout_worker_holds_exactly_what_the_learner_sends():
    """diffusers keeps Wan's time embedder, norms and scale-shift tables in float32 when loading in bf16;
    the rollout worker holds them in model.dtype like everything else, as the learner computes them, so
    the checksummed sync of the full network goes through (it used to fail on those tensors)."""
    from raygrpo.config import load_config
    from raygrpo.learner.learner import Learner
    from raygrpo.rollout.worker import RolloutWorker

    from .conftest import ROOT

    config = load_config(ROOT / "cluster" / "tiny_wan_i2v.yaml", ["model.dtype=bfloat16"])
    worker = RolloutWorker(config)
    assert {t.dtype for t in worker.model.transformer.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    message = Learner(config).export_weights()
    assert set(message.dtypes.values()) == {"bfloat16"}
    report = worker.set_weights(message)
    assert (report.policy_version, report.checksum) == (0, message.checksum)


def _tampered(message, **arrays):
    """The message with some arrays replaced (None: dropped), as if it had changed after the learner's digest."""
    changed = {k: v for k, v in {**message.arrays, **arrays}.items() if v is not None}
    return dataclasses.replace(message, arrays=changed)


@pytest.mark.parametrize("verify", ["sample", "full"])
def test_a_truncated_or_mismatched_message_is_caught(verify):
    torch.manual_seed(0)
    source, target = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)  # weight: 4096 elements, more than SAMPLES
    message = export_weights(source, policy_version=3, verify=verify)
    weight = message.arrays["weight"]
    with pytest.raises(WeightsMismatchError, match="size mismatch for weight"):
        load_weights(target, _tampered(message, weight=weight[:32]))  # an array cut short
    with pytest.raises(WeightsMismatchError, match=r"missing \['bias'\]"):
        load_weights(target, _tampered(message, bias=None))  # a tensor dropped from a full message
    partial = export_weights(source, policy_version=3, names={"weight", "bias"}, verify=verify)
    with pytest.raises(WeightsMismatchError, match="digest"):
        load_weights(target, _tampered(partial, bias=None))  # dropped from a partial (LoRA) one: the names fit, the digest not
    tail_lost = weight.copy()
    tail_lost[48:] = 0.0  # the last quarter never arrived
    with pytest.raises(WeightsMismatchError, match="digest"):
        load_weights(target, _tampered(message, weight=tail_lost))
    with pytest.raises(WeightsMismatchError, match="digest"):
        load_weights(target, dataclasses.replace(message, policy_version=2))  # another version's label on these bytes
    # a module that hands out copies instead of its tensors: the load writes nowhere, the digest sees it
    copies = torch.nn.Linear(64, 64)
    copies._register_state_dict_hook(lambda module, state, prefix, local: {k: v.clone() for k, v in state.items()})
    with pytest.raises(WeightsMismatchError, match="digest"):
        load_weights(copies, message)
    assert load_weights(target, message) == message.checksum  # the untampered message still loads


def test_only_the_full_check_sees_one_changed_element_between_sample_points():
    torch.manual_seed(0)
    source, target = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    for verify in ("sample", "full"):
        message = export_weights(source, policy_version=0, verify=verify)
        flipped = message.arrays["weight"].copy()
        sampled = torch.from_numpy(message.arrays["weight"]).reshape(-1)
        # an element the sample at version 0 does not read: changing it leaves the sampled digest as it was
        unchanged = digest({"w": sampled}, "sample", 0)
        spot = next(i for i in range(1, sampled.numel()) if digest({"w": _bumped(sampled, i)}, "sample", 0) == unchanged)
        flipped.reshape(-1)[spot] += 1.0
        tampered = _tampered(message, weight=flipped)
        if verify == "full":
            with pytest.raises(WeightsMismatchError, match="digest"):
                load_weights(target, tampered)
        else:
            assert load_weights(target, tampered) == message.checksum  # the documented limit of the sampled check


def _bumped(tensor: torch.Tensor, index: int) -> torch.Tensor:
    bumped = tensor.clone()
    bumped[index] += 1.0
    return bumped


def test_a_stale_version_or_a_bad_load_on_a_rollout_worker_stops_the_sync(tmp_path):
    """WeightSync.push in process with the real learner and rollout workers: the controller's version must be
    the one every worker reports, and a worker whose load does not match the learner's digest raises."""
    from raygrpo.actor_group import LocalGroup
    from raygrpo.config import load_config
    from raygrpo.learner.group import LearnerGroup
    from raygrpo.placement import resource_plan
    from raygrpo.rollout.worker import RolloutWorker
    from raygrpo.weight_sync import WeightSync

    from .conftest import ROOT

    config = load_config(ROOT / "cluster" / "tiny.yaml", ["run.in_process=true", "rollout.num_workers=2", f"run.output_root={tmp_path}"])
    plan = {role.role: role for role in resource_plan(config)}
    learner, rollout = LearnerGroup(config, plan["learner"]), LocalGroup(RolloutWorker, plan["rollout"], [(config,)] * 2)
    sync = WeightSync(config, learner, rollout)
    assert sync.push(range(2), 0).lost == [] and rollout.foreach("status")[0][0] == 0
    with pytest.raises(WeightsMismatchError, match="stale"):
        sync.push(range(2), 1)  # the controller expects version 1; the learner still exports 0
    message = learner.export_weights().result()
    name = max(message.arrays, key=lambda n: message.arrays[n].size)
    cut = message.arrays[name].copy()
    cut.reshape(-1)[-1] += 1.0  # the last element did not arrive as sent
    with pytest.raises(WeightsMismatchError, match="digest"):
        rollout.actors[0].set_weights(_tampered(message, **{name: cut}))


@pytest.mark.parametrize("rebind", [True, False], ids=["rebound", "copied"])
def test_publish_puts_the_fast_ema_before_the_live_weights_are_swapped_back(monkeypatch, rebind):
    """Learner.publish_weights sends views, no snapshot: the put itself must copy them while DGPO's fast EMA
    is swapped into the parameters. A put that ran after the block would capture the live weights instead.
    Both swap paths (raygrpo/learner/ema.py): rebound here (the views are the EMA's own tensors), copied as on
    an FSDP learner, where only the put's order keeps the EMA (a put after the block would send the live weights)."""
    import ray

    from raygrpo.config import load_config
    from raygrpo.learner.learner import Learner

    from .conftest import ROOT

    learner = Learner(load_config(ROOT / "cluster" / "tiny_dgpo.yaml", ["algorithm.switch_ema_ref=0"]))
    fast = learner.algorithm.fast_ema
    fast.rebind = rebind
    with torch.no_grad():
        for value in fast.values:
            value.add_(1.0)  # the EMA rollout samples with, unlike the live weights
    live = [p.detach().clone() for p in learner.parameters]
    monkeypatch.setattr(ray, "put", lambda message: dataclasses.replace(message, arrays={k: a.copy() for k, a in message.arrays.items()}))
    message = learner.publish_weights()  # what the object store holds: copied at the put
    names = [n for n, p in learner.model.transformer.named_parameters() if p.requires_grad]
    assert all(np.array_equal(message.arrays[n], f.numpy()) for n, f in zip(names, fast.values))
    assert all(torch.equal(p.detach(), before) for p, before in zip(learner.parameters, live))  # swapped back after the put
