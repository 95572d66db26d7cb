"""The dual-cone projection: the batched active-set solver against KKT, quadprog and geometry.

Each projection solves min_v vᵀGv subject to v ≥ u. Its KKT conditions (v ≥ u, λ = Gv ≥ 0,
(v − u)ᵀλ = 0) are checked in float64, relative to the problem's scale
σ = Σ_j ‖g_j‖ (|u_j| + |v_j − u_j|), the size of the terms of Jᵀv (so that λ_j / ‖g_j‖ ≥ −tol·σ
is a statement about angles). Where G is singular the minimiser v need not be unique, but Jᵀv
is: comparisons then go through Jᵀv or Gv.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from jdoptim import DualProj, UPGrad
from jdoptim.linalg import _dual_cone
from jdoptim.linalg._dual_cone import (
    SOLVERS,
    project_weights,
    project_weights_active_set,
)
from jdoptim.linalg._quadprog import project_weights_quadprog

F64 = torch.float64
DTYPES = [torch.float64, torch.float32]

# Non-conflict bar: g_i · d ≥ −BAR · ‖g_i‖ ‖d‖; KKT bar: relative residuals ≤ KKT_BAR.
BAR = {torch.float64: 1e-10, torch.float32: 1e-5}
KKT_BAR = {torch.float64: 1e-9, torch.float32: 1e-5}


def _normal(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rows(*rows: Tensor) -> Tensor:
    return torch.stack(rows)


def _duplicated() -> Tensor:
    J = _normal(4, 7, 3)
    return torch.cat([J, J[[0, 2]], J[[0]]])


def _zero_row() -> Tensor:
    J = _normal(5, 7, 4)
    J[1] = 0.0
    return J


def _strongly_stationary() -> Tensor:
    g, h = _normal(2, 6, 5)
    return _rows(g, -g, h, -h, g + h, -(g + h))


def _weakly_stationary() -> Tensor:
    g, h, k = _normal(3, 6, 6)
    return _rows(g, -g, h, k)


def _spread_norms() -> Tensor:
    return _normal(7, 9, 7) * torch.logspace(-3, 3, 7, dtype=F64)[:, None]


def _mostly_agree() -> Tensor:
    J = _normal(10, 12, 8)
    return J + 1.5 * _normal(1, 12, 9)


LIBRARY: dict[str, Callable[[], Tensor]] = {
    "normal_5x8": lambda: _normal(5, 8, 0),
    "normal_2x3": lambda: _normal(2, 3, 1),
    "normal_12x6_rank6": lambda: _normal(12, 6, 2),
    "normal_24x40": lambda: _normal(24, 40, 10),
    "rank3_9x11": lambda: _normal(9, 3, 11).abs() @ _normal(3, 11, 12),
    "rank1_3x5_same_sign": lambda: (
        torch.tensor([[1.0], [2.0], [0.5]], dtype=F64) @ _normal(1, 5, 13)
    ),
    "zero_4x6": lambda: torch.zeros(4, 6, dtype=F64),
    "single_row": lambda: _normal(1, 7, 14),
    "duplicated_rows": _duplicated,
    "zero_row": _zero_row,
    "strongly_stationary": _strongly_stationary,
    "rank1_mixed_signs": lambda: (
        torch.tensor([[1.0], [-2.0], [0.5], [-1.0]], dtype=F64) @ _normal(1, 5, 15)
    ),
    "weakly_stationary": _weakly_stationary,
    "spread_norms": _spread_norms,
    "mostly_agree": _mostly_agree,
    **{
        f"scaled_{scale:.0e}": (lambda scale=scale: _normal(6, 9, 16) * scale)
        for scale in (1e-10, 1e-5, 1e5, 1e10, 1e15)
    },
}
"""Name → float64 Jacobian; tests cast it to the dtype under test."""

ZERO_PROJECTION = {"zero_4x6", "strongly_stationary", "rank1_mixed_signs"}
"""0 is a positive combination of all the rows: the dual cone is the orthogonal complement of
the rows, so every projection, and UPGrad's update, is 0."""


