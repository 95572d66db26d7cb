"""Columns: the layout of a Jacobian's columns by parameter, layer and parameter group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import Columns
from jdoptim.aggregation._columns import block_gramians, combine_blocks, layer_names


def test_blocks_gather_the_columns_of_each_layer_group_and_parameter():
    columns = Columns((2, 3, 1, 4), layers=("a", "b", "a", "b"), groups=(0, 0, 1, 0))
    assert columns.n == 10
    assert columns.blocks("all") == [((0, 10),)]
    assert columns.blocks("parameter") == [((0, 2),), ((2, 5),), ((5, 6),), ((6, 10),)]
    assert columns.blocks("layer") == [((0, 2), (5, 6)), ((2, 5), (6, 10))]
    assert columns.blocks("group") == [((0, 5), (6, 10)), ((5, 6),)]


def test_block_gramians_and_updates_follow_the_blocks():
    generator = torch.Generator().manual_seed(0)
    J = torch.randn(3, 10, generator=generator, dtype=torch.float64)
    blocks = Columns((2, 3, 1, 4), layers=("a", "b", "a", "b")).blocks("layer")
    first, second = [0, 1, 5], [2, 3, 4, 6, 7, 8, 9]
    gramians = block_gramians(J, blocks)
    torch.testing.assert_close(gramians[0], J[:, first] @ J[:, first].T)
    torch.testing.assert_close(gramians[1], J[:, second] @ J[:, second].T)
    weights = torch.rand(2, 3, generator=generator, dtype=torch.float64)
    update = combine_blocks(J, blocks, weights)
    torch.testing.assert_close(update[first], weights[0] @ J[:, first])
    torch.testing.assert_close(update[second], weights[1] @ J[:, second])


def test_a_parameter_belongs_to_the_module_that_registers_it_tied_ones_to_the_first():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
    model[1][1].weight = model[0].weight  # tied (shapes differ: only the registration counts)
    names = layer_names(model)
    assert names[id(model[0].weight)] == "0"
    assert names[id(model[1][0].bias)] == "1.0"
    columns = Columns.of(list(model.parameters()), model)
    assert columns.layers == ("0", "0", "1.0", "1.0", "1.1")
    two = Columns.of([model[0].bias, model[1][1].bias], [model[0], model[1]])
    assert two.layers == ("0", "1.1")


def test_groups_come_from_the_optimizer_groups():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [b]}, {"params": [a], "lr": 0.5}], lr=0.1)
    groups = [group["params"] for group in optimizer.param_groups]
    assert Columns.of([a, b], groups=groups).groups == (1, 0)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"sizes": ()}, "Invalid sizes value"),
        ({"sizes": (2, 0)}, "Invalid sizes value"),
        ({"sizes": (2, 1), "layers": ("a",)}, "Invalid layers value"),
        ({"sizes": (2,), "groups": (0, 1)}, "Invalid groups value"),
    ],
)
def test_bad_layouts_are_refused(arguments, match):
    with pytest.raises(ValueError, match=match):
        Columns(**arguments)


def test_unknown_layers_groups_and_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="layers of the Jacobian's columns are not known"):
        Columns((2, 3)).blocks("layer")
    with pytest.raises(ValueError, match="parameter groups of the Jacobian's columns"):
        Columns((2, 3)).blocks("group")
    with pytest.raises(ValueError, match="Invalid granularity value: 'row'"):
        Columns((2, 3)).blocks("row")
    with pytest.raises(ValueError, match="holds no parameter of shape"):
        Columns.of([nn.Parameter(torch.zeros(2))], nn.Linear(2, 2))
    with pytest.raises(ValueError, match="in none of the groups"):
        Columns.of([nn.Parameter(torch.zeros(2))], groups=[[]])
