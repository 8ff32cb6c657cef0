"""Weight export/load between learner and rollout: exact round trip, bf16 included, mismatches loud."""

import pytest
import torch

from raygrpo.weights import checksum, export_weights, load_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(dtype):
    torch.manual_seed(0)
    source, target = torch.nn.Linear(5, 3).to(dtype), torch.nn.Linear(5, 3).to(dtype)
    message = export_weights(source, policy_version=4)
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


def test_checksum_tells_different_weights_apart_and_ignores_order():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    message = export_weights(module, policy_version=1)
    reordered = dict(reversed(list(message.arrays.items())))
    assert checksum(reordered) == message.checksum
    with torch.no_grad():
        module.weight[0, 0] += 1e-6  # one element, one ulp-scale change
    assert export_weights(module, policy_version=1).checksum != message.checksum


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