def _kkt_residuals(U: Tensor, G: Tensor, V: Tensor) -> tuple[float, float]:
    """Largest relative dual infeasibility and complementarity gap, computed in float64."""
    U, G, V = U.to(F64), G.to(F64), V.to(F64)
    norms = G.diagonal().clamp(min=0).sqrt()
    lam = V @ G
    sigma = ((U.abs() + (V - U).abs()) * norms).sum(dim=1, keepdim=True)
    scaled = torch.where(norms > 0, lam / torch.where(norms > 0, norms, 1.0), 0.0)
    floor = torch.finfo(F64).tiny
    dual = (-scaled).clamp(min=0) / sigma.clamp(min=floor)
    gap = ((V - U) * lam).sum(dim=1).abs() / (sigma.squeeze(1) ** 2).clamp(min=floor)
    return float(dual.max()), float(gap.max())


def _assert_kkt(U: Tensor, G: Tensor, V: Tensor, bar: float) -> None:
    assert V.shape == U.shape
    assert torch.isfinite(V).all()
    assert (V >= U).all()
    dual, gap = _kkt_residuals(U, G, V)
    assert dual <= bar, f"dual infeasibility {dual:.3g}"
    assert gap <= bar, f"complementarity gap {gap:.3g}"


def _random_bounds(k: int, m: int, seed: int) -> Tensor:
    """Lower bounds of both signs, as DualProj and general callers may pass."""
    return torch.randn(k, m, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- UPGrad without regularisation is non-conflicting, to rounding -------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", LIBRARY)
def test_upgrad_update_does_not_conflict(name: str, dtype: torch.dtype):
    J = LIBRARY[name]().to(dtype)
    aggregator = UPGrad(norm_eps=0.0, reg_eps=0.0, solver="active_set")
    d = aggregator(J)
    w = aggregator.weighting(J @ J.T)
    assert d.dtype == dtype
    assert torch.isfinite(d).all()
    J64, d64 = J.to(F64), d.to(F64)
    row_norms = J64.norm(dim=1)
    if name in ZERO_PROJECTION:
        # d = 0 up to the rounding of Jᵀw.
        scale = (w.to(F64).abs() * row_norms).sum()
        assert d64.norm() <= BAR[dtype] * scale
    else:
        assert (J64 @ d64 >= -BAR[dtype] * row_norms * d64.norm()).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", LIBRARY)
def test_each_projection_satisfies_kkt(name: str, dtype: torch.dtype):
    J = LIBRARY[name]().to(dtype)
    G = J @ J.T
    m = G.shape[0]
    for U in (torch.eye(m, dtype=dtype) / m, _random_bounds(3, m, seed=m).to(dtype)):
        V = project_weights(U, G, "active_set")
        assert V.dtype == dtype
        _assert_kkt(U, G, V, KKT_BAR[dtype])


@pytest.mark.parametrize("name", ["normal_5x8", "duplicated_rows", "spread_norms"])
def test_update_is_linear_under_scaling_of_the_whole_matrix(name: str):
    J = LIBRARY[name]()
    aggregator = UPGrad(norm_eps=0.0, reg_eps=0.0, solver="active_set")
    reference = aggregator(J)
    for scale in (1e-10, 1e-3, 1e4, 1e15):
        torch.testing.assert_close(aggregator(J * scale) / scale, reference, rtol=1e-9, atol=0)


# --- Against the quadprog reference --------------------------------------------------------------


def _random_problem(seed: int) -> tuple[Tensor, Tensor]:
    """A random Jacobian of one of several degenerate kinds, and bounds (UPGrad's or random)."""
    gen = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 16, (1,), generator=gen))
    n = int(torch.randint(1, 16, (1,), generator=gen))
    J = torch.randn(m, n, generator=gen, dtype=F64)
    kind = seed % 5
    if kind == 1 and m > 1:
        J[-1] = J[0]
    elif kind == 2:
        rank = max(1, min(m, n) // 2)
        factor = torch.randn(m, rank, generator=gen, dtype=F64)
        J = factor @ torch.randn(rank, n, generator=gen, dtype=F64)
    elif kind == 3:
        J = J + 2.0 * torch.randn(1, n, generator=gen, dtype=F64)
    elif kind == 4:
        J = J * torch.logspace(-2, 2, m, dtype=F64)[:, None]
    if seed % 2:
        U = torch.diag(torch.rand(m, generator=gen, dtype=F64))
    else:
        U = torch.randn(4, m, generator=gen, dtype=F64)
    return J, U


@pytest.mark.parametrize("seed", range(40))
def test_matches_quadprog_on_regularised_gramian(seed: int):
    J, U = _random_problem(seed)
    G = J @ J.T
    G = G / G.trace() + 1e-4 * torch.eye(G.shape[0], dtype=F64)
    expected = project_weights_quadprog(U, G)
    actual = project_weights_active_set(U, G)
    scale = expected.abs().amax()
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9 * float(scale))
    objective = ((actual @ G) * actual).sum(dim=1)
    objective_qp = ((expected @ G) * expected).sum(dim=1)
    torch.testing.assert_close(objective, objective_qp, rtol=1e-9, atol=1e-12 * float(scale) ** 2)


