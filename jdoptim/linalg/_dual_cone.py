r"""Projection of weight vectors onto the dual cone of a Jacobian's rows, in weight space.

For a Jacobian $J$ with Gramian $G = J J^\top$ and a weight vector $u$, the projection of
$J^\top u$ onto the dual cone $\{x : Jx \ge 0\}$ is $J^\top v$, where $v$ solves

$$
\min_v\ v^\top G v \quad\text{subject to}\quad v \ge u
$$

(Proposition 1 of [arXiv 2406.16232](https://arxiv.org/abs/2406.16232)). UPGrad solves it for
every row of $\operatorname{diag}(u)$, DualProj for $u$ itself. Two solvers are available:

- ``"active_set"``: `project_weights_active_set`, the default: all problems at once in torch,
  on $G$'s device, each solution certified in float64, and an exact, terminating method for
  rank-deficient Gramians and for whatever the fast iterations leave. It never raises, and
  needs no regularisation of singular or slightly indefinite Gramians.
- ``"quadprog"``: `jdoptim.linalg._quadprog.project_weights_quadprog`, the reference: one
  quadratic program at a time on the CPU in float64; it needs $G$ positive definite.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import quadprog
import torch
from torch import Tensor

from jdoptim.linalg._quadprog import project_weights_quadprog

Solver = Literal["active_set", "quadprog"]
SOLVERS: tuple[str, ...] = ("active_set", "quadprog")

_HALF = (torch.float16, torch.bfloat16)

_DENSE_MAX = 40
"""Largest m for which the equations on the passive sets are solved by Cholesky factorisation
(from m = 3; m ≤ 2 has a closed form); conjugate gradients solve them above: one factorisation
per problem costs O(m³), one conjugate-gradient step O(m²), and a few dozen steps are needed.
On the CPU the two cost the same at about m = 48."""

_RESOLVE_MAX = 1024
"""Largest m for which a low-precision Gramian that is not well conditioned is reduced to the
part its precision resolves (an eigendecomposition: 3 ms at m = 128, 0.3 s at m = 1024 on one
CPU thread, growing as m³) before it is solved."""

_CHECK_EVERY = 8
"""Conjugate-gradient iterations between two updates of the passive sets (and KKT tests)."""

_BACKUP_STEPS = 3
"""Block exchanges allowed without reducing the number of infeasible indices (Kim & Park)."""

_STALL_CHECKS = 16
"""KKT tests without progress after which a problem is declared stuck."""


def project_weights(U: Tensor, G: Tensor, solver: Solver) -> Tensor:
    r"""Solve $\min_v v^\top G v$ subject to $v \ge u$ for every row $u$ of $U$.

    Args:
        U: Lower bounds, shape ``[..., m]`` (any leading shape: one problem per row).
        G: Gramian, symmetric positive semi-definite, shape ``[m, m]``. The ``"quadprog"``
            solver needs it positive definite.
        solver: Which solver to use; one of `SOLVERS`.

    Returns:
        The minimisers, with ``U``'s shape, device and dtype.

    Raises:
        ValueError: On an unknown solver or mismatched shapes. The ``"active_set"`` solver
            itself never raises (see `project_weights_active_set`).

    Examples:
        >>> import torch
        >>> from jdoptim.linalg import project_weights
        >>> G = torch.tensor([[1.0, -1.0], [-1.0, 4.0]], dtype=torch.float64)
        >>> V = project_weights(torch.eye(2, dtype=torch.float64), G, "active_set")
        >>> V
        tensor([[1.0000, 0.2500],
                [1.0000, 1.0000]], dtype=torch.float64)
        >>> V @ G  # the multipliers: nonnegative, and zero where v > u
        tensor([[0.7500, 0.0000],
                [0.0000, 3.0000]], dtype=torch.float64)
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown dual-cone solver {solver!r}; valid solvers: {SOLVERS}.")
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"Expected a square Gramian of shape [m, m], got {tuple(G.shape)}.")
    if U.ndim == 0 or U.shape[-1] != G.shape[0]:
        raise ValueError(
            f"Expected lower bounds of shape [..., {G.shape[0]}] for a Gramian of shape "
            f"{tuple(G.shape)}, got {tuple(U.shape)}."
        )
    flat = U.reshape(-1, U.shape[-1])
    if solver == "quadprog":
        return project_weights_quadprog(flat, G).reshape(U.shape)
    return project_weights_active_set(flat, G).reshape(U.shape)


