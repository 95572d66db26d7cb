"""CAGrad: TorchJD's published values, and the solver against independent slow references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from jdoptim import CAGrad, CAGradWeighting

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _normal(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dual_objective(J: Tensor, c: float, w: Tensor) -> Tensor:
    """g_wᵀ g0 + √φ ‖g_w‖ for a batch of weights ``w`` [k, m] (CAGrad's inner problem)."""
    g0 = J.mean(dim=0)
    g_w = w @ J
    return g_w @ g0 + c * g0.norm() * g_w.norm(dim=1)


def _update_from_dual(J: Tensor, c: float, w: Tensor) -> Tensor:
    g0 = J.mean(dim=0)
    g_w = w @ J
    return g0 + c * g0.norm() * g_w / g_w.norm()


def _ternary(f, lo: float, hi: float, iterations: int = 90) -> float:
    """Minimiser of a convex function of one variable on [lo, hi], by ternary search."""
    for _ in range(iterations):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if f(a) <= f(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def _reference_by_search(J: Tensor, c: float) -> Tensor:
    """CAGrad for m = 2 or 3 by (nested) ternary search of the dual over the simplex."""
    m = J.shape[0]
    G = (J @ J.T).tolist()
    b = [sum(row) / m for row in G]  # g_iᵀ g0
    radius = c * math.sqrt(max(sum(b) / m, 0.0))

    def f(w: list[float]) -> float:
        quadratic = sum(w[i] * G[i][j] * w[j] for i in range(m) for j in range(m))
        linear = sum(wi * bi for wi, bi in zip(w, b, strict=True))
        return linear + radius * math.sqrt(max(quadratic, 0.0))

    if m == 2:
        a = _ternary(lambda a: f([a, 1 - a]), 0.0, 1.0)
        w = [a, 1 - a]
    else:

        def inner(a: float) -> float:
            return _ternary(lambda b: f([a, b, 1 - a - b]), 0.0, 1 - a)

        def outer(a: float) -> float:
            b = inner(a)
            return f([a, b, 1 - a - b])

        a = _ternary(outer, 0.0, 1.0)
        b = inner(a)
        w = [a, b, 1 - a - b]
    return _update_from_dual(J, c, torch.tensor(w, dtype=J.dtype))


def _reference_by_enumeration(J: Tensor, c: float) -> Tensor:
    """CAGrad by brute force over the sets S of rows that are active at the optimum.

    For the primal problem max t s.t. Jd ≥ t, ‖d - g0‖ ≤ √φ with the ball constraint active,
    the KKT conditions say d = g0 + J_Sᵀ v with v ≥ 0, g_iᵀd = t on S, g_iᵀd ≥ t off S and
    ‖J_Sᵀ v‖ = √φ; for a given S (with independent rows) v = G_S⁻¹(t 1 - b_S) and the last
    condition is a quadratic equation in t. Every S satisfying all conditions gives the optimum.
    """
    m = J.shape[0]
    g0 = J.mean(dim=0)
    phi = c**2 * float(g0 @ g0)
    G = J @ J.T
    b = J @ g0
    solutions = []
    for size in range(1, m + 1):
        for S in itertools.combinations(range(m), size):
            index = list(S)
            if torch.linalg.matrix_rank(J[index]) < size:
                continue
            inverse = torch.linalg.inv(G[index][:, index])
            one = torch.ones(size, dtype=J.dtype)
            qa = one @ inverse @ one
            qb = one @ inverse @ b[index]
            qc = b[index] @ inverse @ b[index]
            discriminant = qb**2 - qa * (qc - phi)
            if discriminant < 0:
                continue
            t = (qb + discriminant.sqrt()) / qa
            v = inverse @ (t - b[index])
            d = g0 + v @ J[index]
            scale = float(J.norm(dim=1).max() * d.norm())
            if (v >= -1e-12 * v.abs().max()).all() and (J @ d >= t - 1e-12 * scale).all():
                solutions.append(d)
    assert solutions, "no KKT point found"
    for d in solutions[1:]:
        torch.testing.assert_close(d, solutions[0], rtol=1e-8, atol=1e-10)
    return solutions[0]


def _spread(m: int, n: int, seed: int) -> Tensor:
    return _normal(m, n, seed) * torch.logspace(-3, 3, m, dtype=torch.float64)[:, None]


def _rank_deficient(m: int, n: int, rank: int, seed: int) -> Tensor:
    return _normal(m, rank, seed) @ _normal(rank, n, seed + 100)


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def test_torchjd_documented_values():
    # TorchJD 0.18: CAGrad docstring example and tests/unit/aggregation/test_values.py give
    # CAGrad(c=0.5)(J) = [0.1835, 1.2041, 1.2041] and CAGradWeighting(c=0.5)(G) = [0.7041, 0.5].
    for aggregator in (CAGrad(c=0.5), CAGrad(c=0.5, norm_eps=1e-4)):
        torch.testing.assert_close(
            aggregator(J_BASE),
            torch.tensor([0.1835, 1.2041, 1.2041], dtype=J_BASE.dtype),
            atol=1e-4,
            rtol=0,
        )
        torch.testing.assert_close(
            aggregator.weighting(J_BASE @ J_BASE.T),
            torch.tensor([0.7041, 0.5], dtype=J_BASE.dtype),
            atol=1e-4,
            rtol=0,
        )


def test_exact_value_on_the_documented_matrix():
    # The optimum puts all the dual weight on g1: d = g0 + c ‖g0‖ g1 / ‖g1‖.
    g0, g1 = J_BASE.mean(dim=0), J_BASE[0]
    expected = g0 + 0.5 * g0.norm() * g1 / g1.norm()
    torch.testing.assert_close(CAGrad(c=0.5)(J_BASE), expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 2.0])
@pytest.mark.parametrize(
    "J",
    [
        _normal(2, 5, 0),
        _normal(2, 2, 1),
        _spread(2, 4, 2),
        _normal(3, 6, 3),
        _spread(3, 5, 4),
        _rank_deficient(3, 6, 2, 5) + _normal(1, 6, 6),
    ],
    ids=["normal2", "square2", "spread2", "normal3", "spread3", "rank2of3"],
)
def test_agrees_with_a_ternary_search_of_the_dual(J: Tensor, c: float):
    expected = _reference_by_search(J, c)
    assert _relative_error(CAGrad(c=c)(J), expected) < 1e-6


@pytest.mark.parametrize("c", [0.25, 0.5, 0.9])
@pytest.mark.parametrize(
    "J",
    [
        _normal(4, 7, 7),
        _normal(6, 10, 8),
        _normal(6, 4, 9),
        _spread(5, 8, 10),
        _rank_deficient(5, 8, 2, 11),
        _rank_deficient(6, 9, 3, 12) + 2 * _normal(1, 9, 13),
    ],
    ids=["normal4", "normal6", "wide6", "spread5", "rank2of5", "rank3of6"],
)
def test_agrees_with_an_enumeration_of_active_sets(J: Tensor, c: float):
    expected = _reference_by_enumeration(J, c)
    assert _relative_error(CAGrad(c=c)(J), expected) < 1e-6


@pytest.mark.parametrize(("m", "n", "seed"), [(12, 30, 0), (30, 20, 1), (50, 200, 2)])
def test_duality_gap_vanishes_on_larger_problems(m: int, n: int, seed: int):
    # Any feasible d gives a lower bound min_i g_iᵀd on the optimal value, and any w on the simplex
    # an upper bound (the dual objective): CAGrad's d and its normalised weights must close the gap.
    J = _normal(m, n, seed) * torch.logspace(-1, 1, m, dtype=torch.float64)[:, None]
    c = 0.5
    weights = CAGrad(c=c).weighting(J @ J.T)
    d = weights @ J
    g0 = J.mean(dim=0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-12)
    correction = weights - 1 / m
    dual = _dual_objective(J, c, (correction / correction.sum())[None])[0]
    primal = (J @ d).min()
    scale = float(J.norm(dim=1).max() * g0.norm())
    assert abs(float(dual - primal)) <= 1e-10 * scale


def test_vanishing_mean_gives_the_mean():
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(c=0.5)(J), torch.zeros(2, dtype=J.dtype))


