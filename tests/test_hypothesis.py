"""Property-based robustness: every registered aggregator, on random Jacobians of random shapes and
scales, returns a finite update of the right shape, or refuses the input with a ValueError."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jdoptim

KINDS = ("normal", "low_rank", "zero_row", "duplicated", "opposite", "common_direction")


def _jacobian(kind: str, m: int, n: int, log_scale: float, seed: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if kind == "low_rank":
        J = torch.randn(m, 1, generator=generator, dtype=torch.float64) @ J[:1]
    elif kind == "zero_row":
        J[0] = 0.0
    elif kind == "duplicated" and m > 1:
        J[-1] = J[0]
    elif kind == "opposite" and m > 1:
        J[-1] = -J[0]
    elif kind == "common_direction":
        J = J + 3.0 * torch.randn(1, n, generator=generator, dtype=torch.float64)
    return (J * 10.0**log_scale).to(dtype)


@pytest.mark.parametrize("name", jdoptim.list_aggregators())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 20),
    log_scale=st.floats(-8.0, 8.0),
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_finite_output_or_clear_value_error(name, m, n, log_scale, seed, kind, dtype):
    J = _jacobian(kind, m, n, log_scale, seed, dtype)
    torch.manual_seed(seed)
    try:
        aggregator = jdoptim.get_spec(name).example(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            update = aggregator(J)
    except ValueError as error:
        assert str(error), f"{name} raised a ValueError without a message"
        return
    assert update.shape == (n,)
    assert update.dtype == dtype
    assert torch.isfinite(update).all(), (name, kind, update)
