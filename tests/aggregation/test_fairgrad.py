"""FairGrad: the solver against coordinate descent by bisection, and the method's special cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from jdoptim import FairGrad, FairGradWeighting

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _normal(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def with_common_direction(m: int, n: int, seed: int) -> Tensor:
    """Rows with a shared component, so that some direction improves them all."""
    return _normal(m, n, seed) + 2.0 * _normal(1, n, seed + 1000)


def _in_a_cone(m: int, n: int, seed: int) -> Tensor:
    """Rank-2 rows, positive combinations of two vectors."""
    return (_normal(m, 2, seed).abs() + 0.1) @ _normal(2, n, seed + 1000)


def coordinate_descent(G: Tensor, alpha: float, sweeps: int = 20000) -> Tensor:
    """Solve G w = w^(-1/α), w > 0, by cyclic coordinate descent on the convex potential
    ½wᵀGw - Σ h(w_i), h' = w^(-1/α): each coordinate solves its own equation
    G_ii w_i + Σ_{j≠i} G_ij w_j = w_i^(-1/α) exactly, by bisection on log w_i."""
    m = G.shape[0]
    g = G.tolist()
    w = [1.0] * m
    for _ in range(sweeps):
        largest_change = 0.0
        for i in range(m):
            others = sum(g[i][j] * w[j] for j in range(m) if j != i)
            lo, hi = -700.0, 700.0
            for _ in range(80):
                mid = (lo + hi) / 2
                left = g[i][i] * math.exp(mid) + others
                if left > 0 and math.log(left) > -mid / alpha:
                    hi = mid
                else:
                    lo = mid
            new = math.exp((lo + hi) / 2)
            largest_change = max(largest_change, abs(new - w[i]) / new)
            w[i] = new
        if largest_change < 1e-15:
            break
    return torch.tensor(w, dtype=G.dtype)


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    return float(((actual - expected).abs() / expected.abs()).max())


MATRICES = {
    "normal2": with_common_direction(2, 5, 0),
    "normal4": with_common_direction(4, 8, 1),
    "wide6": with_common_direction(6, 4, 2),
    "spread5": with_common_direction(5, 7, 3) * torch.logspace(-3, 3, 5)[:, None].double(),
    "cone6": _in_a_cone(6, 3, 4),
}


@pytest.mark.parametrize("alpha", [0.25, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("name", MATRICES)
def test_agrees_with_coordinate_descent(name: str, alpha: float):
    J = MATRICES[name]
    G = J @ J.T
    expected = coordinate_descent(G, alpha)
    weights = FairGradWeighting(alpha)(G)
    assert _relative_error(weights, expected) < 1e-6
    # The defining property: g_iᵀd = w_i^(-1/α) > 0, so d conflicts with no objective.
    d = FairGrad(alpha)(J)
    torch.testing.assert_close(J @ d, weights ** (-1 / alpha), rtol=1e-8, atol=0)


def test_documented_example():
    G = J_BASE @ J_BASE.T
    weights = FairGradWeighting(2.0)(G)
    torch.testing.assert_close(G @ weights, weights ** (-0.5), rtol=1e-9, atol=0)
    torch.testing.assert_close(weights, coordinate_descent(G, 2.0), rtol=1e-9, atol=0)


@pytest.mark.parametrize("scale", [1e-6, 1e5])
def test_scaling_the_jacobian(scale: float):
    # w(s² G) = s^(-2α/(1+α)) w(G).
    J, alpha = with_common_direction(4, 5, 6), 3.0
    expected = scale ** (-2 * alpha / (1 + alpha)) * FairGradWeighting(alpha)(J @ J.T)
    actual = FairGradWeighting(alpha)((scale * J) @ (scale * J).T)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=0)


def test_alpha_zero_is_the_mean():
    J = _normal(4, 3, 7)
    torch.testing.assert_close(FairGrad(0.0)(J), J.mean(dim=0))


@pytest.mark.parametrize(
    "J",
    [
        torch.zeros(3, 4, dtype=torch.float64),
        torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64),
        torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
        torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
    ],
    ids=["zero", "opposite", "zero_row", "weakly_stationary"],
)
def test_no_common_ascent_direction_gives_zero(J: Tensor):
    assert FairGrad(2.0)(J).abs().max() == 0


def test_float32_matches_float64():
    J = with_common_direction(6, 9, 8)
    torch.testing.assert_close(
        FairGrad(2.0)(J.float()).double(), FairGrad(2.0)(J), rtol=1e-4, atol=0
    )


def test_non_convergence_raises():
    J = MATRICES["spread5"]
    with pytest.raises(RuntimeError, match="max_iters=1"):
        FairGrad(2.0, max_iters=1)(J)


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": -1.0}, {"alpha": math.inf}, {"alpha": math.nan}, {"alpha": 1.0, "max_iters": 0}],
    ids=repr,
)
def test_invalid_arguments(kwargs: dict):
    with pytest.raises(ValueError, match="Invalid"):
        FairGrad(**kwargs)