def test_zero_radius_gives_the_mean():
    J = _normal(5, 8, 20)
    torch.testing.assert_close(CAGrad(c=0.0)(J), J.mean(dim=0), rtol=1e-14, atol=0)


def test_single_row_is_scaled_by_one_plus_c():
    J = _normal(1, 6, 21)
    torch.testing.assert_close(CAGrad(c=0.7)(J), 1.7 * J[0], rtol=1e-13, atol=0)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_non_unique_optimum_gives_the_optimal_point_closest_to_the_mean(c: float):
    # g1 = -g2: every d has min_i g_iᵀd <= 0, and d = g0 (which has g1ᵀg0 = g2ᵀg0 = 0 and
    # g3ᵀg0 > 0) reaches 0, so g0 is optimal. TorchJD returns 0 here instead.
    J = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(c=c)(J), J.mean(dim=0), rtol=1e-13, atol=1e-15)


def test_non_unique_optimum_with_a_mean_that_conflicts():
    # g, -g, h with gᵀh ≠ 0: the optimal value is 0, reached on {gᵀd = 0, hᵀd ≥ 0}, whose point
    # closest to g0 = h/3 is h⊥/3 (h without its component along g), inside the ball for c = 0.9.
    g, h = _normal(2, 5, 22)
    J = torch.stack([g, -g, h])
    h_perp = h - (h @ g) / (g @ g) * g
    assert (h @ g).abs() / g.norm() < 0.9 * h.norm()
    torch.testing.assert_close(CAGrad(c=0.9)(J), h_perp / 3, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [1e-8, 1e-3, 1e4, 1e8])
