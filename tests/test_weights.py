"""Weight export/load between learner and rollout: exact round trip, bf16 included, mismatches loud."""

import pytest
import torch

from raygrpo.weights import export_weights, load_weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(dtype):
    torch.manual_seed(0)
    source, target = torch.nn.Linear(5, 3).to(dtype), torch.nn.Linear(5, 3).to(dtype)
    message = export_weights(source, policy_version=4)
    assert message.policy_version == 4 and message.nbytes == sum(t.numel() * t.element_size() for t in source.state_dict().values())
    load_weights(target, message)
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
