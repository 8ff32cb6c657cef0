"""ParameterShadow's swap on plain (unsharded) parameters: rebinding, not copying, and everything restored after."""

from __future__ import annotations

import torch

from raygrpo.learner.ema import ParameterShadow


def _network() -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return network, list(network.parameters())


def test_a_swap_rebinds_the_shadow_values_and_restores_the_parameters_own():
    network, parameters = _network()
    shadow = ParameterShadow(parameters)
    assert shadow.rebind
    with torch.no_grad():
        for value in shadow.values:
            value.add_(1.0)
    own = [p.data for p in parameters]
    values = list(shadow.values)
    x = torch.randn(5, 3)
    with torch.no_grad():
        live_out = network(x)
    with shadow.swapped():
        # No copy: each parameter holds the shadow's tensor itself, and the network computes with it.
        assert all(p.data_ptr() == v.data_ptr() for p, v in zip(parameters, shadow.values))
        with torch.no_grad():
            swapped_out = network(x)
    assert not torch.equal(live_out, swapped_out)
    assert all(p.data_ptr() == o.data_ptr() for p, o in zip(parameters, own))  # the parameters' own storage again
    assert all(v is w for v, w in zip(shadow.values, values))  # optimizers and checkpoints keyed by these stay valid
    with torch.no_grad():
        assert torch.equal(network(x), live_out)
        expected = torch.func.functional_call(network, {n: v for (n, _), v in zip(network.named_parameters(), shadow.values)}, (x,))
    torch.testing.assert_close(swapped_out, expected, rtol=0, atol=0)


def test_nested_swaps_restore_in_order_and_a_backward_inside_fills_the_live_grads():
    network, parameters = _network()
    first, second = ParameterShadow(parameters), ParameterShadow(parameters)
    with torch.no_grad():
        for a, b in zip(first.values, second.values):
            a.fill_(1.0)
            b.fill_(2.0)
    own = [p.detach().clone() for p in parameters]
    with first.swapped():
        with second.swapped():
            assert all(torch.equal(p, b) for p, b in zip(parameters, second.values))
            with first.swapped():  # the same shadow again, inside another
                assert all(torch.equal(p, a) for p, a in zip(parameters, first.values))
            assert all(torch.equal(p, b) for p, b in zip(parameters, second.values))
        assert all(torch.equal(p, a) for p, a in zip(parameters, first.values))
        network(torch.ones(2, 3)).sum().backward()  # ShadowOptimizer's use: gradients at the shadow's values
    assert all(torch.equal(p, o) for p, o in zip(parameters, own))
    # d sum(W2 (W1 x + b1) + b2) / d b2 = batch size, and the first layer's weight grad reflects W2 = 1 (the shadow's)
    assert torch.equal(parameters[3].grad, torch.full((2,), 2.0))
    assert torch.equal(parameters[0].grad, torch.full((4, 3), 4.0))
    assert all(not v.requires_grad and v.grad is None for v in first.values)