def project_weights_active_set(U: Tensor, G: Tensor, *, max_iters: int | None = None) -> Tensor:
    r"""Solve $\min_v v^\top G v$ subject to $v \ge u$ for every row $u$ of $U$, all at once.

    Writing $v = u + w$, each problem is the linear complementarity problem

    $$
    w \ge 0,\qquad \lambda = G (u + w) \ge 0,\qquad w^\top \lambda = 0,
    $$

    whose solutions are exactly the minimisers (the KKT conditions of the convex problem;
    $\lambda$ are the multipliers of $v \ge u$, and $\lambda_i = g_i^\top J^\top v$ measures
    how much the projection agrees with row $i$). It never raises: every problem ends with a
    solution certified in float64, or with the exact solution of a terminating method.

    Everything is computed on the Gramian scaled to a unit diagonal (rows of $J$ scaled to unit
    norm), in float64, and made exactly symmetric (the mean of $G$ and $G^\top$: a Gramian
    formed in float32 is symmetric only up to rounding); zero rows are left out (their
    multiplier is 0 whatever $v$ is, and they keep $v_i = u_i$), and problems without conflict
    ($Gu \ge 0$) are solved by $w = 0$. A Gramian given in float32 or half precision that is not
    well conditioned (see below), with $m \le 1024$, is first reduced to the part its precision
    resolves: the eigenvalues of the unit-diagonal Gramian at most $4\varepsilon$ of float32
    (rounding, whose sign and size the order of the rows decides) are dropped, and the rest is
    solved as float64 input; a Gramian with an eigenvalue below $-4\varepsilon$ (not positive
    semi-definite up to rounding) is solved as given. Where the weights of a Gramian given in
    half precision would not fit its dtype (their sum over the problems overflows), the
    eigenvalues up to one $\varepsilon$ of that dtype are dropped instead, and the problems
    solved again. The other problems take one of two routes:

    - **Rank-deficient Gramians** (the Cholesky factorisation of $G$ fails or has a pivot²
      below $10^3$ times the rank tolerance of `_SquareRoot`, and a pivoted Cholesky
      factorisation $G \approx L L^\top$ stops at a rank $r \le 3m/4$): the exact method
      below, straight away. This covers many
      objectives on few parameters (10,000 losses of a 3-parameter model have $r = 3$) and the
      degenerate Jacobians of separable data, where the iterations below slow down.
    - **Otherwise** the iterations of the fast regimes: a closed form for $m \le 2$; for
      $3 \le m \le 40$ block principal pivoting (J. Kim and H. Park, *Fast nonnegative matrix
      factorization: an active-set-like method and comparisons*, SIAM J. Sci. Comput. 33(6),
      2011) with regularised Cholesky solves in float64; above, the same exchanges with
      conjugate-gradient iterations in the input precision (float32 for half precision), in
      float32 rounds with float64 refinement for float64 input, and a monotone feasible phase
      where the exchanges stall. Where the Gramian has a few eigenvalues far above the others
      (the per-sample gradients of a classifier share the directions of its logits), the
      iterations are preconditioned by a low-rank correction that moves them (`_Outliers`).
      Each solution is then *certified* in float64: $w \ge 0$, every multiplier
      $\lambda_i \ge -\tau s$, every $|\lambda_i| \le \tau s$ where $w_i > 0$, with
      $s = \sum_j |u_j| + \sum_j w_j$ (in the unit-diagonal scaling) and
      $\tau = 4 \max(m, 16)\,\varepsilon$ of float64, and at least float32's
      $\varepsilon$ for input in float32 or half precision (whose weights come back in that
      precision, rounded by as much), and $s$ at most $10^4$ times $\sum_j |u_j|$: a solution
      whose $w$ grows along a positive combination of the rows that vanishes (a weakly
      stationary Jacobian) satisfies the tests while its projection $J^\top v$ may be far
      from the true one.
      Problems not certified go to the exact method; for $m > 40$, those that pass the
      certificate at $16\tau$ are first solved again by the iterations, to $\tau / 4$ (making
      $w \ge 0$ after the iterations can move a multiplier past $\tau$ by a hair, and the
      exact method costs seconds per problem at m = 1024).

    The exact method works in the space of the rows' coordinates: with $G \approx L L^\top$
    ($L$ of size $m \times r$), the projection of $y = L^\top u$ onto the cone
    $\{x : L x \ge 0\}$ is a strictly convex quadratic program in $r$ variables whose Hessian
    is the identity, solved by the dual active-set method of D. Goldfarb and A. Idnani
    (*A numerically stable dual method for solving strictly convex quadratic programs*, Math.
    Programming 27, 1983) through quadprog, on the CPU, in float64. It terminates, needs no
    regularisation whatever the rank of $G$ (dependent constraints are dropped by the method),
    and its multipliers are $w$: $x - y = L^\top w$. Should quadprog refuse a problem (it
    reports rounding-induced inconsistency on some degenerate ones), Lawson and Hanson's
    nonnegative least squares on the same square root finishes it (C. L. Lawson and R. J.
    Hanson, *Solving Least Squares Problems*, 1974, chapter 23). Where a positive combination of
    the rows vanishes the multipliers are not unique, and where the method's sum to more than
    $10^4$ times the bounds', the smallest ones are taken instead (`_smallest_multipliers`): large
    multipliers would leave the weighted sum of the rows to rounding.

    Args:
        U: Lower bounds, shape ``[k, m]``.
        G: Symmetric positive semi-definite Gramian, shape ``[m, m]``; rounding may make it
            slightly indefinite (as a Gramian formed in float32 is).
        max_iters: Largest number of iterations of the fast regimes (a factorised solve or a
            conjugate-gradient step each) before the exact method takes the problems left;
            ``50 + 4·m`` when ``None``.

    Returns:
        The minimisers, shape ``[k, m]``, with ``U``'s dtype and device. The fast regimes run
        on ``G``'s device; the factorisation and the certificate synchronise with the host
        once per pivot and once per round of iterations; the exact method runs on the CPU.

    Examples:
        >>> import torch
        >>> from jdoptim.linalg._dual_cone import project_weights_active_set
        >>> G = torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float64)  # rows g, -g/2
        >>> V = project_weights_active_set(torch.eye(2, dtype=torch.float64), G)
        >>> V @ G  # both projections are 0: the dual cone is the orthogonal complement of g
        tensor([[0., 0.],
                [0., 0.]], dtype=torch.float64)
    """
    k, m = U.shape
    if max_iters is None:
        max_iters = 50 + 4 * m
    if k == 0 or m == 0:
        return U.detach().clone()
    dtype = torch.promote_types(U.dtype, G.dtype)
    # Half precision is solved in float32 or better, and its tolerances are float32's.
    precision = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    # The solution is not differentiated through (nor is quadprog's).
    U64 = U.detach().to(device=G.device, dtype=torch.float64)
    V = _solve(U64, _symmetrised(G), precision, max_iters)
    if G.dtype in _HALF and U.dtype in _HALF and not _fits(V, U.dtype):
        # The values as given need weights beyond the range of their dtype (large ones on rows
        # whose terms cancel along directions below the dtype's rounding): the part of the
        # Gramian that its own rounding resolves is solved instead, whose weights fit.
        V = _solve(U64, _symmetrised(G), precision, max_iters, resolution=G.dtype)
    return V.to(device=U.device, dtype=U.dtype)


def _fits(V: Tensor, dtype: torch.dtype) -> bool:
    """Whether every sum of the rows of ``V`` (one solution per problem) is finite in ``dtype``."""
    return bool(V.abs().sum(dim=0).amax() <= torch.finfo(dtype).max)


def _symmetrised(G: Tensor, block: int = 256) -> Tensor:
    """A float64 copy of ``G`` with each pair of mirrored entries replaced by their mean.

    A Gramian formed in float32 by blocks (or in another order for ``(i, j)`` than for
    ``(j, i)``) is symmetric only up to rounding, and the solver reads it by rows in one place and
    by columns in another: left as is, a solution found on one triangle fails the certificate on
    the other. Done by blocks of rows, so that no second ``m × m`` copy is made.
    """
    G = G.detach().to(torch.float64, copy=True)
    m = G.shape[0]
    for start in range(0, m, block):
        stop = min(start + block, m)
        mean = (G[start:stop, start:] + G[start:, start:stop].mT).mul_(0.5)
        G[start:stop, start:] = mean
        G[start:, start:stop] = mean.mT
    return G


