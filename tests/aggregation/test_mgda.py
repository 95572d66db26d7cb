"""MGDA: the exact minimum-norm point of the convex hull of the rows, against a reference and the
optimality conditions; TorchJD's Frank-Wolfe iteration one argument away."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

from jdoptim import MGDA
from jdoptim.aggregation import MGDAWeighting
from jdoptim.linalg import gramian, min_norm_weights
from tests.properties import CONFLICT_TOL, faithful_gramian
from tests.strategies import degenerate_jacobians


def _reference(J: Tensor) -> Tensor:
    """The min-norm point from quadprog, through the least-distance problem min |x|² s.t.
    Jx ≥ 1, whose solution is d / |d|² (zero when the constraints are inconsistent, i.e. when
    0 is in the convex hull)."""
    A = J.double().numpy()
    m, n = A.shape
    try:
        x = quadprog.solve_qp(np.eye(n), np.zeros(n), A.T, np.ones(m))[0]
    except ValueError:
        return torch.zeros(n, dtype=torch.float64)
    return torch.from_numpy(x / (x @ x))


def _spread(seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 2, 6, dtype=torch.float64)[:, None]
    return torch.randn(6, 12, generator=generator, dtype=torch.float64) * scales


def test_exact_where_frank_wolfe_stops_early():
    # A 6 x 12 Jacobian with row norms from 1 to 100: TorchJD's iteration (epsilon=1e-3,
    # max_iters=100) stops at |d|² = 4.39; the minimum is 3.18.
    J = _spread(3)
    exact = MGDA()(J)
    torch.testing.assert_close(exact, _reference(J), rtol=1e-10, atol=0)
    assert exact @ exact == pytest.approx(3.1848, abs=1e-4)
    frank_wolfe = MGDA(solver="frank_wolfe")(J)
    assert frank_wolfe @ frank_wolfe == pytest.approx(4.3864, abs=1e-4)
    assert (J @ exact >= exact @ exact * (1 - 1e-12)).all()


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("m", "n"), [(2, 3), (5, 8), (12, 6), (20, 40)])
def test_matches_the_quadprog_reference(seed: int, m: int, n: int):
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    J = J + torch.randn(1, n, generator=generator, dtype=torch.float64) * (seed % 3)
    expected = _reference(J)
    update = MGDA()(J)
    scale = J.norm(dim=1).max()
    torch.testing.assert_close(update, expected, rtol=0, atol=1e-10 * scale.item())


def _assert_optimal(J: Tensor, weights: Tensor, eps: float) -> None:
    """The KKT conditions, which certify the minimiser: w on the simplex, g_iᵀd ≥ |d|² for every
    row, with equality where w_i > 0; to rounding relative to |g_i| times the largest norm."""
    J = J.double()
    assert (weights >= 0).all() and abs(weights.sum().item() - 1.0) <= 1e-12
    d = weights @ J
    norms = J.norm(dim=1)
    tolerance = 64 * eps * norms * norms.max()
    slack = J @ d - d @ d
    assert (slack >= -tolerance).all(), (slack / tolerance).min()
    assert (slack[weights > 0] <= tolerance[weights > 0]).all(), (slack / tolerance).max()


def _faithful_gramian(J: Tensor) -> Tensor | None:
    """``J Jᵀ`` in J's dtype, or None where it overflows or underflows there."""
    G = J @ J.T
    norms = J.double().norm(dim=1)
    n = J.shape[1]
    error = (G.double() - J.double() @ J.double().T).abs()
    bound = 8 * n * torch.finfo(J.dtype).eps * torch.outer(norms, norms)
    return G if torch.isfinite(G).all() and (error <= bound).all() else None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(degenerate_jacobians(dtypes=(torch.float64, torch.float32)))
def test_optimality_conditions_on_degenerate_jacobians(J: Tensor):
    G = _faithful_gramian(J)
    if G is None:
        return  # forming the Gramian in J's dtype lost it; nothing to solve exactly
    _assert_optimal(J, min_norm_weights(G, J.dtype), torch.finfo(J.dtype).eps)


@pytest.mark.parametrize(
    ("J", "expected"),
    [
        ([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], [0.0, 0.0]),  # a zero row
        ([[1.0, 1.0], [-2.0, -2.0], [0.0, 3.0]], [0.0, 0.0]),  # 0 on a segment of the hull
        ([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]], [2.0, 0.0]),  # duplicated rows
        ([[1.0, 0.0], [3.0, 0.0]], [1.0, 0.0]),  # parallel rows: the shorter one
        ([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [0.5, 0.5]),  # a row inside the hull
        ([[4.0, 0.0, 1.0]], [4.0, 0.0, 1.0]),  # a single row
    ],
)
def test_degenerate_rows_exactly(J, expected):
    J = torch.tensor(J, dtype=torch.float64)
    atol = 4 * torch.finfo(J.dtype).eps * J.norm(dim=1).max().item()
    torch.testing.assert_close(MGDA()(J), torch.tensor(expected, dtype=J.dtype), rtol=0, atol=atol)


