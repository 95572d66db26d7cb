from __future__ import annotations

import math

import pytest
import torch

from jdoptim.scalarization import PBI

VALUES = [1.4, 0.3, 2.2]
DIRECTION = [0.5, 0.2, 0.3]
REFERENCE = [0.1, -0.2, 0.0]


def _pbi(values, direction, reference, theta):
    """d1 + θ d2 from an explicit decomposition, in Python floats."""
    norm = math.sqrt(sum(w * w for w in direction))
    unit = [w / norm for w in direction]
    shifted = [v - z for v, z in zip(values, reference, strict=True)]
    d1 = sum(f * u for f, u in zip(shifted, unit, strict=True))
    d2 = math.sqrt(sum((f - d1 * u) ** 2 for f, u in zip(shifted, unit, strict=True)))
    return d1 + theta * d2


def test_the_two_dimensional_picture():
    # L = (3, 1) seen along the diagonal: d1 = |(2, 2)| = 2√2, d2 = |(1, -1)| = √2.
    losses = torch.tensor([3.0, 1.0], dtype=torch.float64)
    assert PBI(5.0, weights=[1.0, 1.0])(losses).item() == pytest.approx(7 * math.sqrt(2))
    assert PBI(0.0, weights=[1.0, 1.0])(losses).item() == pytest.approx(2 * math.sqrt(2))


@pytest.mark.parametrize("theta", [0.0, 1.0, 5.0])
def test_value_and_gradient_follow_the_formula(theta):
    losses = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    scalar = PBI(theta, weights=DIRECTION, reference=REFERENCE)(losses)
    assert scalar.item() == pytest.approx(_pbi(VALUES, DIRECTION, REFERENCE, theta), rel=1e-14)
    scalar.backward()
    step = 1e-6
    for i in range(3):
        up, down = list(VALUES), list(VALUES)
        up[i] += step
        down[i] -= step
        slope = (
            _pbi(up, DIRECTION, REFERENCE, theta) - _pbi(down, DIRECTION, REFERENCE, theta)
        ) / (2 * step)
        assert losses.grad[i].item() == pytest.approx(slope, rel=1e-7, abs=1e-10)


def test_only_the_direction_of_the_preference_matters_and_the_origin_is_the_default():
    losses = torch.tensor(VALUES, dtype=torch.float64)
    scaled = [10 * w for w in DIRECTION]
    torch.testing.assert_close(PBI(5.0, scaled)(losses), PBI(5.0, DIRECTION)(losses))
    expected = _pbi(VALUES, DIRECTION, [0.0] * 3, 5.0)
    assert PBI(5.0, DIRECTION)(losses).item() == pytest.approx(expected, rel=1e-14)


def test_on_the_ray_the_gradient_is_the_direction():
    losses = torch.tensor([2.0, 4.0], dtype=torch.float64, requires_grad=True)
    scalar = PBI(5.0, weights=[1.0, 2.0])(losses)
    assert scalar.item() == pytest.approx(math.sqrt(20))
    scalar.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 2.0], dtype=torch.float64) / 5**0.5)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="Invalid theta value: -1"):
        PBI(-1.0, weights=[1.0])
    with pytest.raises(
        ValueError,
        match="expected non-negative numbers, at least one positive",
    ):
        PBI(1.0, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="PBI has 3 weights but got 2 losses"):
        PBI(1.0, weights=DIRECTION)(torch.ones(2))
    with pytest.raises(ValueError, match="PBI has 2 reference entries but got 3 losses"):
        PBI(1.0, weights=DIRECTION, reference=[0.0, 0.0])(torch.ones(3))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_float32_losses_give_the_float64_value(scale: float):
    # The norms of float32 losses near 1e30 (or 1e-30) overflow (underflow) in their squares.
    losses = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64) * scale
    single = losses.float().requires_grad_()
    scalar = PBI(2.0, weights=[1.0, 2.0, 0.5])(single)
    scalar.backward()
    double = losses.clone().requires_grad_()
    expected = PBI(2.0, weights=[1.0, 2.0, 0.5])(double)
    expected.backward()
    torch.testing.assert_close(scalar.double(), expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(single.grad.double(), double.grad, rtol=1e-5, atol=0)
