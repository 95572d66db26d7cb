"""Mean, Sum, Constant and Random: fixed or random linear combinations of the losses."""

from __future__ import annotations

import pytest
import torch

import jdoptim
from jdoptim.scalarization import Constant, Mean, Random, Sum

LOSSES = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)


def _weights_of(scalarizer, losses):
    """The gradient of the scalar with respect to the losses: the weights of the combination."""
    losses = losses.clone().requires_grad_()
    scalarizer(losses).backward()
    return losses.grad


@pytest.mark.parametrize(
    ("scalarizer", "value", "weights"),
    [
        (Mean(), 2.0, [1 / 3, 1 / 3, 1 / 3]),
        (Sum(), 6.0, [1.0, 1.0, 1.0]),
        (Constant([1.0, 2.0, 0.5]), 6.5, [1.0, 2.0, 0.5]),
        (Constant([-1.0, 0.0, 4.0]), 11.0, [-1.0, 0.0, 4.0]),
    ],
    ids=repr,
)
def test_values_and_weights(scalarizer, value, weights):
    assert scalarizer(LOSSES).item() == pytest.approx(value, rel=1e-15)
    torch.testing.assert_close(
        _weights_of(scalarizer, LOSSES), torch.tensor(weights, dtype=torch.float64)
    )


def test_constant_needs_one_weight_per_loss():
    with pytest.raises(ValueError, match="Constant has 2 weights but got 3 losses"):
        Constant([1.0, 2.0])(LOSSES)
    with pytest.raises(ValueError, match="finite"):
        Constant([1.0, float("inf")])


def test_random_weights_are_a_softmax_of_gaussian_draws_from_its_generator():
    generator = torch.Generator().manual_seed(7)
    draws = [torch.randn(3, generator=generator, dtype=torch.float64) for _ in range(3)]
    scalarizer = Random(seed=7)
    for z in draws:
        expected = torch.exp(z) / torch.exp(z).sum()
        torch.testing.assert_close(_weights_of(scalarizer, LOSSES), expected, rtol=1e-14, atol=0)


def test_random_with_a_seed_gives_the_update_of_the_random_aggregator():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    aggregator, scalarizer = jdoptim.Random(seed=3), Random(seed=3)
    for _ in range(3):
        torch.testing.assert_close(
            _weights_of(scalarizer, LOSSES[:2]) @ J, aggregator(J), rtol=1e-14, atol=0
        )


def test_random_without_a_seed_follows_the_global_generator():
    torch.manual_seed(11)
    first = Random()(LOSSES)
    torch.manual_seed(11)
    assert Random()(LOSSES) == first
    assert Random()(LOSSES) != first


def test_random_seed_is_validated_and_state_needs_a_seed():
    with pytest.raises(ValueError, match="Invalid seed value"):
        Random(seed=1.5)
    seeded = Random(seed=0)
    seeded(torch.ones(2))  # the owned generator starts at the first draw
    with pytest.raises(ValueError, match="has no seed"):
        Random().load_state_dict(seeded.state_dict())
