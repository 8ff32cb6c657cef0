"""``network_placement``: the first parameter's device and dtype, found without ``parameters()``'s generator chain."""

from __future__ import annotations

import pytest
import torch

from raygrpo.models.network import network_placement


def test_placement_is_that_of_the_first_parameter_in_parameters_order():
    # The first parameter sits two levels down, after a child with none: the walk must keep parameters()' order.
    network = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2).double()), torch.nn.Linear(2, 2))
    assert next(network.parameters()).dtype == torch.float64
    assert network_placement(network) == (torch.device("cpu"), torch.float64)


def test_a_non_float_first_parameter_gives_the_first_float_dtype():
    network = torch.nn.Module()
    network.steps = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
    network.layer = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert network_placement(network) == (torch.device("cpu"), torch.bfloat16)


def test_a_network_without_parameters_is_an_error_that_says_so():
    with pytest.raises(ValueError, match="ReLU has no parameters"):
        network_placement(torch.nn.ReLU())
