from __future__ import annotations

import math

import pytest
import torch

from jdoptim.scalarization import GeometricMean


def test_value_is_the_m_th_root_of_the_product_and_the_weights_follow_the_derivative():
    values = [0.5, 2.0, 3.0, 7.0]
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    scalar = GeometricMean()(losses)
    expected = math.prod(values) ** (1 / 4)
    assert scalar.item() == pytest.approx(expected, rel=1e-14)
    scalar.backward()
    derivative = [expected / (4 * value) for value in values]
    torch.testing.assert_close(
        losses.grad, torch.tensor(derivative, dtype=torch.float64), rtol=1e-13, atol=0
    )


def test_it_lies_between_the_smallest_loss_and_the_mean():
    losses = torch.rand(6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    scalar = GeometricMean()(losses)
    assert losses.min() <= scalar <= losses.mean()


def test_negative_losses_are_rejected_and_a_zero_loss_gives_zero():
    with pytest.raises(ValueError, match=r"non-negative losses, got \[1.0, -2.0\]"):
        GeometricMean()(torch.tensor([1.0, -2.0]))
    assert GeometricMean()(torch.tensor([0.0, 4.0])) == 0.0