def test_a_tiny_row_is_the_answer_when_it_is_nearest():
    J = torch.tensor([[1e-18, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    update = MGDA()(J)
    torch.testing.assert_close(update, J[0], rtol=1e-12, atol=0)


def test_duplicated_and_dependent_rows_change_nothing():
    generator = torch.Generator().manual_seed(5)
    J = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    extra = torch.stack([J[1], 0.5 * J[0] + 0.5 * J[2], J[3]])  # inside the hull or repeated
    torch.testing.assert_close(MGDA()(torch.cat([J, extra])), MGDA()(J), rtol=0, atol=1e-14)


@pytest.mark.parametrize(("m", "rank"), [(128, 128), (128, 20), (64, 3)])
def test_many_rows_terminate_exactly(m: int, rank: int):
    generator = torch.Generator().manual_seed(m + rank)
    J = torch.randn(m, rank, generator=generator, dtype=torch.float64) @ torch.randn(
        rank, 256, generator=generator, dtype=torch.float64
    )
    J = J + 0.2 * J.norm(dim=1).mean() / 16 * torch.randn(1, 256, generator=generator)
    weights = MGDA().weighting(J @ J.T)
    _assert_optimal(J, weights, torch.finfo(torch.float64).eps)


def test_half_precision_is_solved_in_float32():
    J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    for dtype in (torch.bfloat16, torch.float16):
        weights = MGDAWeighting()((J @ J.T).to(dtype))
        assert weights.dtype == dtype
        torch.testing.assert_close(
            weights.float(), torch.tensor([0.8, 0.2, 0.0]), atol=4e-3, rtol=0
        )


@pytest.mark.parametrize("solver", ["active_set", "frank_wolfe"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gramians_give_non_finite_weights(solver: str, value: float):
    G = torch.eye(3, dtype=torch.float64)
    G[1, 2] = G[2, 1] = value
    assert not torch.isfinite(MGDAWeighting(solver)(G)).all()


def test_frank_wolfe_keeps_torchjds_iteration():
    # TorchJD 0.18 documentation: MGDA()(J) = [1.1921e-07, 1.0000e+00, 1.0000e+00] for these
    # rows (float32), where the exact point is [0, 1, 1].
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    torch.testing.assert_close(
        MGDA(solver="frank_wolfe")(J), torch.tensor([0.0, 1.0, 1.0]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(MGDA()(J), torch.tensor([0.0, 1.0, 1.0]), atol=1e-6, rtol=0)


# --- gradient normalisations (MGDA-UB's experiments, LibMTL's mgda_gn) ---------------------------


def _normalizers(J: Tensor, losses: Tensor, normalization: str) -> Tensor:
    norms = J.norm(dim=1)
    return {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
@pytest.mark.parametrize("seed", range(4))
def test_normalised_rows_give_their_min_norm_point(normalization: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(5, 7, generator=generator, dtype=torch.float64)
    J = J * torch.logspace(-3, 3, 5, dtype=torch.float64)[:, None]
    losses = torch.rand(5, generator=generator, dtype=torch.float64) * 10 + 0.01
    normalized = J / _normalizers(J, losses, normalization)[:, None]
    update = MGDA(normalization=normalization)(J, losses=losses)
    torch.testing.assert_close(update, _reference(normalized), rtol=1e-10, atol=1e-13)
    # The weights of the unnormalised rows, and the update still conflicts with no row.
    weights = MGDAWeighting(normalization=normalization)(J @ J.T, losses=losses)
    torch.testing.assert_close(weights @ J, update)
    assert (J @ update >= -1e-12 * J.norm(dim=1) * update.norm()).all()


def test_l2_normalisation_is_invariant_to_the_rows_scales_and_keeps_zero_rows():
    J = torch.tensor([[1.0, 0.0], [1.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    update = MGDA(normalization="l2")(J[:2])
    scaled = J[:2] * torch.tensor([[1e-20], [1e20]], dtype=torch.float64)
    torch.testing.assert_close(MGDA(normalization="l2")(scaled), update)
    torch.testing.assert_close(MGDA(normalization="l2")(J), torch.zeros(2, dtype=torch.float64))


def test_loss_normalisation_needs_positive_losses():
    J = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="MGDA needs the values of the losses"):
        MGDA(normalization="loss")(J)
    with pytest.raises(ValueError, match="losses must be positive"):
        MGDA(normalization="loss+")(J, losses=torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(MGDA(normalization="l2")(J), MGDA()(J))  # needs no losses


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_normalised_updates_never_conflict_on_degenerate_input(normalization: str, data):
    J = data.draw(degenerate_jacobians(dtypes=(torch.float64, torch.float32)))
    # Losses from 1e-6 to 1e6: wider, the normalised rows' norms can span more than the
    # min-norm solver separates (see MGDA's docstring).
    exponents = data.draw(st.lists(st.floats(-6.0, 6.0), min_size=J.shape[0], max_size=J.shape[0]))
    losses = (10.0 ** torch.tensor(exponents, dtype=torch.float64)).to(J.dtype)
    aggregator = MGDA(normalization=normalization)
    update = aggregator(J, losses=losses)
    if not faithful_gramian(aggregator, J):
        return  # the Gramian formed in J's dtype overflowed or underflowed: it is not J's
    assert torch.isfinite(update).all()
    # Relative to S = Σ_j |w_j| |g_j| (the size of the terms of the update), as in
    # tests/properties.py: rounding the update costs about eps times that.
    weights = MGDAWeighting(normalization=normalization)(gramian(J), losses=losses).double()
    J64, d = J.double(), update.double()
    norms = J64.norm(dim=1)
    scale = (weights.abs() * norms).sum()
    worst = ((J64 @ d) / (norms * scale).clamp(min=torch.finfo(torch.float64).tiny)).min()
    assert worst >= -CONFLICT_TOL * J.shape[0] * torch.finfo(J.dtype).eps
