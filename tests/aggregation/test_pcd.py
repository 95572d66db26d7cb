"""PCD: the paper's closed forms, an enumeration of active sets, and the moving average."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from torch import Tensor

from jdoptim import PCD, PCDWeighting
from jdoptim.linalg._constraints import gramian_factor, project_onto_constraints, tolerances

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _normal(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _first_call_scales(J: Tensor, eps: float) -> Tensor:
    # At the first call, the debiased moving average is ‖g_i‖² itself.
    return 1.0 / (J.norm(dim=1) ** 2 + eps).sqrt()


def _two_objectives(J: Tensor, tau: float, scales: Tensor) -> Tensor:
    """Corollary 4.6 of the paper: with one secondary objective, μ = max(0, (τ‖g̃2‖² - g̃1ᵀg̃2) /
    ‖g̃2‖²), d̃ = g̃1 + μ g̃2, and the update is d̃ rescaled to ‖g1‖."""
    g1, g2 = J[0] * scales[0], J[1] * scales[1]
    mu = max(0.0, float((tau * (g2 @ g2) - g1 @ g2) / (g2 @ g2)))
    d = g1 + mu * g2
    return d * J[0].norm() / d.norm()


def _enumerate_projection(K: Tensor, b: Tensor) -> Tensor:
    """Multipliers μ of min ½‖d - x0‖² s.t. Ad ≥ h (K = AAᵀ, b = h - Ax0) by enumeration of the
    active sets, as in Appendix B.2 of the paper: the first set S of independent constraints whose
    multipliers μ_S = K_S⁻¹ b_S are non-negative and satisfy every other constraint is optimal."""
    k = K.shape[0]
    tol = 1e-10 * float(K.diagonal().max())
    for size in range(k + 1):
        for S in itertools.combinations(range(k), size):
            index = list(S)
            mu = torch.zeros(k, dtype=K.dtype)
            if index:
                block = K[index][:, index]
                if torch.linalg.eigvalsh(block).min() <= 1e-10 * block.diagonal().max():
                    continue
                mu[index] = torch.linalg.solve(block, b[index])
            if (mu >= -tol).all() and (K @ mu - b >= -tol).all():
                return mu
    raise AssertionError("infeasible")


def _enumerate_qp(G: Tensor, taus: Tensor) -> Tensor:
    """Weights (1, μ_2, ..., μ_m) of PCD's d̃ = g̃1 + Σ μ_j g̃_j from the normalised Gramian."""
    mu = _enumerate_projection(G[1:, 1:], taus * G.diagonal()[1:] - G[1:, 0])
    return torch.cat([torch.ones(1, dtype=G.dtype), mu])


def test_two_objectives_match_corollary_4_6():
    for tau in (0.0, 0.02, 0.5, 1.0):
        expected = _two_objectives(J_BASE, tau, _first_call_scales(J_BASE, 1e-8))
        torch.testing.assert_close(PCD(tau=tau)(J_BASE), expected, rtol=1e-12, atol=0)


def test_documented_example():
    # g̃1ᵀg̃2 = -22/√684, so μ = 0.5 + 22/√684 and d̃ = g̃1 + μ g̃2, rescaled to ‖g1‖ = √18.
    expected = _two_objectives(J_BASE, 0.5, 1.0 / J_BASE.norm(dim=1))
    torch.testing.assert_close(PCD(tau=0.5, eps=0.0)(J_BASE), expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        PCD(tau=0.5)(J_BASE), torch.tensor([2.0889, 2.6112, 2.6112], dtype=torch.float64),
        atol=1e-4, rtol=0,
    )  # fmt: skip


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize(("m", "n", "seed"), [(3, 5, 0), (4, 8, 1), (5, 3, 2), (6, 10, 3)])
def test_agrees_with_an_enumeration_of_active_sets(m: int, n: int, seed: int, tau: float):
    J = _normal(m, n, seed) * torch.logspace(-3, 3, m, dtype=torch.float64)[:, None]
    eps = 1e-8
    scales = _first_call_scales(J, eps)
    Gs = (J @ J.T) * torch.outer(scales, scales)
    taus = torch.full((m - 1,), tau, dtype=torch.float64)
    if m > n + 1:
        # The secondaries may be unable to all improve; keep only feasible draws.
        try:
            _enumerate_qp(Gs, taus)
        except AssertionError:
            pytest.skip("infeasible draw")
    w = _enumerate_qp(Gs, taus)
    d = (w * scales) @ J
    expected = d * J[0].norm() / d.norm()
    actual = PCD(tau=tau, eps=eps)(J)
    assert (actual - expected).norm() <= 1e-9 * expected.norm()


@pytest.mark.parametrize(("k", "n", "seed"), [(3, 6, 4), (6, 4, 5), (8, 8, 6), (10, 3, 7)])
def test_projection_kernel_satisfies_kkt_and_matches_enumeration(k: int, n: int, seed: int):
    A = _normal(k, n, seed)
    x0 = _normal(1, n, seed + 50)[0]
    y = _normal(1, n, seed + 60)[0]
    h = A @ y - _normal(1, k, seed + 70)[0].abs()  # y is feasible
    K, b = A @ A.T, h - A @ x0
    L = gramian_factor(K, torch.float64)  # coordinates of the rows of A in a basis of their span
    torch.testing.assert_close(L @ L.T, K)
    mu, feasible = project_onto_constraints(L, b, tolerances(torch.float64))
    assert feasible
    slack = K @ mu - b
    assert (mu >= 0).all()
    assert (slack >= -1e-10 * (K.abs() @ mu + b.abs())).all()
    assert (mu * slack).abs().max() <= 1e-10 * float(K.abs().max() * mu.abs().max() ** 2 + 1)
    # Multipliers may differ when constraints are dependent; the projection may not.
    expected = x0 + _enumerate_projection(K, b) @ A
    assert (x0 + mu @ A - expected).norm() <= 1e-9 * (1 + expected.norm())