def test_positively_homogeneous(scale: float):
    J = _normal(6, 9, 23)
    expected = scale * CAGrad(c=0.4)(J)
    torch.testing.assert_close(CAGrad(c=0.4)(scale * J), expected, rtol=1e-11, atol=0)


def test_norm_eps_treats_small_jacobians_as_zero():
    J = 1e-4 * _normal(3, 4, 24)
    assert CAGrad(c=0.5, norm_eps=1e-4)(J).abs().max() == 0
    assert CAGrad(c=0.5)(J).abs().max() > 0


def test_weighting_matches_aggregator_and_float32_matches_float64():
    J = _normal(7, 5, 25)
    aggregator = CAGrad(c=0.5)
    torch.testing.assert_close(aggregator.weighting(J @ J.T) @ J, aggregator(J))
    single = aggregator(J.float())
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), aggregator(J), rtol=1e-4, atol=1e-5)


def test_non_convergence_raises():
    J = _normal(30, 20, 26)
    with pytest.raises(RuntimeError, match="max_iters=1"):
        CAGrad(c=0.5, max_iters=1)(J)
    assert torch.isfinite(CAGrad(c=0.5)(J)).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"c": -0.1}, {"c": math.nan}, {"c": 0.5, "norm_eps": -1.0}, {"c": 0.5, "max_iters": 0}],
    ids=repr,
)
def test_invalid_arguments(kwargs: dict):
    with pytest.raises(ValueError, match="Invalid"):
        CAGrad(**kwargs)
    with pytest.raises(ValueError, match="Invalid"):
        CAGradWeighting(**kwargs)


@pytest.mark.parametrize(("rescale", "factor"), [(1, 1 + 0.6**2), (2, 1 + 0.6)])
def test_rescale_divides_the_update_as_the_papers_code_does(rescale: int, factor: float):
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(CAGrad(c=0.6, rescale=rescale)(J), CAGrad(c=0.6)(J) / factor)


@pytest.mark.parametrize("rescale", [3, -1, 1.5, "1", True])
def test_rescale_is_one_of_the_papers_codes(rescale):
    with pytest.raises(ValueError, match="Invalid rescale value"):
        CAGrad(c=0.5, rescale=rescale)
