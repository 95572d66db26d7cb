"""ExcessMTL: the update rule step by step, computed independently, and the state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor

from jdoptim import ExcessMTL, ExcessMTLWeighting, GramianWeightedAggregator

J1 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
J2 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
J3 = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)


def _excess(J: Tensor, squares_so_far: Tensor) -> Tensor:
    # g_iᵀ H_i⁻¹ g_i, H_i = diag(√(Σ_s g_{i,s}² + 1e-7)), the sum including this call.
    return (J**2 / (squares_so_far + 1e-7).sqrt()).sum(dim=1)


def _reference(jacobians: list[Tensor], step_size: float, warmup: int) -> list[Tensor]:
    """The weights of each call, from the formulas of the paper (Eqs. 6, 7, 9, Appendix C.1)."""
    m = jacobians[0].shape[0]
    weights = torch.full((m,), 1.0 / m, dtype=torch.float64)
    squares = torch.zeros_like(jacobians[0])
    warmup_sum, baseline, outputs = 0.0, None, []
    for t, J in enumerate(jacobians):
        squares = squares + J**2
        estimate = _excess(J, squares)
        if t < warmup:
            warmup_sum = warmup_sum + estimate
            outputs.append(weights)
            continue
        if baseline is None:
            baseline = warmup_sum / warmup if warmup else estimate
        weights = weights * torch.exp(step_size * estimate / (baseline + 1e-7))
        weights = weights / weights.sum()
        outputs.append(weights)
    return outputs


@pytest.mark.parametrize(("step_size", "warmup"), [(1.0, 1), (0.5, 2), (2.0, 0), (1.0, 3)])
def test_matches_the_update_rule(step_size: float, warmup: int):
    jacobians = [J1, J2, J3, J1, J3]
    weighting = ExcessMTLWeighting(step_size, warmup)
    for J, expected in zip(jacobians, _reference(jacobians, step_size, warmup), strict=True):
        torch.testing.assert_close(weighting(J), expected, rtol=1e-12, atol=0)


def test_hand_computed_second_call():
    # Call 1 (warm-up): S = J1² = [[4, 0], [1, 0]], E = [4/2, 1/1] = [2, 1] is the baseline.
    # Call 2: S = [[5, 0], [5, 0]], E = [1/√5, 4/√5], ratios E / E⁰ = [1/(2√5), 4/√5].
    aggregator = ExcessMTL()
    torch.testing.assert_close(aggregator(J1), J1.mean(dim=0))
    ratios = torch.tensor([1 / (2 * math.sqrt(5)), 4 / math.sqrt(5)], dtype=torch.float64)
    weights = ratios.exp() / ratios.exp().sum()
    torch.testing.assert_close(aggregator(J2), weights @ J2, rtol=1e-6, atol=0)


def test_zero_gradient_at_the_baseline_saturates_instead_of_overflowing():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    weighting = ExcessMTLWeighting()
    weighting(J)  # the baseline of objective 2 is 0
    weights = weighting(torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=torch.float64))
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_state_dict_reset_and_change_of_shape():
    aggregator = ExcessMTL()
    first = [aggregator(J1), aggregator(J2)]
    state = copy.deepcopy(aggregator.state_dict())
    restored = ExcessMTL()
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(J3), aggregator(J3), rtol=0, atol=0)
    aggregator.reset()
    torch.testing.assert_close([aggregator(J1), aggregator(J2)], first, rtol=0, atol=0)
    # A Jacobian of another shape restarts the method.
    wide = torch.ones(2, 3, dtype=torch.float64)
    torch.testing.assert_close(aggregator(wide), ExcessMTL()(wide))


def test_needs_the_jacobian():
    assert ExcessMTLWeighting.needs_jacobian
    with pytest.raises(ValueError, match="needs the Jacobian"):
        GramianWeightedAggregator(ExcessMTLWeighting())


def test_state_follows_the_dtype_of_the_input():
    mixed, reference = ExcessMTL(), ExcessMTL()
    mixed(J1.float())
    reference(J1)
    update = mixed(J2)
    assert update.dtype == torch.float64
    torch.testing.assert_close(update, reference(J2), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"robust_step_size": 0.0},
        {"robust_step_size": -1.0},
        {"n_warmup_steps": -1},
        {"n_warmup_steps": 1.5},
    ],
    ids=repr,
)
def test_invalid_arguments(kwargs: dict):
    with pytest.raises(ValueError, match="Invalid"):
        ExcessMTL(**kwargs)
