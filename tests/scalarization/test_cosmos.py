from __future__ import annotations

import math

import pytest
import torch

from jdoptim.scalarization import COSMOS

VALUES = [0.8, 2.5, 1.1]
RAY = [0.6, 0.1, 0.3]


def _cosmos(values, ray, lambda_):
    """Eq. 5 of the paper in Python floats: r·L - λ cos(r, L)."""
    linear = sum(r * v for r, v in zip(ray, values, strict=True))
    norms = math.sqrt(sum(r * r for r in ray)) * math.sqrt(sum(v * v for v in values))
    return linear - lambda_ * linear / norms


@pytest.mark.parametrize("lambda_", [0.0, 0.01, 1.0, 8.0])
def test_value_and_gradient_follow_the_formula(lambda_):
    losses = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    scalar = COSMOS(lambda_, weights=RAY)(losses)
    assert scalar.item() == pytest.approx(_cosmos(VALUES, RAY, lambda_), rel=1e-14)
    scalar.backward()
    step = 1e-6
    for i in range(3):
        up, down = list(VALUES), list(VALUES)
        up[i] += step
        down[i] -= step
        slope = (_cosmos(up, RAY, lambda_) - _cosmos(down, RAY, lambda_)) / (2 * step)
        assert losses.grad[i].item() == pytest.approx(slope, rel=1e-7, abs=1e-10)


def test_without_penalty_it_is_the_linear_scalarization_and_the_default_ray_is_uniform():
    losses = torch.tensor(VALUES, dtype=torch.float64)
    assert COSMOS(0.0, weights=RAY)(losses).item() == pytest.approx(0.8 * 0.6 + 0.25 + 0.33)
    expected = _cosmos(VALUES, [1 / 3] * 3, 2.0)
    assert COSMOS(2.0)(losses).item() == pytest.approx(expected, rel=1e-14)


def test_the_penalty_rewards_losses_aligned_with_the_ray():
    cosmos = COSMOS(1.0, weights=[1.0, 1.0])
    aligned = torch.tensor([1.0, 1.0], dtype=torch.float64)
    skewed = torch.tensor([0.5, 1.5], dtype=torch.float64)  # same linear term r·L = 2
    assert cosmos(aligned) < cosmos(skewed)


def test_all_zero_losses_give_zero_and_a_finite_gradient():
    losses = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    scalar = COSMOS(1.0, weights=RAY)(losses)
    assert scalar.item() == 0.0
    scalar.backward()
    torch.testing.assert_close(losses.grad, torch.tensor(RAY, dtype=torch.float64))


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="Invalid lambda_ value: -1"):
        COSMOS(-1.0)
    with pytest.raises(
        ValueError,
        match="expected non-negative numbers, at least one positive",
    ):
        COSMOS(1.0, weights=[-1.0, 1.0])
    with pytest.raises(ValueError, match="COSMOS has 3 weights but got 2 losses"):
        COSMOS(1.0, weights=RAY)(torch.ones(2))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_float32_losses_give_the_float64_value(scale: float):
    # The norms of float32 losses near 1e30 (or 1e-30) overflow (underflow) in their squares.
    losses = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64) * scale
    single = losses.float().requires_grad_()
    scalar = COSMOS(1.0, weights=[1.0, 2.0, 0.5])(single)
    scalar.backward()
    double = losses.clone().requires_grad_()
    expected = COSMOS(1.0, weights=[1.0, 2.0, 0.5])(double)
    expected.backward()
    torch.testing.assert_close(scalar.double(), expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(single.grad.double(), double.grad, rtol=1e-5, atol=0)