@pytest.mark.parametrize("seed", range(40))
def test_unregularised_problem_satisfies_kkt(seed: int):
    J, U = _random_problem(seed)
    G = J @ J.T
    _assert_kkt(U, G, project_weights_active_set(U, G), KKT_BAR[F64])


def test_matches_quadprog_on_a_larger_problem():
    J = _normal(64, 96, 20)
    G = J @ J.T
    G = G / G.trace() + 1e-6 * torch.eye(64, dtype=F64)
    U = torch.eye(64, dtype=F64) / 64
    expected = project_weights_quadprog(U, G)
    torch.testing.assert_close(
        project_weights_active_set(U, G), expected, rtol=0, atol=1e-9 * float(expected.abs().max())
    )


def test_duplicated_and_zero_rows_give_the_projection_of_the_reduced_problem():
    # Dual cone of [A; a_0; 0] = dual cone of A, and projection is positively homogeneous, so
    # UPGrad on [A; a_0; 0] with uniform preferences equals UPGrad on A with preferences
    # (2, 1, 1, 1)/m. A has independent rows, so quadprog solves the reduced problem exactly.
    A = _normal(4, 7, 21)
    J = torch.cat([A, A[:1], torch.zeros(1, 7, dtype=F64)])
    actual = UPGrad(norm_eps=0.0, reg_eps=0.0, solver="active_set")(J)
    preferences = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=F64) / 6
    expected = UPGrad(preferences, norm_eps=0.0, reg_eps=0.0, solver="quadprog")(A)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_more_rows_than_columns(seed: int):
    # 37 rows of rank 18: passive sets of dependent rows make block pivoting cycle, and the
    # monotone phase has to finish these problems. Random rows may or may not positively span
    # R¹⁸ (then UPGrad's update is 0); nonnegative combinations of 18 random rows do not.
    random_rows = _normal(37, 18, 50 + seed)
    cone_rows = _normal(37, 18, 60 + seed).abs() @ _normal(18, 18, 70 + seed)
    aggregator = UPGrad(norm_eps=0.0, reg_eps=0.0, solver="active_set")
    for J in (random_rows, cone_rows):
        G = J @ J.T
        for U in (torch.eye(37, dtype=F64) / 37, _random_bounds(4, 37, seed=seed)):
            _assert_kkt(U, G, project_weights_active_set(U, G), KKT_BAR[F64])
        d = aggregator(J)
        scale = (aggregator.weighting(G).abs() * J.norm(dim=1)).sum()
        if d.norm() > BAR[F64] * scale:  # else d = 0 to rounding: 0 is inside the rows' hull
            assert (J @ d >= -BAR[F64] * J.norm(dim=1) * d.norm()).all()
    assert aggregator(cone_rows).norm() > 0


def test_g_and_minus_g_project_to_zero_exactly_enough():
    g = _normal(1, 5, 22)
    G = torch.cat([g, -g]) @ torch.cat([g, -g]).T
    V = project_weights_active_set(torch.eye(2, dtype=F64), G)
    assert (torch.eye(2, dtype=F64) <= V).all()
    torch.testing.assert_close(
        V @ G, torch.zeros(2, 2, dtype=F64), atol=1e-12 * float(G[0, 0]), rtol=0
    )