def _solve(
    U64: Tensor,
    G_hat: Tensor,
    precision: torch.dtype,
    max_iters: int,
    resolution: torch.dtype | None = None,
) -> Tensor:
    """`project_weights_active_set` in float64 (``G_hat`` is overwritten) for values given in
    ``precision``, from a Gramian rounded at ``resolution``'s epsilon (``precision``'s if
    None)."""
    if resolution is None:
        resolution = precision
    k, m = U64.shape
    tau = _tolerance(m, precision)
    diagonal = G_hat.diagonal().clone()
    live = diagonal > 0
    if not bool(live.all()):
        # Zero rows keep v_i = u_i: solve the problem of the other rows.
        index = live.nonzero().squeeze(1)
        V = U64.clone()
        if index.numel():
            sub = G_hat[index][:, index]
            V[:, index] = _solve(U64[:, index], sub, precision, max_iters, resolution)
        return V
    if m <= 2:
        return _solve_coordinatewise(U64, G_hat)

    # Rows of J scaled to unit norm: G_hat = S⁻¹ G S⁻¹ and u_hat = S u, S = diag(‖g_i‖). The
    # multipliers of w = 0 are lam = u_hat G_hat; problems with none below -τ Σ_j |u_hat_j| are
    # solved by v = u. UPGrad's bounds are diagonal (one problem per row, u_i e_i): then
    # lam = diag(u_hat) G_hat costs m² instead of m³.
    norms = diagonal.sqrt()
    G_hat /= norms.unsqueeze(1)
    G_hat /= norms
    G_hat.diagonal().fill_(1.0)
    diagonal_bounds = k == m and int(U64.count_nonzero()) == int(U64.diagonal().count_nonzero())
    if diagonal_bounds:
        d = U64.diagonal() * norms
        lam = d.unsqueeze(1) * G_hat
        size = d.abs().unsqueeze(1)
    else:
        u_hat = U64 * norms
        lam = u_hat @ G_hat
        size = u_hat.abs().sum(dim=1, keepdim=True)
    conflicting = (lam < -tau * size).any(dim=1).nonzero().squeeze(1)
    if not conflicting.numel():
        return U64
    lam = lam[conflicting]
    if diagonal_bounds:
        u_hat = torch.zeros_like(lam).scatter_(1, conflicting.unsqueeze(1), d[conflicting, None])
    else:
        u_hat = u_hat[conflicting]

    root = _SquareRoot(G_hat, resolution)
    well_conditioned = _well_conditioned(G_hat, root.rank_tol)
    if not well_conditioned and precision != torch.float64 and m <= _RESOLVE_MAX:
        # Directions of a low-precision Gramian below its rounding are noise, which the order
        # of the rows decides: they are dropped, and the rest is solved as float64 input.
        clean = _resolved_part(G_hat, root.rank_tol)
        if clean is not None:
            return _solve(U64, clean * norms.unsqueeze(1) * norms, torch.float64, max_iters)
    if not well_conditioned and root.factor(limit=(3 * m) // 4):
        W = _goldfarb_idnani(u_hat, root.complete(), norms)
    else:
        W = _fast_regimes(u_hat, lam, G_hat, max_iters, tau)
        failed = ~_certified(u_hat, W, G_hat, tau)
        if m > _DENSE_MAX and bool(failed.any()):
            # Solutions a hair past the certificate (w ≥ 0 enforced after the iterations moves
            # the multipliers by up to τ) are solved again to a quarter of the tolerance: the
            # exact method costs O(m³) per problem (2.5 s at m = 1024).
            close = failed & _certified(u_hat, W, G_hat, _CLOSE * tau)
            if bool(close.any()):
                again = close.nonzero().squeeze(1)
                W[again] = _fast_regimes(u_hat[again], lam[again], G_hat, max_iters, tau / 4)
                failed[again] = ~_certified(u_hat[again], W[again], G_hat, tau)
        if bool(failed.any()):
            W[failed] = _goldfarb_idnani(u_hat[failed], root.complete(), norms)
    V = U64.clone()
    V[conflicting] += W / norms
    return V


_CLOSE = 16.0
"""Solutions that fail the certificate at ``τ`` but pass it at this many ``τ`` are solved again
by the iterations, to ``τ / 4``, before the exact method."""

_GROWTH = 1e4
"""Largest ``Σ_j w_j`` of a certified solution, relative to ``Σ_j |u_j|`` (unit-diagonal scale)."""


def _tolerance(m: int, precision: torch.dtype) -> float:
    """The relative tolerance of the KKT conditions: ``4·max(m, 16)`` epsilons of float64, and
    at least one epsilon of float32 for values given in float32 or half precision (their
    weights come back in that precision, whose rounding moves the multipliers by as much)."""
    tau = 4.0 * max(m, 16) * torch.finfo(torch.float64).eps
    if precision != torch.float64:
        tau = max(tau, torch.finfo(torch.float32).eps)
    return tau


def _fast_regimes(u_hat: Tensor, lam: Tensor, G_hat: Tensor, max_iters: int, tau: float) -> Tensor:
    """Run the iterations of the fast regimes on the conflicting problems; return ``w``.

    They run to float64's tolerance whatever the input's precision (the Gramian's values are
    solved as accurately as float64 allows; conjugate gradients in float32 rounds refined in
    float64). The unsolved problems come back as they are; the certificate decides.
    """
    m = G_hat.shape[0]
    if m <= _DENSE_MAX:
        threshold = -tau * u_hat.abs().sum(dim=1, keepdim=True)
        passive = lam < threshold
        W, _, _ = _factorised_exchanges(lam, G_hat, threshold, passive, tau, max_iters, False)
        return W.clamp(min=0.0)
    preconditioner = _Outliers.of(G_hat)
    W, _ = _conjugate_gradients(
        u_hat, lam, G_hat, tau, max_iters, 0, handoff=True, preconditioner=preconditioner
    )
    return W.clamp(min=0.0)


def _certified(u_hat: Tensor, W: Tensor, G_hat: Tensor, tau: float) -> Tensor:
    """Which solutions ``w`` (one per row) satisfy the KKT conditions to the tolerance.

    See `project_weights_active_set` for the tests; all in float64 on the unit-diagonal scale.
    """
    size = u_hat.abs().sum(dim=1)
    total = size + W.sum(dim=1)
    lam = (u_hat + W) @ G_hat
    bound = (tau * total).unsqueeze(1)
    feasible = (lam >= -bound).all(dim=1)
    stationary = torch.where(W > 0, lam.abs() <= bound, True).all(dim=1)
    return feasible & stationary & (W >= 0).all(dim=1) & (total <= _GROWTH * size)


def _well_conditioned(G: Tensor, rank_tol: float) -> bool:
    """Whether ``G`` has a Cholesky factorisation with every pivot² above ``1e3·rank_tol``: then
    it is of full rank with room to spare, and the pivoted factorisation is not needed."""
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return False
    smallest = L.diagonal().amin()
    return bool(smallest * smallest > 1e3 * rank_tol)


def _resolved_part(G: Tensor, tol: float) -> Tensor | None:
    r"""The part of a unit-diagonal Gramian that its precision resolves: $Q_k \Lambda_k Q_k^\top$
    over the eigenvalues above ``tol``; None if an eigenvalue is below ``-tol`` (the matrix is
    not positive semi-definite up to rounding, and no repair defines its projection).

    Rounding a Gramian to float32 moves its eigenvalues by about float32's epsilon: below that,
    an eigenvalue (and the sign of a tiny one) is decided by the rounding, and so by the order of
    the rows. The eigendecomposition treats every order alike, so that the part kept does not
    depend on it; each row loses at most ``tol`` of its squared norm.
    """
    values, vectors = torch.linalg.eigh(G)
    if float(values[0]) < -tol:
        return None
    keep = values > tol
    root = vectors[:, keep] * values[keep].sqrt()
    return root @ root.T


class _SquareRoot:
    r"""A pivoted Cholesky factorisation $G \approx L L^\top$ of a unit-diagonal Gramian, grown
    on demand (N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §10.3).

    Each step takes the row with the largest residual diagonal; it stops once that is at most
    ``rank_tol`` (the rows left are combinations of those taken, up to that residual), which
    makes ``L.shape[1]`` the numerical rank. The tolerance is $4\varepsilon$ of the precision
    the Gramian is solved at (float64's for float64 input, float32's for float32 and half
    precision), and one $\varepsilon$ of a half precision where a Gramian given in it is solved
    at its own rounding (see `project_weights_active_set`; with a larger $\varepsilon$, dropping
    more would move the rows by more than the rounding of the values decides,
    $\sqrt{m\varepsilon}$ relative): a row's distance to the span of the pivots is at most the
    tolerance's square root.
    """

    def __init__(self, G: Tensor, precision: torch.dtype) -> None:
        m = G.shape[0]
        self.G = G
        self.rank_tol = (1 if precision in _HALF else 4) * torch.finfo(precision).eps
        self.residual = G.diagonal().clone()
        self.buffer = G.new_zeros(m, min(m, 64))
        self.rank = 0
        self.done = False

    @property
    def lower(self) -> Tensor:
        """The factor found so far, ``[m, rank]``."""
        return self.buffer[:, : self.rank]

    def factor(self, limit: int) -> bool:
        """Take pivots until the rank is found (return True) or ``limit`` columns are taken."""
        G, d = self.G, self.residual
        m = G.shape[0]
        while not self.done and self.rank < limit:
            pivot = int(d.argmax())
            top = float(d[pivot])
            if top <= self.rank_tol:
                self.done = True
                break
            if self.rank == self.buffer.shape[1]:
                grown = G.new_zeros(m, min(m, 2 * self.rank))
                grown[:, : self.rank] = self.buffer
                self.buffer = grown
            L = self.lower
            column = self.buffer[:, self.rank]
            torch.sub(G[:, pivot], L @ L[pivot], out=column)
            column /= top**0.5
            column[pivot] = top**0.5
            d.sub_(column * column)
            d[pivot] = 0.0
            self.rank += 1
        self.done = self.done or self.rank == m
        return self.done

    def complete(self) -> Tensor:
        """The factor continued down to float64's tolerance (``4 ε``): the rank tolerance of
        the input's precision decides the route, but leaving out directions up to it would move
        rows by up to its square root (7e-4 for float32), more than float32's bars allow."""
        fine = 4 * torch.finfo(torch.float64).eps
        if self.rank_tol > fine:
            self.rank_tol, self.done = fine, False
        self.factor(limit=self.G.shape[0])
        return self.lower


def _solve_coordinatewise(U: Tensor, G: Tensor) -> Tensor:
    r"""Solve every problem for $m \le 2$ in closed form.

    A feasible $v$ is a minimiser if and only if each coordinate minimises the objective with
    the others fixed: $v_i = \max(u_i, -\sum_{j \ne i} G_{ij} v_j / G_{ii})$ where
    $G_{ii} > 0$ (the KKT conditions, coordinate by coordinate). For $m = 1$ this is
    $v = \max(u, 0)$. For $m = 2$, with $r_i = -G_{01} / G_{ii}$ (so that $r_0 r_1 \le 1$),
    either $v_1 = u_1$, $v_0 = \max(u_0, r_0 u_1)$, which is the solution if
    $u_1 \ge r_1 v_0$; or $v_1 = r_1 v_0 > u_1$ and $v_0 = \max(u_0, r_0 r_1 v_0)$, solved by
    $v = (\max(u_0, 0), r_1 \max(u_0, 0))$ when $r_0 r_1 < 1$. When $G$ is singular
    ($r_0 r_1 = 1$) the first case holds whenever the second does not, and rounding may hide
    it. A zero row keeps $v_i = u_i$.
    """
    diagonal = G.diagonal()
    live = diagonal > 0
    if G.shape[0] == 1:
        return torch.where(live, U.clamp(min=0.0), U)
    ratios = -G[0, 1] / diagonal.clamp(min=torch.finfo(G.dtype).tiny)
    a, b = U.unbind(dim=1)
    first = torch.maximum(a, ratios[0] * b)
    a_plus = a.clamp(min=0.0)
    second = ratios[1] * a_plus
    # Exactly one of the two holds when G is nonsingular; when it is singular (r_0 r_1 = 1),
    # rounding can fail both tests, and the first is then the solution.
    keep_b = (b >= ratios[1] * first) | (b > second)
    V = torch.stack([torch.where(keep_b, first, a_plus), torch.where(keep_b, b, second)], dim=1)
    # Rounding can put v a hair below u where the bound is active.
    return torch.where(live, V.maximum(U), U)


def _factorised_exchanges(
    lam0: Tensor,
    G: Tensor,
    threshold: Tensor,
    passive: Tensor,
    tau: float,
    max_steps: int,
    refine: bool,
) -> tuple[Tensor, Tensor, int]:
    """Block principal pivoting with Cholesky solves, on the unit-diagonal Gramian.

    Starts from the passive sets of the first exchange; ``threshold`` is ``-τ`` times each
    problem's size. Returns ``w``, which problems are solved, and the number of solves.
    Problems whose exchanges stall, or whose passive rows are too close to dependent for the
    factorisation, are left unsolved.
    """
    n, m = lam0.shape
    if max_steps <= 0:
        return torch.zeros_like(lam0), torch.zeros(n, dtype=torch.bool, device=lam0.device), 0
    eye = torch.eye(m, dtype=lam0.dtype, device=lam0.device)
    # The solution of (G_PP + δI) w_P = −λ0_P has |λ_P| = δ |w_P|: stationary to tolerance
    # for δ ≤ τ/4, and defined even where the rows of P are dependent.
    delta = tau / 4
    G_reg = torch.add(G, eye, alpha=delta)
    neg_lam0 = -lam0
    least, idle, steps = n * m + 1, 0, 0
    while steps < max_steps:
        steps += 1
        # G_PP + δI, with the identity off P: w = 0 there.
        A = torch.where(passive.unsqueeze(2) & passive.unsqueeze(1), G_reg, eye)
        L, info = torch.linalg.cholesky_ex(A)
        rhs = torch.where(passive, neg_lam0, 0.0).unsqueeze(2)
        w = torch.cholesky_solve(rhs, L).squeeze(2)
        lam = torch.addmm(lam0, w, G)
        # Primal values on P, dual values off P: the infeasible ones change sides.
        z = torch.where(passive, w, lam)
        infeasible = z < threshold
        count = int(infeasible.sum())
        if count == 0:
            break
        least, idle = (count, 0) if count < least else (least, idle + 1)
        if idle > _BACKUP_STEPS:
            break
        passive = passive ^ infeasible
    if refine:
        # One step of iterative refinement towards the solution of G_PP w_P = −λ0_P: the
        # error δ/λ of the regularised solution along an eigenvalue λ of G_PP becomes (δ/λ)².
        w = w - torch.cholesky_solve((lam * passive).unsqueeze(2), L).squeeze(2)
        lam = torch.addmm(lam0, w, G)
        z = torch.where(passive, w, lam)
        count = -1
    # Accept a solution only where G_PP + δI is positive definite with room to spare: where
    # rounding has made G_PP indefinite, the solution can be dominated by the rounding.
    pivots = L.diagonal(dim1=1, dim2=2).amin(dim=1)
    solved = (info == 0) & (pivots * pivots >= delta / 2)
    if count != 0:
        solved = solved & (z >= threshold).all(dim=1)
    return w, solved, steps


class _Outliers:
    r"""A preconditioner for the equations $G_{PP} w_P = b_P$ of the passive sets, for a Gramian
    with a few eigenvalues far above the others.

    One loss per sample with a $c$-class cross-entropy gives such Gramians: the gradients share
    the $c - 1$ directions of the logits, and the unit-diagonal Gramian has $c - 1$ eigenvalues
    10 to 100 times its bulk (at batch 1024 of the benchmark's MLP, 15 to 23 against at most 1.5;
    of its CNN, 79 to 119 against at most 1.8). Conjugate gradients then converges at the pace of
    the condition number $\lambda_\max / \lambda_\min$ of the whole spectrum. With the $k$
    outlying eigenpairs $(\lambda_j, q_j)$ and $\mu$ the largest eigenvalue of the bulk, the
    preconditioner of problem $P$ is $M_P = I + Q_P E Q_P^\top$ (the Gramian with its bulk
    replaced by $\mu$, over $\mu$), where $Q_P$ is $Q$ with the rows off $P$ zeroed and
    $E = \operatorname{diag}(\lambda_j / \mu - 1)$; by Woodbury's identity
    $M_P^{-1} = I - Q_P (E^{-1} + Q_P^\top Q_P)^{-1} Q_P^\top$: two products with the
    $m \times k$ matrix $Q$ and a $k \times k$ matrix per problem, against $m^2$ for a step.
    The preconditioned equations have about the condition number of the bulk (B. Carpentieri,
    I. S. Duff and L. Giraud, *A class of spectral two-level preconditioners*, SIAM J. Sci.
    Comput. 25(2), 2003, for the idea of moving a few eigenvalues).

    The eigenpairs are estimated by a randomised subspace iteration (N. Halko, P.-G.
    Martinsson and J. A. Tropp, *Finding structure with randomness*, SIAM Review 53(2), 2011):
    ``_WIDTH`` columns, ``_POWERS`` products with $G$, and the Rayleigh-Ritz values; the
    outliers are the values before the widest gap (a ratio of at least ``_GAP``) between
    consecutive values of the first half. Only for ``m ≥ _MIN``, and where the largest value is
    at least ``_PAYS`` times the bulk's. Only the speed depends on them:
    $M_P$ is positive definite whatever they are, and the solutions are certified as before.
    """

    _WIDTH = 32
    _POWERS = 3
    _GAP = 4.0
    _PAYS = 20.0
    """Smallest ratio of the largest eigenvalue to the bulk's for which the preconditioner is
    used. It divides the condition number by this ratio, but costs two products with ``Q`` per
    step, and the passive sets change every ``_CHECK_EVERY`` steps whatever the pace: on the
    benchmark's MLP Gramians (ratios 5.5 to 15) it saved nothing (0.64× to 1.13× the time), on its
    CNN Gramians (ratios 50 to 64) it saves 1.7× to 6.4× (`tests/benchmarks/bench_outliers.py`)."""
    _MIN = 256
    """Smallest m for which the preconditioner is built: below, the estimate costs more than
    the iterations it saves (1.2 ms at m = 128 on one CPU thread, against 15 ms for UPGrad's 128
    projections on a normal Gramian; 7 ms at m = 512 against 0.3 s)."""

    def __init__(self, Q: Tensor, excess: Tensor) -> None:
        m, k = Q.shape
        self.Q = Q
        self.inverse_excess = torch.diag_embed(excess.reciprocal())
        self.products = (Q.unsqueeze(2) * Q.unsqueeze(1)).reshape(m, k * k)
        self.K: Tensor | None = None
        self._cast: tuple[Tensor, Tensor] | None = None

    @classmethod
    def of(cls, G: Tensor) -> _Outliers | None:
        """The preconditioner of the unit-diagonal Gramian ``G``, or None if it has no
        outlying eigenvalues (or too many for the subspace to tell)."""
        m = G.shape[0]
        if m < cls._MIN:
            return None
        width = min(cls._WIDTH, m // 4)
        generator = torch.Generator(device=G.device).manual_seed(0)
        Y = torch.randn(m, width, generator=generator, dtype=G.dtype, device=G.device)
        for _ in range(cls._POWERS):
            Y = torch.linalg.qr(G @ Y).Q
        values, vectors = torch.linalg.eigh(Y.T @ G @ Y)
        values, vectors = values.flip(0), vectors.flip(1)
        if not float(values[-1]) > 0.0:
            return None
        # The widest gap between consecutive values, among the first half.
        ratios = values[: width // 2] / values[1 : width // 2 + 1]
        k = int(ratios.argmax()) + 1
        if not float(ratios[k - 1]) >= cls._GAP:
            return None
        bulk = values[k]
        if not float(values[0] / bulk) >= cls._PAYS:
            return None
        return cls(Y @ vectors[:, :k], values[:k] / bulk - 1.0)

    def restrict(self, mask: Tensor) -> None:
        """Form the ``k × k`` matrices of the problems whose passive sets ``mask`` gives."""
        n, k = mask.shape[0], self.Q.shape[1]
        QPQ = (mask.to(self.Q.dtype) @ self.products).view(n, k, k)
        self.K = torch.linalg.inv(self.inverse_excess + QPQ)
        self._cast = None

    def apply(self, g: Tensor, mask: Tensor, out: Tensor) -> Tensor:
        """``out = M_P⁻¹ g`` for each problem (``g`` zero off its passive set)."""
        assert self.K is not None
        if self._cast is None or self._cast[0].dtype != g.dtype:
            self._cast = (self.Q.to(g.dtype), self.K.to(g.dtype))
        Q, K = self._cast
        coefficients = (K @ (g @ Q).unsqueeze(2)).squeeze(2)
        torch.mm(coefficients, Q.T, out=out)
        out.mul_(mask)
        return torch.sub(g, out, out=out)


def _conjugate_gradients(
    u: Tensor,
    lam: Tensor,
    G: Tensor,
    tau: float,
    max_iters: int,
    iterations: int,
    handoff: bool,
    preconditioner: _Outliers | None = None,
) -> tuple[Tensor, Tensor]:
    """Block principal pivoting, then the monotone phase, with conjugate-gradient solves.

    ``u`` and ``lam = u @ G`` hold the problems to solve, one per row, on the unit-diagonal
    Gramian ``G``; ``iterations`` counts the iterations spent before. Returns ``w`` and which
    problems are left unsolved: those stuck above √ε, or unsolved after ``max_iters`` (with
    ``handoff``, for float64 input, after half of the iterations left); the exact method
    (`_goldfarb_idnani`) finishes them.

    The iterations write into buffers allocated once (again only when rows leave the batch or
    the precision changes): fresh tensors of this size are page-faulted in by the operating
    system at every step. For the same reason of speed on the CPU, masks are applied by
    multiplication and selections made by ``torch.lerp`` with 0/1 weights (exact), not by
    boolean indexing or ``torch.where`` over whole rows, which take slow paths.
    """
    n, m = u.shape
    dtype, device = u.dtype, u.device
    accept_stuck = torch.finfo(dtype).eps ** 0.5
    # Problems left after this many iterations, or stuck earlier, go to the exact method.
    limit = max_iters
    if handoff:
        # In lower precision the Gramian's rounding blurs which rows are independent, and the
        # exchanges, accepting stuck problems to √ε, do better.
        limit = iterations + (max_iters - iterations) // 2
    # The solution is positively homogeneous in u: solve for rows scaled to unit size.
    scale = u.abs().sum(dim=1, keepdim=True)
    lam_u = lam / scale
    W = torch.zeros_like(u)
    unsolved = torch.zeros(n, dtype=torch.bool, device=device)
    rows = torch.arange(n, device=device)

    # In float64, rounds of iterations run in float32 (twice as fast) on the equations for a
    # correction of w, whose multipliers are recomputed exactly after each round: each round is
    # a step of iterative refinement. The monotone phase, and a round that fails to halve some
    # residual, switch the iterations to full precision for the rest of the solve.
    low = torch.float32 if dtype == torch.float64 else dtype
    G_work = G.to(low)

    # State of the unsolved problems, one row each: the passive set and its 0/1 mask; w, zero
    # off the passive set; the multipliers lam = G (u + w); whether the problem is in the
    # monotone phase; the bookkeeping of the exchanges and of the progress; the direction d of
    # the iterations (in the working precision) and the squared norm gg of the gradient.
    passive = lam_u < -tau  # The first exchange, from the empty passive set.
    mask = passive.to(dtype)
    w = torch.zeros_like(u)
    lam = lam_u.clone()
    monotone = torch.zeros(n, 1, dtype=torch.bool, device=device)
    least_infeasible = torch.full((n, 1), m + 1, device=device)
    backup = torch.full((n, 1), _BACKUP_STEPS, device=device)
    best_residual = torch.full((n, 1), torch.inf, dtype=dtype, device=device)
    idle_checks = torch.zeros(n, 1, dtype=torch.long, device=device)
    moved = torch.zeros(n, 1, dtype=torch.bool, device=device)
    size = torch.ones(n, 1, dtype=dtype, device=device)
    restart = torch.ones(n, 1, dtype=torch.bool, device=device)
    gg = torch.zeros(n, 1, dtype=dtype, device=device)
    d = torch.zeros(n, m, dtype=low, device=device)
    any_monotone = False
    buffers = None
    # Conjugate gradients solves a passive set of p indices in p steps (in exact arithmetic), so
    # the passive sets are updated after at most that many steps.
    check_every = min(_CHECK_EVERY, int(passive.sum(dim=1).max()))

    while True:
        # Start a round: the working copies, and the directions restarted where needed. In the
        # working precision: the gradient g (lam on the passive set), Gd, a product of two
        # vectors, the multipliers and the change of w over the round, and the mask.
        work = G_work.dtype
        if buffers is None:
            d = d.to(work)
            buffers = [torch.empty_like(d) for _ in range(6)] + [torch.empty_like(w)]
            g, Gd, product, lam_work, step, mask_work, product_exact = buffers
            # The preconditioned gradient has its own buffer only where it differs from g.
            s = g if preconditioner is None else torch.empty_like(d)
        mask_work.copy_(mask)
        lam_work.copy_(lam)
        torch.mul(lam_work, mask_work, out=g)
        gg_loop, gg = gg, torch.mul(g, g, out=product).sum(dim=1, keepdim=True)
        # The preconditioned gradient s and g·s, which set the steps of the iterations.
        if preconditioner is None:
            gs = gg
        else:
            preconditioner.restrict(mask_work)
            preconditioner.apply(g, mask_work, out=s)
            gs = torch.mul(g, s, out=product).sum(dim=1, keepdim=True)
        # Once ‖g‖ is below half the tolerance a problem stops stepping: going on would only
        # amplify rounding noise along the null space of a singular G. Within a round in low
        # precision, the products are accurate to about m ε relative.
        gg_floor = (tau / 2 * size).to(work) ** 2
        if work != dtype:
            gg_floor = torch.maximum(gg_floor, gg * (m * torch.finfo(work).eps) ** 2)
            # Restart also where the exact multipliers differ from the approximate ones by
            # more than the progress.
            restart = restart | (gg > 4 * gg_loop)
        restart = restart | (gg <= gg_floor)
        torch.lerp(d, s, restart.to(work), out=d)
        target = w if work == dtype else step.zero_()

        if iterations >= limit:
            unsolved[rows] = True
            return W * scale, unsolved
        for iteration in range(check_every):
            # One conjugate-gradient step on each passive set (d is 0 off the set): the exact
            # line search along d, g·d / dGd, which is gg / dGd once d is conjugate to the
            # previous directions. It is not yet at the start of a round, where the multipliers
            # have been recomputed exactly, nor in the monotone phase, which needs each step to
            # decrease the objective whatever rounding does to conjugacy. Steps stop where
            # gg ≤ gg_floor.
            torch.mm(d, G_work, out=Gd)
            dGd = torch.mul(d, Gd, out=product).sum(dim=1, keepdim=True)
            if iteration == 0 or any_monotone:
                gd = torch.mul(g, d, out=product).sum(dim=1, keepdim=True)
            else:
                gd = gs
            alpha = (gd / dGd).nan_to_num_(0.0, 0.0, 0.0).clamp_(min=0.0).mul_(gg > gg_floor)
            if any_monotone:
                # In the monotone phase the step stops where the first w_i reaches 0.
                ratio = torch.where(monotone & (d > 0), w / d, torch.inf)
                reach = ratio.amin(dim=1, keepdim=True)
                blocked = reach < alpha
                alpha = torch.minimum(alpha, reach)
            target.addcmul_(alpha, d, value=-1.0)
            lam_work.addcmul_(alpha, Gd, value=-1.0)
            if any_monotone:
                # Where a w_i reached 0 it leaves P, and the iteration restarts.
                hit = blocked & (ratio <= reach)
                w.masked_fill_(hit, 0.0)
                passive = passive & ~hit
                mask.copy_(passive)
                mask_work.copy_(passive)
                moved |= blocked
            torch.mul(lam_work, mask_work, out=g)
            gg = torch.mul(g, g, out=product).sum(dim=1, keepdim=True)
            if preconditioner is None:
                gs_next = gg
            else:
                if any_monotone:
                    preconditioner.restrict(mask_work)
                preconditioner.apply(g, mask_work, out=s)
                gs_next = torch.mul(g, s, out=product).sum(dim=1, keepdim=True)
            beta = (gs_next / gs).nan_to_num_(0.0, 0.0, 0.0)
            if any_monotone:
                beta = beta.masked_fill_(blocked, 0.0)
            torch.addcmul(s, beta, d, out=d)
            gs = gs_next
        iterations += check_every
        if target is step:
            w.add_(product_exact.copy_(step))

        # Exact multipliers and the KKT test, with the worst residual of each problem relative
        # to its size (positive when violated): primal values on P, dual values off P.
        torch.addmm(lam_u, w, G, out=lam)
        size = 1 + torch.abs(w, out=product_exact).sum(dim=1, keepdim=True)
        stationarity = torch.mul(lam, mask, out=product_exact).abs_().amax(dim=1, keepdim=True)
        z = torch.lerp(lam, w, mask, out=product_exact)
        residual = torch.maximum(stationarity, -z.amin(dim=1, keepdim=True)) / size

        # Exchange the infeasible indices whose sign is clear at the current accuracy.
        infeasible = z < -torch.maximum(tau * size, stationarity)
        count = infeasible.sum(dim=1, keepdim=True)
        improved = count < least_infeasible
        least_infeasible = torch.minimum(least_infeasible, count)
        backup = torch.where(improved, _BACKUP_STEPS, backup - (count > 0).long())
        switched = ~monotone & (backup < 0)
        monotone = monotone | switched
        # In the monotone phase indices only enter.
        exchange = infeasible & ~(monotone & passive)
        exchanged = exchange.sum(dim=1, keepdim=True) > 0
        passive = passive ^ exchange
        restart = exchanged | switched
        done = ~exchanged & (residual <= tau)

        # A problem whose passive set stays put and whose residual stops halving is stuck: its
        # Gramian cannot resolve it further (nearly parallel rows). It is accepted if its
        # residual is below √ε, and raises otherwise.
        progress = exchanged | moved | (residual < best_residual / 2)
        best_residual = torch.where(progress, residual, best_residual)
        idle_checks = torch.where(progress, 0, idle_checks + 1)
        moved = torch.zeros_like(moved)
        stuck = idle_checks >= _STALL_CHECKS
        done = done | (stuck & (residual <= accept_stuck))

        flags = torch.cat([done, stuck & ~done, monotone, idle_checks > 0, restart], dim=1)
        largest = passive.sum(dim=1).amax(dim=0, keepdim=True)
        solved, failed, in_monotone, idle, changed, largest = torch.cat(
            [flags.sum(dim=0), largest]
        ).tolist()
        if failed:
            limit = iterations  # the rows left go to the exact method at the next round
        if changed:
            delta = product_exact.copy_(w)
            mask.copy_(passive)
            if in_monotone:
                w = torch.lerp(w, w.clamp(min=0.0), monotone.to(dtype))
            w.mul_(mask)
            # The multipliers follow the change of w, in the working precision (they are
            # recomputed exactly at the end of the next round).
            lam.sub_(torch.mm(delta.sub_(w).to(work), G_work))
        any_monotone = in_monotone > 0
        if (idle or any_monotone) and G_work.dtype != dtype:
            G_work = G
            restart = torch.ones_like(restart)
            buffers = None
        check_every = min(_CHECK_EVERY, max(largest, 1))
        if solved:
            done = done.squeeze(1)
            W[rows[done]] = w[done]
            if solved == rows.numel():
                return W * scale, unsolved
            keep = (~done).nonzero().squeeze(1)
            rows = rows[keep]
            (lam_u, passive, mask, lam, w, d, gg, size, restart, monotone) = (
                t[keep] for t in (lam_u, passive, mask, lam, w, d, gg, size, restart, monotone)
            )
            (least_infeasible, backup, best_residual, idle_checks, moved) = (
                t[keep] for t in (least_infeasible, backup, best_residual, idle_checks, moved)
            )
            buffers = None


def _goldfarb_idnani(u_hat: Tensor, L: Tensor, norms: Tensor) -> Tensor:
    r"""The exact multipliers $w$ of each problem (one per row of ``u_hat``), in float64.

    For $G = L L^\top$ and $y = L^\top u$, the projection $x$ of $y$ onto $\{x : Lx \ge 0\}$
    minimises $\tfrac12 x^\top x - y^\top x$ subject to $L x \ge 0$; its multipliers $w \ge 0$
    satisfy $x = L^\top (u + w)$, so that $v = u + w$. quadprog solves it on the CPU (a
    factorised identity Hessian; nothing to regularise); where it refuses, `_nnls` does.
    """
    device = u_hat.device
    L_np = np.ascontiguousarray(L.detach().cpu().numpy())
    u_np = u_hat.detach().cpu().numpy()
    m, r = L_np.shape
    W = np.zeros_like(u_np)
    if r == 0:  # every row is 0 up to the rank tolerance: any v ≥ u is optimal
        return torch.from_numpy(W).to(device)
    hessian = np.eye(r)
    # Rows that are parallel (equal in this scale) are interchangeable constraints: the method
    # puts their multiplier on the first one, which ``order`` makes the row of largest norm in
    # the caller's scale, whatever the rows' order (the weights w_i / ‖g_i‖ stay smallest).
    order = np.argsort(-norms.detach().cpu().numpy(), kind="stable")
    L_np, u_np = L_np[order], u_np[:, order]
    constraints = np.ascontiguousarray(L_np.T)
    zeros = np.zeros(m)
    # The multipliers are positively homogeneous in u: each problem is solved for bounds of
    # unit size (quadprog's tolerances are absolute).
    sizes = np.abs(u_np).sum(axis=1)
    sizes[sizes == 0] = 1.0
    bounds = u_np / sizes[:, None]
    Y = bounds @ L_np
    regularised = None  # formed for the first row whose multipliers are too large
    for row, y in enumerate(Y):
        try:
            W[row] = quadprog.solve_qp(hessian, y, constraints, zeros, 0, factorized=True)[4]
        except ValueError:
            W[row] = _nnls(constraints, -y)
        if W[row].sum() > _GROWTH:
            if regularised is None:
                regularised = _regularised_gramian(L_np)
            W[row] = _smallest_multipliers(regularised, bounds[row], W[row])
    W *= sizes[:, None]
    unordered = np.empty_like(W)
    unordered[:, order] = W
    return torch.from_numpy(np.maximum(unordered, 0.0)).to(device)


def _regularised_gramian(L: np.ndarray) -> np.ndarray:
    r"""$L L^\top + \mu I$ with $\mu$ a thousand times the rounding of $L L^\top$ (see
    `_smallest_multipliers`)."""
    m = L.shape[0]
    return L @ L.T + 1e3 * m * np.finfo(np.float64).eps * np.eye(m)


def _smallest_multipliers(regularised: np.ndarray, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    r"""Multipliers of the same projection as ``w`` of about the smallest norm.

    Where a positive combination of the rows vanishes ($L^\top c = 0$, $c \ge 0$, a weakly
    stationary Jacobian), the projection is unique but its multipliers are not: any $w + t c$
    gives it, and the exact method may return a large one, whose weighted sum of the rows is then
    dominated by rounding (in the input's precision) and depends on the rows' order. Adding
    $\mu \lVert u + w \rVert^2$ to the objective, for $\mu$ a thousand times the rounding of
    $L L^\top$, makes the minimiser unique: the smallest multipliers, up to a change of the
    projection of order $\mu$. quadprog solves it in the multipliers' space; the given ``w`` is
    kept where it refuses or does no better. ``regularised`` is `_regularised_gramian` of the
    square root.
    """
    m = regularised.shape[0]
    try:
        v = quadprog.solve_qp(regularised, np.zeros(m), np.eye(m), u, 0)[0]
    except ValueError:
        return w
    smaller = np.maximum(v - u, 0.0)
    return smaller if smaller.sum() < w.sum() else w


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""$\arg\min_{z \ge 0} \lVert A z - b \rVert$ by Lawson and Hanson's active-set method.

    One index enters the passive set per iteration (the one with the largest gradient); the
    least-squares solutions on the passive set are minimum-norm (``lstsq``), so dependent
    columns are harmless. It stops at the KKT conditions, or after ``3·m`` iterations with the
    feasible iterate reached.
    """
    m = A.shape[1]
    z = np.zeros(m)
    passive = np.zeros(m, dtype=bool)
    tol = 10 * np.finfo(np.float64).eps * max(A.shape) * max(np.abs(A).sum(axis=0).max(), 1e-300)
    gradient = A.T @ b
    for _ in range(3 * m):
        candidates = np.where(passive, -np.inf, gradient)
        j = int(candidates.argmax())
        if candidates[j] <= tol:
            break
        passive[j] = True
        while True:
            s = np.zeros(m)
            s[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if passive.sum() == 0 or s[passive].min() > 0:
                break
            blocking = passive & (s <= 0)
            alpha = np.min(z[blocking] / (z[blocking] - s[blocking]))
            z = z + alpha * (s - z)
            passive &= z > tol
            z[~passive] = 0.0
        z = s
        gradient = A.T @ (b - A @ z)
    return z
