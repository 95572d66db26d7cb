from __future__ import annotations

import math

import pytest
import torch

from jdoptim.scalarization import STCH

VALUES = [0.7, 1.9, 1.2]
WEIGHTS = [0.2, 0.5, 0.3]
REFERENCE = [0.1, 0.4, -0.2]


def _stch(values, weights, reference, mu):
    """The paper's formula, term by term, in Python floats."""
    terms = [w * (v - z) / mu for v, w, z in zip(values, weights, reference, strict=True)]
    top = max(terms)
    return mu * (top + math.log(sum(math.exp(t - top) for t in terms)))


@pytest.mark.parametrize("mu", [0.01, 0.1, 0.5, 1.0])
def test_value_and_gradient_follow_the_formula(mu):
    losses = torch.tensor(VALUES, dtype=torch.float64, requires_grad=True)
    scalar = STCH(mu, weights=WEIGHTS, reference=REFERENCE)(losses)
    assert scalar.item() == pytest.approx(_stch(VALUES, WEIGHTS, REFERENCE, mu), rel=1e-14)
    scalar.backward()
    step = 1e-6
    for i in range(3):
        up, down = list(VALUES), list(VALUES)
        up[i] += step
        down[i] -= step
        slope = (_stch(up, WEIGHTS, REFERENCE, mu) - _stch(down, WEIGHTS, REFERENCE, mu)) / (
            2 * step
        )
        assert losses.grad[i].item() == pytest.approx(slope, rel=1e-6, abs=1e-9)


def test_defaults_are_uniform_preferences_and_no_shift():
    losses = torch.tensor(VALUES, dtype=torch.float64)
    expected = _stch(VALUES, [1 / 3] * 3, [0.0] * 3, 0.5)
    assert STCH(0.5)(losses).item() == pytest.approx(expected, rel=1e-14)


def test_it_bounds_the_weighted_maximum_within_mu_log_m():
    losses = torch.tensor(VALUES, dtype=torch.float64)
    tchebycheff = max(w * (v - z) for v, w, z in zip(VALUES, WEIGHTS, REFERENCE, strict=True))
    for mu in (1.0, 0.1, 1e-3):
        scalar = STCH(mu, weights=WEIGHTS, reference=REFERENCE)(losses).item()
        assert tchebycheff <= scalar <= tchebycheff + mu * math.log(3) + 1e-15


def test_large_losses_and_a_small_mu_do_not_overflow():
    losses = torch.tensor([1000.0, 999.5], requires_grad=True)
    scalar = STCH(0.01, weights=[1.0, 1.0])(losses)
    assert scalar.item() == pytest.approx(1000.0, rel=1e-7)
    scalar.backward()
    assert torch.isfinite(losses.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_no_overflow_in_any_dtype(dtype: torch.dtype):
    # mu log sum exp(x / mu) with x / mu = 3e30 / 1e-10 overflowed float32 (inf instead of 1e30).
    values = [1e4, 2e4, 3e4] if dtype == torch.float16 else [1e30, 2e30, 3e30]
    losses = torch.tensor(values, dtype=dtype, requires_grad=True)
    scalar = STCH(mu=1e-10)(losses)  # weights 1/3: the largest weighted loss is 1e30
    torch.testing.assert_close(
        scalar.double(), torch.tensor(values[2] / 3, dtype=torch.float64), rtol=1e-2, atol=0
    )
    scalar.backward()
    torch.testing.assert_close(
        losses.grad.double(),
        torch.tensor([0.0, 0.0, 1 / 3], dtype=torch.float64),
        rtol=1e-2,
        atol=0,
    )


def test_arguments_are_validated():
    for mu in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="Invalid mu value"):
            STCH(mu)
    with pytest.raises(
        ValueError,
        match="expected non-negative numbers, at least one positive",
    ):
        STCH(0.1, weights=[1.0, -0.5])
    with pytest.raises(
        ValueError,
        match="expected non-negative numbers, at least one positive",
    ):
        STCH(0.1, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="STCH has 2 weights but got 3 losses"):
        STCH(0.1, weights=[1.0, 1.0])(torch.ones(3))
    with pytest.raises(ValueError, match="STCH has 2 reference entries but got 3 losses"):
        STCH(0.1, reference=[1.0, 1.0])(torch.ones(3))