# --- UPGrad and DualProj: published values with either solver ------------------------------------

PAPER_J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=F64)
TORCHJD_EPS = {"norm_eps": 1e-4, "reg_eps": 1e-4}


@pytest.mark.parametrize("solver", SOLVERS)
def test_published_values_with_either_solver(solver: str):
    upgrad = UPGrad(**TORCHJD_EPS, solver=solver)
    expected = torch.tensor([0.2929, 1.9004, 1.9004], dtype=F64)
    torch.testing.assert_close(upgrad(PAPER_J), expected, atol=1e-4, rtol=0)
    weights = upgrad.weighting(PAPER_J @ PAPER_J.T)
    torch.testing.assert_close(
        weights, torch.tensor([1.1109, 0.7894], dtype=F64), atol=1e-4, rtol=0
    )
    dualproj = DualProj(**TORCHJD_EPS, solver=solver)
    expected = torch.tensor([0.5563, 1.1109, 1.1109], dtype=F64)
    torch.testing.assert_close(dualproj(PAPER_J), expected, atol=1e-4, rtol=0)


def test_active_set_is_the_default_solver():
    assert UPGrad().weighting.solver == "active_set"
    assert DualProj().weighting.solver == "active_set"


@pytest.mark.parametrize("seed", range(5))
def test_upgrad_and_dualproj_agree_across_solvers(seed: int):
    J = _normal(8, 10, 30 + seed)
    for cls in (UPGrad, DualProj):
        torch.testing.assert_close(
            cls(solver="active_set")(J), cls(solver="quadprog")(J), rtol=1e-9, atol=1e-12
        )


# --- Three regimes: closed form (m ≤ 2), factorised exchanges, conjugate gradients ----------------


