"""The independent dual-cone reference (`tests.dual_cone_reference`) checked on its own.

It is what the solver of `jdoptim.linalg` is judged by, so it is checked here against a second
algorithm (scipy's SLSQP on ``min vᵀGv, v ≥ u``), against its KKT conditions, against closed
forms and for agreement between the Jacobian and a square root of its Gramian.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from tests.dual_cone_reference import (
    cosines,
    dualproj_reference,
    gramian_root,
    kkt_residuals,
    largest_row_norm,
    project_with_jacobian,
    reference_weights,
    update_error,
    update_norm,
    upgrad_reference,
)


def _jacobians() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    normal = rng.standard_normal((6, 9))
    low_rank = rng.standard_normal((8, 2)) @ rng.standard_normal((2, 9))
    zero_and_duplicate = rng.standard_normal((6, 9))
    zero_and_duplicate[1] = 0.0
    zero_and_duplicate[4] = zero_and_duplicate[2]
    weakly_stationary = rng.standard_normal((20, 10))
    weakly_stationary[10] = -(rng.uniform(0.1, 1.1, 10) @ weakly_stationary[:10])
    conflicting = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [1.0, -3.0, 0.5]])
    spread = rng.standard_normal((7, 5)) * np.logspace(-6, 6, 7)[:, None]
    return {
        "normal": normal,
        "low_rank": low_rank,
        "zero_and_duplicate": zero_and_duplicate,
        "weakly_stationary": weakly_stationary,
        "conflicting": conflicting,
        "spread": spread,
    }


JACOBIANS = _jacobians()


def _slsqp(u: np.ndarray, G: np.ndarray) -> np.ndarray:
    """SLSQP on the problem in the variables ``s_j = ‖g_j‖ v_j`` (objective ``sᵀCs``, ``C`` the
    cosines), which it needs when the rows' norms are far apart."""
    norms = np.sqrt(np.diag(G))
    norms[norms == 0.0] = 1.0  # a zero row: its variable does not enter the objective
    C = G / norms[:, None] / norms[None, :]
    result = minimize(
        lambda s: s @ C @ s,
        x0=np.maximum(u * norms, 0.0) + norms,
        jac=lambda s: 2.0 * C @ s,
        bounds=[(bound, None) for bound in u * norms],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert result.success, result.message
    return result.x / norms


@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_reference_agrees_with_slsqp(name: str):
    J = JACOBIANS[name]
    G = J @ J.T
    m = G.shape[0]
    U = np.vstack([np.eye(m) / m, np.full((1, m), 1.0 / m)])
    V = reference_weights(U, G)
    row_norm = largest_row_norm(G)
    for u, v in zip(U, V, strict=True):
        v_slsqp = _slsqp(u, G)
        # The reference is at least as good as SLSQP, and both find the same update.
        assert v @ G @ v <= v_slsqp @ G @ v_slsqp * (1 + 1e-9) + 1e-15 * row_norm**2
        assert update_error(v, v_slsqp, J) <= 1e-5 * (update_norm(v, J) + row_norm)


@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_reference_meets_kkt(name: str):
    J = JACOBIANS[name]
    G = J @ J.T
    U = np.eye(G.shape[0])
    residuals = kkt_residuals(U, G, reference_weights(U, G))
    assert max(residuals.values()) <= 1e-10, residuals


@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_square_root_gives_the_update_of_the_jacobian(name: str):
    J = JACOBIANS[name]
    G = J @ J.T
    U = np.eye(G.shape[0])
    from_jacobian = project_with_jacobian(U, J)
    from_root = reference_weights(U, G)
    row_norm = largest_row_norm(G)
    for v_j, v_g in zip(from_jacobian, from_root, strict=True):
        assert update_error(v_j, v_g, J) <= 1e-9 * (update_norm(v_j, J) + row_norm)
    assert np.allclose(gramian_root(G) @ gramian_root(G).T, G, rtol=0, atol=1e-12 * row_norm**2)


def test_closed_forms():
    # Two rows: v for e_1 is (1, max(0, -G12/G22)); without conflict the bound is the solution.
    G = np.array([[1.0, -1.0], [-1.0, 4.0]])
    assert np.allclose(reference_weights(np.eye(2), G), [[1.0, 0.25], [1.0, 1.0]], atol=1e-14)
    # UPGrad and DualProj on rows (-4, 1, 1) and (6, 1, 1): (10/9, 15/19) and (11/18, 1/2).
    J = JACOBIANS["conflicting"][:2]
    assert np.allclose(upgrad_reference(J @ J.T), [10 / 9, 15 / 19], atol=1e-12)
    assert np.allclose(dualproj_reference(J @ J.T), [11 / 18, 1 / 2], atol=1e-12)
    # No conflict: u itself.
    assert np.allclose(dualproj_reference(np.eye(3)), np.full(3, 1 / 3), atol=1e-15)


def test_weakly_stationary_update_is_zero():
    # A positive combination of the rows is 0, and it spans all of them: the cone {x: Jx ≥ 0} is
    # a subspace orthogonal to all rows, so every projection is 0.
    rng = np.random.default_rng(3)
    J = rng.standard_normal((4, 6))
    J = np.vstack([J, -(rng.uniform(0.5, 1.5, 4) @ J)])
    G = J @ J.T
    assert update_norm(upgrad_reference(G), J) <= 1e-12 * largest_row_norm(G)


def test_scale_and_indefinite_rounding():
    rng = np.random.default_rng(5)
    J = rng.standard_normal((8, 3)) @ rng.standard_normal((3, 9)) + 2.0 * rng.standard_normal(9)
    G = J @ J.T
    w = upgrad_reference(G)
    bar = 1e-9 * (update_norm(w, J) + largest_row_norm(G))
    for scale in (1e-150, 1e-30, 1e30, 1e150):
        assert update_error(upgrad_reference(G * scale), w, J) <= bar
    # Rounded to float32, the Gramian is indefinite; the reference still answers.
    G32 = (J.astype(np.float32) @ J.T.astype(np.float32)).astype(np.float64)
    assert np.linalg.eigvalsh(G32).min() < 0.0
    assert update_error(upgrad_reference(G32), w, J) <= 1e-2 * largest_row_norm(G)


def test_cosines():
    J = JACOBIANS["conflicting"]
    G = J @ J.T
    w = np.array([1.0, -2.0, 0.5])
    d = J.T @ w
    expected = J @ d / (np.linalg.norm(J, axis=1) * np.linalg.norm(d))
    assert np.allclose(cosines(w, G), expected, atol=1e-14)
    assert np.allclose(cosines(w, G * 1e200), expected, atol=1e-14)
    assert np.all(cosines(np.zeros(3), G) == 0.0)
    assert np.all(cosines(upgrad_reference(G), G) >= -1e-12)