def test_projection_kernel_detects_infeasibility():
    a = _normal(1, 4, 8)[0]
    A = torch.stack([a, -a, _normal(1, 4, 9)[0]])
    b = torch.ones(3, dtype=A.dtype)
    _, feasible = project_onto_constraints(A, b, tolerances(torch.float64))
    assert not feasible


def test_projection_kernel_non_convergence_raises():
    A = _normal(6, 3, 8)
    b = torch.ones(6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="did not finish within 1 steps"):
        project_onto_constraints(A, b, tolerances(torch.float64), max_iters=1)


def test_primary_gradient_when_constraints_hold():
    J = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(PCD(tau=0.5)(J), J[0])


def test_infeasible_constraints_warn_and_give_the_primary_gradient():
    # The two secondary gradients are opposite: no direction improves both.
    J = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="dropped"):
        update = PCD()(J)
    torch.testing.assert_close(update, J[0])


def test_opposed_secondary_reverses_the_primary():
    J = torch.tensor([[1.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(PCD(tau=0.02)(J), torch.tensor([-1.0, 0.0], dtype=J.dtype))


def test_vanishing_direction_gives_zero():
    # τ = 0 and g2 = -2 g1: d̃ = g̃1 + μ g̃2 = 0 exactly at the optimum.
    J = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=torch.float64)
    assert PCD(tau=0.0)(J).abs().max() <= 1e-12


def test_zero_primary_gives_zero_and_zero_secondary_is_ignored():
    J = _normal(3, 5, 9)
    J[0] = 0.0
    assert PCD()(J).abs().max() == 0
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(PCD(eps=0.0)(J), J[0])


def test_single_row_is_returned():
    J = _normal(1, 4, 10)
    torch.testing.assert_close(PCD()(J), J[0])


def test_output_norm_is_the_primary_norm():
    for seed in range(5):
        J = _normal(4, 6, 11 + seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            update = PCD(tau=0.1)(J)
        torch.testing.assert_close(update.norm(), J[0].norm(), rtol=1e-12, atol=0)


def test_first_call_invariant_to_positive_row_scaling():
    J = _normal(4, 6, 16)
    c = torch.tensor([2.0, 0.1, 30.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(PCD(eps=0.0)(c[:, None] * J), c[0] * PCD(eps=0.0)(J))


def test_second_call_uses_the_debiased_moving_average():
    beta = 0.9
    J1, J2 = _normal(2, 6, 17), 10.0 * _normal(2, 6, 18)
    aggregator = PCD(tau=0.3, beta=beta, eps=0.0)
    aggregator(J1)
    average = beta * (1 - beta) * J1.norm(dim=1) ** 2 + (1 - beta) * J2.norm(dim=1) ** 2
    scales = 1.0 / (average / (1 - beta**2)).sqrt()
    torch.testing.assert_close(aggregator(J2), _two_objectives(J2, 0.3, scales))


def test_state_dict_reset_and_change_of_m():
    J1, J2 = _normal(3, 5, 19), _normal(3, 5, 20)
    aggregator = PCD(beta=0.5)
    first = aggregator(J1)
    aggregator(J2)
    restored = PCD(beta=0.5)
    restored.load_state_dict(copy.deepcopy(aggregator.state_dict()))
    torch.testing.assert_close(restored(J1), aggregator(J1), rtol=0, atol=0)
    aggregator.reset()
    torch.testing.assert_close(aggregator(J1), first, rtol=0, atol=0)
    aggregator(_normal(4, 5, 21))  # another number of objectives restarts the average
    torch.testing.assert_close(aggregator(J1), first, rtol=0, atol=0)


def test_non_finite_input_gives_nan_and_keeps_the_state():
    J = _normal(3, 5, 22)
    bad = J.clone()
    bad[1, 2] = math.inf
    aggregator, reference = PCD(), PCD()
    aggregator(J)
    reference(J)
    assert aggregator(bad).isnan().all()
    torch.testing.assert_close(aggregator(J), reference(J), rtol=0, atol=0)


def test_vector_tau():
    J = _normal(4, 6, 23)
    torch.testing.assert_close(PCD(tau=[0.3, 0.3, 0.3])(J), PCD(tau=0.3)(J))
    assert repr(PCD(tau=[0.1, 0.2])) == "PCD(tau=[0.1, 0.2], beta=0.999, eps=1e-08)"
    with pytest.raises(ValueError, match="values of tau"):
        PCD(tau=[0.1, 0.2])(J)


def test_weighting_matches_aggregator():
    J = _normal(4, 6, 24)
    torch.testing.assert_close(PCDWeighting(tau=0.1)(J @ J.T) @ J, PCD(tau=0.1)(J))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tau": -0.1},
        {"tau": 1.5},
        {"tau": math.nan},
        {"tau": [0.1, 2.0]},
        {"beta": 1.0},
        {"beta": -0.1},
        {"eps": -1e-9},
    ],
    ids=repr,
)
def test_invalid_arguments(kwargs: dict):
    with pytest.raises(ValueError, match="Invalid"):
        PCD(**kwargs)