def _two_rows(kind: int, gen: torch.Generator) -> Tensor:
    """Two rows of 3 columns: random, antiparallel, parallel, nearly (anti)parallel, or one zero."""
    J = torch.randn(2, 3, generator=gen, dtype=F64)
    if kind == 1:
        J[1] = -2.0 * J[0]
    elif kind == 2:
        J[1] = 0.5 * J[0]
    elif kind == 3:
        J[1] = -J[0] * (1 + 1e-7)
    elif kind == 4:
        J[1] = J[0] * (1 + 1e-7)
    elif kind == 5:
        J[kind % 2] = 0.0
    return J


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_rows_in_closed_form_satisfy_kkt(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(80)
    for trial in range(300):
        J = _two_rows(trial % 6, gen).to(dtype)
        G = J @ J.T
        U = torch.randn(4, 2, generator=gen, dtype=F64).to(dtype)
        _assert_kkt(U, G, project_weights_active_set(U, G), KKT_BAR[dtype])


def test_one_row_and_zero_rows_in_closed_form():
    U = torch.tensor([[-1.0, 2.0], [3.0, -4.0]], dtype=F64)
    # A zero row keeps v = u (any v ≥ u is a minimiser); a nonzero single row gives max(u, 0).
    G = torch.tensor([[0.0, 0.0], [0.0, 2.0]], dtype=F64)
    expected = torch.tensor([[-1.0, 2.0], [3.0, 0.0]], dtype=F64)
    assert torch.equal(project_weights_active_set(U, G), expected)
    G1 = torch.tensor([[2.0]], dtype=F64)
    assert torch.equal(
        project_weights_active_set(U[:, :1], G1), torch.tensor([[0.0], [3.0]]).double()
    )


@pytest.mark.parametrize("seed", range(6))
def test_factorised_and_conjugate_gradient_regimes_agree(
    seed: int, monkeypatch: pytest.MonkeyPatch
):
    # The same problems solved both ways: the projections Jᵀv (compared through Gv) agree.
    J, U = _random_problem(seed)
    G = J @ J.T
    scale = float(G.diagonal().max()) * float(U.abs().max())
    monkeypatch.setattr(_dual_cone, "_DENSE_MAX", 1000)
    factorised = project_weights_active_set(U, G)
    monkeypatch.setattr(_dual_cone, "_DENSE_MAX", 0)
    conjugate_gradients = project_weights_active_set(U, G)
    for V in (factorised, conjugate_gradients):
        _assert_kkt(U, G, V, KKT_BAR[F64])
    torch.testing.assert_close(factorised @ G, conjugate_gradients @ G, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_medium_problems_satisfy_kkt(dtype: torch.dtype):
    # Both sides of the switch from factorised solves to conjugate gradients (m = 40); in
    # float64 the conjugate-gradient rounds run in float32 between exact recomputations. The
    # solver's tolerance, 4·max(m, 16)·ε, exceeds the float32 bar at m = 96.
    for m, seed in ((40, 90), (41, 91), (96, 92)):
        J = _normal(m, m + m // 2, seed).to(dtype)
        G = J @ J.T
        bar = max(KKT_BAR[dtype], 8 * m * torch.finfo(dtype).eps)
        for U in (torch.eye(m, dtype=dtype) / m, _random_bounds(3, m, seed=m).to(dtype)):
            _assert_kkt(U, G, project_weights_active_set(U, G), bar)


def _per_sample_like(m: int, seed: int) -> Tensor:
    """Rows like per-sample gradients of a c-class cross-entropy: a common 9-dimensional part
    with large coefficients of either sign plus a per-row part, so that the unit-diagonal
    Gramian has 9 eigenvalues far above its bulk."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(9, 4 * m, generator=generator, dtype=F64)
    coefficients = 10.0 * torch.randn(m, 9, generator=generator, dtype=F64)
    return coefficients @ shared / m**0.5 + torch.randn(m, 4 * m, generator=generator, dtype=F64)


def _unit_diagonal(G: Tensor) -> Tensor:
    norms = G.diagonal().sqrt()
    return G / norms.unsqueeze(1) / norms


def test_outliers_are_the_eigenvalues_before_the_gap():
    G = _unit_diagonal(_per_sample_like(300, 30) @ _per_sample_like(300, 30).T)
    values, vectors = torch.linalg.eigh(G)
    preconditioner = _dual_cone._Outliers.of(G)
    assert preconditioner is not None
    Q = preconditioner.Q
    assert Q.shape == (300, 9)
    # Q spans the top eigenspace, and the excesses are λ_j / μ - 1 for the bulk's top μ (which
    # the subspace iteration estimates from below: only the speed depends on it).
    top = vectors[:, -9:]
    torch.testing.assert_close(Q @ Q.T, top @ top.T, rtol=0, atol=1e-3)
    excess = preconditioner.inverse_excess.diagonal().reciprocal()
    expected = values[-9:].flip(0) / values[-10] - 1
    assert bool((excess >= expected * 0.99).all()) and bool((excess <= expected * 1.1).all())


@pytest.mark.parametrize("m", [12, 64, 300])
def test_no_outliers_no_preconditioner(m: int):
    # A spectrum without a gap (Marchenko-Pastur), and sizes below the smallest m.
    J = _normal(m, 2 * m, 31)
    assert _dual_cone._Outliers.of(_unit_diagonal(J @ J.T)) is None
    assert _dual_cone._Outliers.of(torch.zeros(m, m, dtype=F64)) is None


def test_outliers_preconditioner_inverts_its_matrix_on_each_passive_set(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setattr(_dual_cone._Outliers, "_MIN", 64)
    G = _unit_diagonal(_per_sample_like(120, 32) @ _per_sample_like(120, 32).T)
    preconditioner = _dual_cone._Outliers.of(G)
    assert preconditioner is not None
    generator = torch.Generator().manual_seed(33)
    mask = (torch.rand(7, 120, generator=generator) < 0.7).to(F64)
    g = torch.randn(7, 120, generator=generator, dtype=F64) * mask
    preconditioner.restrict(mask)
    s = preconditioner.apply(g, mask, out=torch.empty_like(g))
    assert torch.equal(s * (1 - mask), torch.zeros_like(s))
    Q = preconditioner.Q
    excess = preconditioner.inverse_excess.diagonal().reciprocal()
    for row in range(7):
        QP = Q * mask[row].unsqueeze(1)
        M = torch.eye(120, dtype=F64) + QP @ torch.diag(excess) @ QP.T
        torch.testing.assert_close(M @ s[row], g[row], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_preconditioned_iterations_give_the_exact_projections(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
):
    # Gramians with outlying eigenvalues, where conjugate gradients is preconditioned: the
    # same projections as without the preconditioner and as quadprog's, and each satisfies KKT
    # (at a size below the one from which the solver builds it, so that quadprog is quick).
    monkeypatch.setattr(_dual_cone._Outliers, "_MIN", 64)
    J = _per_sample_like(96, 34)
    G = (J @ J.T).to(dtype)
    build = _dual_cone._Outliers.of
    built = []
    monkeypatch.setattr(
        _dual_cone._Outliers, "of", classmethod(lambda cls, G: built.append(1) or build(G))
    )
    U = torch.eye(96, dtype=dtype)
    preconditioned = project_weights_active_set(U, G)
    assert built, "the preconditioner was not built"
    monkeypatch.setattr(_dual_cone._Outliers, "of", classmethod(lambda cls, G: None))
    plain = project_weights_active_set(U, G)
    G64 = G.double()
    expected = project_weights_quadprog(U.double(), G64)
    bar = max(KKT_BAR[dtype], 8 * 96 * torch.finfo(dtype).eps)
    scale = float(G64.diagonal().max())
    for V in (preconditioned, plain):
        _assert_kkt(U, G, V, bar)
        torch.testing.assert_close(V.double() @ G64, expected @ G64, rtol=0, atol=bar * scale)


# --- Solver interface ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_has_the_input_dtype_and_device(dtype: torch.dtype):
    J = _normal(6, 4, 40).to(dtype)
    U = torch.eye(6, dtype=dtype)
    V = project_weights(U, J @ J.T, "active_set")
    assert V.dtype == dtype
    assert V.device == U.device
    assert V.shape == U.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_runs_on_cuda(dtype: torch.dtype):
    J = _normal(32, 48, 41)
    U = torch.eye(32, dtype=F64) / 32
    G = J @ J.T
    V = project_weights(U.to("cuda", dtype), G.to("cuda", dtype), "active_set")
    assert V.device.type == "cuda"
    assert V.dtype == dtype
    _assert_kkt(U, G, V.cpu(), KKT_BAR[dtype])


def test_leading_dimensions_and_independent_problems():
    J = _normal(7, 9, 42)
    G = J @ J.T
    U = _random_bounds(6, 7, seed=43).reshape(2, 3, 7)
    V = project_weights(U, G, "active_set")
    assert V.shape == (2, 3, 7)
    one_by_one = torch.stack([project_weights_active_set(u[None], G)[0] for u in U.reshape(6, 7)])
    torch.testing.assert_close(V.reshape(6, 7), one_by_one, rtol=0, atol=1e-13)


def test_problems_without_conflict_are_returned_unchanged():
    J = torch.rand(5, 6, generator=torch.Generator().manual_seed(44), dtype=F64)  # G ≥ 0
    U = torch.rand(5, 5, generator=torch.Generator().manual_seed(45), dtype=F64)
    assert torch.equal(project_weights_active_set(U, J @ J.T, max_iters=0), U)


def test_solutions_are_not_tracked_by_autograd():
    J = _normal(4, 6, 47).requires_grad_()
    U = torch.eye(4, dtype=F64)
    for solver in SOLVERS:
        assert not project_weights(U, J @ J.T, solver).requires_grad


def test_empty_batch():
    G = torch.eye(3, dtype=F64)
    assert project_weights(torch.zeros(0, 3, dtype=F64), G, "active_set").shape == (0, 3)


@pytest.mark.parametrize("m", [16, 64], ids=["factorised", "cg"])
@pytest.mark.parametrize("max_iters", [0, 1])
def test_an_exhausted_iteration_budget_still_gives_the_exact_solution(m: int, max_iters: int):
    # Whatever the fast regimes leave, the exact method finishes: the solver never raises.
    J = _normal(m, 2 * m, 46)
    U = torch.eye(m, dtype=F64) / m
    V = project_weights_active_set(U, J @ J.T, max_iters=max_iters)
    _assert_kkt(U, J @ J.T, V, KKT_BAR[F64])
    torch.testing.assert_close(V, project_weights_active_set(U, J @ J.T), rtol=0, atol=1e-9)


def _low_rank(m: int, rank: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(m, rank, generator=generator, dtype=F64)
    return left @ torch.randn(rank, 3 * m, generator=generator, dtype=F64)


@pytest.mark.parametrize("seed", [7, 19, 21])
def test_rank_deficient_problems_that_stall_the_exchanges_are_solved(seed: int):
    # m = 100 rows of rank 50: with these seeds the conjugate-gradient phase stalls on some of
    # the 100 projections (they once raised an error); the rank-deficient route solves them.
    J = _low_rank(100, 50, seed)
    G = J @ J.T
    U = torch.eye(100, dtype=F64)
    V = project_weights_active_set(U, G)
    _assert_kkt(U, G, V, KKT_BAR[F64])


@pytest.mark.parametrize(("m", "rank"), [(8, 8), (12, 5), (30, 30), (45, 20)])
@pytest.mark.parametrize("method", ["goldfarb_idnani", "nnls"])
def test_exact_methods_alone_satisfy_kkt_and_match_quadprog(m: int, rank: int, method: str):
    J = _low_rank(m, rank, seed=m + rank)
    G = J @ J.T
    U = _random_bounds(m, m, seed=m)
    norms = G.diagonal().sqrt()
    G_hat = G / torch.outer(norms, norms)
    u_hat = U * norms
    root = _dual_cone._SquareRoot(G_hat, F64)
    assert root.factor(limit=m)
    assert root.rank == rank
    L = root.lower
    if method == "goldfarb_idnani":
        w = _dual_cone._goldfarb_idnani(u_hat, L, norms)
    else:
        A = L.T.contiguous().numpy()
        w = torch.stack([torch.from_numpy(_dual_cone._nnls(A, -(A @ u.numpy()))) for u in u_hat])
    V = U + w / norms
    _assert_kkt(U, G, V, KKT_BAR[F64])
    if rank == m:  # quadprog needs G positive definite
        torch.testing.assert_close(V, project_weights_quadprog(U, G), rtol=0, atol=1e-8)
    else:  # the projections J^T v are unique even where v is not
        d = V @ J
        torch.testing.assert_close(
            d,
            project_weights_quadprog(U, G + 1e-9 * torch.eye(m, dtype=F64)) @ J,
            rtol=0,
            atol=1e-4,
        )


def test_unknown_solver_and_bad_shapes_are_rejected():
    G = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="Unknown dual-cone solver 'cvxpy'"):
        project_weights(torch.eye(3, dtype=F64), G, "cvxpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 3\].*got \(2, 4\)"):
        project_weights(torch.zeros(2, 4, dtype=F64), G, "active_set")
    with pytest.raises(ValueError, match="square Gramian"):
        project_weights(torch.zeros(2, 3, dtype=F64), torch.zeros(3, 2, dtype=F64), "active_set")


@pytest.mark.parametrize("m", [8, 64])
def test_gramian_symmetric_up_to_rounding_is_solved_by_the_fast_regimes(
    m: int, monkeypatch: pytest.MonkeyPatch
):
    # A Gramian formed in float32 by blocks differs from its transpose by rounding. The solver
    # must read both triangles alike: the fast regimes' solutions then pass the certificate, so
    # that the exact method is not needed, and the answer is that of the mean of G and Gᵀ.
    J = _normal(m, 3 * m, seed=m)
    G = J @ J.T
    noise = torch.randn(m, m, generator=torch.Generator().manual_seed(1), dtype=F64)
    skewed = G + 1e-7 * G.diagonal().mean() * (noise - noise.T)
    handed_over = []
    exact = _dual_cone._goldfarb_idnani

    def counting(u_hat: Tensor, *args: Tensor) -> Tensor:
        handed_over.append(u_hat.shape[0])
        return exact(u_hat, *args)

    monkeypatch.setattr(_dual_cone, "_goldfarb_idnani", counting)
    U = torch.eye(m, dtype=F64)
    V = project_weights_active_set(U, skewed)
    assert handed_over == []
    torch.testing.assert_close(V, project_weights_active_set(U, (skewed + skewed.T) / 2))


@pytest.mark.parametrize("nudge, exact_calls", [(2.0, 0), (40.0, 1)])
def test_solutions_a_hair_past_the_certificate_are_solved_again_by_the_iterations(
    nudge: float, exact_calls: int, monkeypatch: pytest.MonkeyPatch
):
    # The iterations' first answers are moved off stationarity by `nudge` tolerances on one
    # passive index each: at 2τ they are solved again by the iterations (to τ/4), and not by the
    # exact method; at 40τ, past the 16τ margin, they go to the exact method as before. Either
    # way the answer satisfies KKT.
    m = 64
    J = _normal(m, 2 * m, 35)
    G = J @ J.T
    fast = _dual_cone._fast_regimes
    exact = _dual_cone._goldfarb_idnani
    iterations: list[tuple[int, float]] = []
    handed_over: list[int] = []

    def nudged(u_hat: Tensor, lam: Tensor, G_hat: Tensor, max_iters: int, tau: float) -> Tensor:
        W = fast(u_hat, lam, G_hat, max_iters, tau)
        if not iterations:
            total = u_hat.abs().sum(dim=1) + W.sum(dim=1)
            first = (W > 0).to(torch.int64).argmax(dim=1)
            rows = torch.arange(W.shape[0])
            W[rows, first] += nudge * tau * total
        iterations.append((u_hat.shape[0], tau))
        return W

    def counting(u_hat: Tensor, *args: Tensor) -> Tensor:
        handed_over.append(u_hat.shape[0])
        return exact(u_hat, *args)

    monkeypatch.setattr(_dual_cone, "_fast_regimes", nudged)
    monkeypatch.setattr(_dual_cone, "_goldfarb_idnani", counting)
    U = torch.eye(m, dtype=F64)
    V = project_weights_active_set(U, G)
    _assert_kkt(U, G, V, KKT_BAR[F64])
    (n, tau), *again = iterations
    if exact_calls:
        assert again == [] and handed_over == [n]
    else:
        assert again == [(n, tau / 4)] and handed_over == []


@pytest.mark.parametrize("aggregator", [UPGrad(), DualProj()], ids=["upgrad", "dualproj"])
def test_half_precision_weights_fit_their_dtype_where_the_exact_ones_do_not(aggregator):
    # A rank-one Jacobian with rows of both signs (its dual cone is {0}) and one tiny row: in
    # float16 the Gramian's rounding makes it full rank, and the exact weights of those values
    # (1e6 on two rows whose terms cancel) overflow float16. The part of the Gramian that
    # float16 resolves is solved instead: finite weights, whose update is 0 to the rounding of
    # the rows' terms, as the Jacobian's own (float64) weights give.
    J = torch.tensor(
        [[-2.5633], [-1.3568], [-0.019864], [3.9116], [235.11], [-2.0460], [-3.6783]], dtype=F64
    )
    G = J @ J.T
    G16 = G.to(torch.float16)  # largest entry 5.5e4
    # The exact weights of these values, solved in float32: beyond float16's range.
    exact = project_weights_active_set(torch.eye(7), G16.float())
    assert exact.abs().sum(dim=0).amax() > torch.finfo(torch.float16).max
    weights = aggregator.weighting(G16)
    assert weights.dtype == torch.float16 and bool(weights.isfinite().all())
    terms = (weights.double().abs() * J.norm(dim=1)).sum()
    exact_terms = (aggregator.weighting(G).abs() * J.norm(dim=1)).sum()
    assert (weights.double() @ J).norm() <= 1e-2 * terms
    assert terms <= 8 * exact_terms
