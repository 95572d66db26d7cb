r"""Projection of weight vectors onto the dual cone of a Jacobian's rows, in weight space.

For a Jacobian $J$ with Gramian $G = J J^\top$ and a weight vector $u$, the projection of
$J^\top u$ onto the dual cone $\{x : Jx \ge 0\}$ is $J^\top v$, where $v$ solves

$$
\min_v\ v^\top G v \quad\text{subject to}\quad v \ge u
$$

(Proposition 1 of [arXiv 2406.16232](https://arxiv.org/abs/2406.16232)). UPGrad solves it for
every row of $\operatorname{diag}(u)$, DualProj for $u$ itself. Two solvers are available:

- ``"active_set"``: `project_weights_active_set`, all problems at once in torch, on $G$'s
  device (in float64 for up to 40 rows, in $G$'s dtype above); exact at convergence and valid
  for singular $G$.
- ``"quadprog"``: `jdoptim.linalg._quadprog.project_weights_quadprog`, the reference: one
  quadratic program at a time on the CPU in float64; it needs $G$ positive definite.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from jdoptim.linalg._quadprog import project_weights_quadprog

Solver = Literal["active_set", "quadprog"]
SOLVERS: tuple[str, ...] = ("active_set", "quadprog")

_DENSE_MAX = 40
"""Largest m for which the equations on the passive sets are solved by Cholesky factorisation
(from m = 3; m ≤ 2 has a closed form); conjugate gradients solve them above: one factorisation
per problem costs O(m³), one conjugate-gradient step O(m²), and a few dozen steps are needed.
On the CPU the two cost the same at about m = 48."""

_CHECK_EVERY = 8
"""Conjugate-gradient iterations between two updates of the passive sets (and KKT tests)."""

_BACKUP_STEPS = 3
"""Block exchanges allowed without reducing the number of infeasible indices (Kim & Park)."""

_STALL_CHECKS = 16
"""KKT tests without progress after which a problem is declared stuck."""


class DualConeConvergenceError(RuntimeError):
    """The active-set dual-cone solver stopped before the KKT conditions held.

    It stops after ``max_iters`` iterations, or earlier when a problem stops making progress
    far from a solution (rows parallel to within about the square root of the machine epsilon
    can do this: the Gramian no longer resolves them; adding a small multiple of the identity,
    such as UPGrad's ``reg_eps``, avoids it).

    Attributes:
        iterations: Iterations performed (factorised solves and conjugate-gradient steps).
        unsolved: Number of projections whose KKT conditions did not hold.
        residuals: Largest relative KKT residuals over those projections, by name
            (``"stationarity"``, ``"dual_feasibility"``, ``"primal_feasibility"``).
    """

    def __init__(self, iterations: int, unsolved: int, residuals: dict[str, float]) -> None:
        self.iterations = iterations
        self.unsolved = unsolved
        self.residuals = residuals
        details = ", ".join(f"{name} {value:.3g}" for name, value in residuals.items())
        super().__init__(
            f"The active-set dual-cone solver did not converge in {iterations} iterations: "
            f"{unsolved} projection(s) still violate the KKT conditions (largest relative "
            f"residuals: {details}; the tolerance is 4·max(m, 16)·eps). Nearly parallel rows "
            "cause this; adding a small multiple of the identity to the Gramian avoids it."
        )


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
        ValueError: On an unknown solver or mismatched shapes.
        DualConeConvergenceError: If the ``"active_set"`` solver does not converge.

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
    how much the projection agrees with row $i$). All problems are solved together, as rows of
    one batch, with no loop over them; problems without conflict ($Gu \ge 0$) are solved by
    $w = 0$. Three regimes:

    - $m \le 2$: in closed form. A feasible $v$ is a minimiser if and only if each coordinate
      minimises the objective with the others fixed, and for two coordinates this leaves two
      cases to compare.
    - $3 \le m \le 40$: block principal pivoting (J. Kim and H. Park, *Fast nonnegative matrix
      factorization: an active-set-like method and comparisons*, SIAM J. Sci. Comput. 33(6),
      2011) with Cholesky solves. Each problem keeps a passive set $P$ of indices where $w$ is
      free ($w = 0$ elsewhere) and solves $(G(u + w))_P = 0$ on it; every index with
      $w_i < 0$ or $\lambda_i < 0$ then changes sides at once, for as long as this reduces
      the number of infeasible indices (with three exchanges of grace). The equations are
      solved with $G_{PP} + \delta I$, $\delta = \tau / 4$ (below), which leaves the
      multipliers on $P$ at $|\lambda_P| = \delta |w_P|$, within the tolerance, and keeps the
      factorisation defined where rows of $P$ are dependent. These solves run in float64; for
      lower-precision input one step of iterative refinement follows. A solution is accepted
      where the factorisation is positive definite with pivots of at least $\sqrt{\delta/2}$,
      that is, where rounding has not made $G_{PP}$ indefinite; the problems left (also those
      whose exchanges stall: dependent rows can make block pivoting cycle) go to the third
      regime.
    - $m > 40$: the same exchanges, interleaved with conjugate-gradient iterations on the
      equations, each one product of the batch with $G$: no factorisation and no
      regularisation, since the equations are consistent even when $G$ is singular. Where
      the exchanges stall, a feasible, monotone active-set method takes over (after the NNLS
      algorithm of Lawson and Hanson), from $w$ clipped to $w \ge 0$: each step is an exact
      line search cut short where some $w_i$ reaches 0 (which then leaves $P$), and indices
      with $\lambda_i < 0$ join $P$; the objective never increases, which keeps this phase
      from cycling. In float64, rounds of 8 iterations run in float32 on the equations for a
      correction of $w$, and the multipliers are recomputed exactly in float64 after each
      round (mixed-precision iterative refinement: twice as fast, as accurate); the monotone
      phase, and a round that fails to halve some residual, switch to float64 throughout.
    - Last, the problems the iterations leave unsolved (stuck, or still unsolved after half
      of the iterations left, for float64 input, or after ``max_iters``) are finished by
      `_lawson_hanson`: one index enters $P$ at a time, only if its row is independent of the
      rows of $P$, so the factorised $G_{PP}$ is never singular, whatever the rank of $G$.
      This is slower (one factorisation per problem and iteration) but sure: rank-deficient
      Gramians with $m > 40$ can make the exchanges above stall on some projections.

    Everything is computed on the Gramian scaled to a unit diagonal (rows scaled to unit norm;
    zero rows are left out: their multiplier is 0 whatever $v$ is, and they keep $v_i = u_i$).
    A problem is solved once the KKT conditions hold to rounding, relative to its scale: with
    $\hat\lambda_i = \lambda_i / \lVert g_i \rVert$ and
    $\sigma = \sum_j \lVert g_j \rVert\, (|u_j| + |w_j|)$ (the size of the terms of $J^\top v$),
    $\hat\lambda_i \ge -\tau\sigma$ everywhere, $|\hat\lambda_i| \le \tau\sigma$ where
    $i \in P$, $w_i \ge -\tau\sigma / \lVert g_i \rVert$ (the output is clipped to $v \ge u$),
    with $\tau = 4 \max(m, 16)\, \varepsilon$ for the input's machine epsilon $\varepsilon$.
    The minimiser $v$ is not unique when $G$ is singular, but $J^\top v$, the projection, is.
    A problem whose residual stops decreasing under conjugate gradients (rows parallel to
    within about $\sqrt\varepsilon$, which the Gramian cannot tell apart) is accepted if its
    residual is below $\sqrt\varepsilon$ instead of $\tau$; otherwise Lawson and Hanson's
    method takes it over.

    Args:
        U: Lower bounds, shape ``[k, m]``.
        G: Symmetric positive semi-definite Gramian, shape ``[m, m]``.
        max_iters: Largest number of iterations (a factorised solve or a conjugate-gradient
            step each), all phases together; ``100 + 20·m`` when ``None``.

    Returns:
        The minimisers, shape ``[k, m]``, with ``U``'s dtype and device. The computation runs
        on ``G``'s device, in the common dtype of ``U`` and ``G`` (or higher, as above), with
        one host synchronisation per factorised solve or per round of conjugate-gradient
        iterations (none per problem).

    Raises:
        DualConeConvergenceError: If the KKT conditions do not hold after ``max_iters``
            iterations, or if Lawson and Hanson's method ends with a residual above the
            tolerance (above $\sqrt\varepsilon$ for rows it found parallel to others).

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
        max_iters = 100 + 20 * m
    dtype = torch.promote_types(U.dtype, G.dtype)
    device = G.device
    if k == 0 or m == 0:
        return U.clone()
    # Factorised solves run in float64: their cost is in the number of operations, not in
    # their size, and float64 keeps them accurate where the passive rows are nearly dependent.
    dense = 2 < m <= _DENSE_MAX
    work = torch.promote_types(dtype, torch.float64) if dense else dtype
    # The solution is not differentiated through (nor is quadprog's).
    U_work = U.detach().to(device=device, dtype=work)
    G = G.detach().to(work)
    if m <= 2:
        return _solve_coordinatewise(U_work, G).to(device=U.device, dtype=U.dtype)
    tau = 4.0 * max(m, 16) * torch.finfo(dtype).eps

    # Scale the rows of J to unit norm: G_hat = S⁻¹ G S⁻¹ and u_hat = S u, with S = diag(‖g_i‖).
    # Zero rows get zero rows and columns in G_hat: their multiplier is 0 whatever v is. The
    # multipliers of w = 0 are lam = u_hat G_hat = S⁻¹ G u; the first exchange, from the empty
    # passive set, takes every index with lam < -τ Σ_j ‖g_j‖ |u_j|; problems with none are
    # solved by v = u.
    inv_norms = G.diagonal().rsqrt().nan_to_num_(0.0, 0.0)
    norms = G.diagonal() * inv_norms
    lam = torch.mm(U_work, G).mul_(inv_norms)
    threshold = torch.mv(U_work.abs(), norms).mul_(-tau).unsqueeze(1)
    passive = lam < threshold
    if dense:
        if not bool(passive.any()):
            return U.detach().clone()
    else:
        unsolved = passive.any(dim=1).nonzero().squeeze(1)
        if not unsolved.numel():
            return U.detach().clone()
    G_hat = G * torch.outer(inv_norms, inv_norms)
    u_hat = U_work * norms

    if dense:
        W, solved, iterations = _factorised_exchanges(
            lam, G_hat, threshold, passive, tau, max_iters, refine=dtype != work
        )
        unsolved = None if bool(solved.all()) else (~solved).nonzero()[:, 0]
    else:
        W = torch.zeros_like(u_hat)
        iterations = 0
    if unsolved is not None:
        W[unsolved] = _conjugate_gradients(
            u_hat[unsolved],
            lam[unsolved],
            G_hat,
            tau,
            max_iters,
            iterations,
            handoff=dtype == torch.float64,
        )
    return torch.addcmul(U_work, W.clamp(min=0.0), inv_norms).to(device=U.device, dtype=U.dtype)


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


def _conjugate_gradients(
    u: Tensor,
    lam: Tensor,
    G: Tensor,
    tau: float,
    max_iters: int,
    iterations: int,
    handoff: bool,
) -> Tensor:
    """Block principal pivoting, then the monotone phase, with conjugate-gradient solves.

    ``u`` and ``lam = u @ G`` hold the problems to solve, one per row, on the unit-diagonal
    Gramian ``G``; ``iterations`` counts the iterations spent before. Returns ``w``. Problems
    that are stuck, or unsolved after ``max_iters``, go to `_lawson_hanson`; with ``handoff``
    (for float64 input) those unsolved after half of the iterations left too.

    The iterations write into buffers allocated once (again only when rows leave the batch or
    the precision changes): fresh tensors of this size are page-faulted in by the operating
    system at every step. For the same reason of speed on the CPU, masks are applied by
    multiplication and selections made by ``torch.lerp`` with 0/1 weights (exact), not by
    boolean indexing or ``torch.where`` over whole rows, which take slow paths.
    """
    n, m = u.shape
    dtype, device = u.dtype, u.device
    accept_stuck = torch.finfo(dtype).eps ** 0.5
    # Problems left after this many iterations, or stuck earlier, go to Lawson and Hanson (who
    # solve them surely, but with one factorisation per problem and iteration).
    limit = max_iters
    if handoff:
        # In lower precision the Gramian's rounding blurs which rows are independent, and the
        # exchanges, accepting stuck problems to √ε, do better.
        limit = iterations + (max_iters - iterations) // 2
    # The solution is positively homogeneous in u: solve for rows scaled to unit size.
    scale = u.abs().sum(dim=1, keepdim=True)
    lam_u = lam / scale
    W = torch.zeros_like(u)
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
        mask_work.copy_(mask)
        lam_work.copy_(lam)
        torch.mul(lam_work, mask_work, out=g)
        gg_loop, gg = gg, torch.mul(g, g, out=product).sum(dim=1, keepdim=True)
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
        torch.lerp(d, g, restart.to(work), out=d)
        target = w if work == dtype else step.zero_()

        if iterations >= limit:
            W[rows] = _lawson_hanson(lam_u, G, tau, max_iters, iterations)
            return W * scale
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
                gd = gg
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
            gg_next = torch.mul(g, g, out=product).sum(dim=1, keepdim=True)
            beta = (gg_next / gg).nan_to_num_(0.0, 0.0, 0.0)
            if any_monotone:
                beta = beta.masked_fill_(blocked, 0.0)
            torch.addcmul(g, beta, d, out=d)
            gg = gg_next
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
            limit = iterations  # the rows left go to Lawson and Hanson at the next round
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
                return W * scale
            keep = (~done).nonzero().squeeze(1)
            rows = rows[keep]
            (lam_u, passive, mask, lam, w, d, gg, size, restart, monotone) = (
                t[keep] for t in (lam_u, passive, mask, lam, w, d, gg, size, restart, monotone)
            )
            (least_infeasible, backup, best_residual, idle_checks, moved) = (
                t[keep] for t in (least_infeasible, backup, best_residual, idle_checks, moved)
            )
            buffers = None


def _lawson_hanson(lam_u: Tensor, G: Tensor, tau: float, max_iters: int, iterations: int) -> Tensor:
    r"""The active-set algorithm of Lawson and Hanson for the problems left unsolved.

    C. L. Lawson and R. J. Hanson, *Solving Least Squares Problems*, Prentice-Hall, 1974,
    chapter 23: $P$ starts empty and at most one index enters it per iteration, the one with
    the most negative multiplier, and only if its row is independent of the rows of $P$
    (the factorisation of $G_{PP}$ stays positive definite with pivots of at least
    $\sqrt{10^3\tau}$) and its value in the solution on $P \cup \{j\}$ is positive; otherwise
    it is set aside until the next entry. When the solution $z$ of $(G(u + z))_P = 0$ has
    non-positive values, $w$ moves towards $z$ until the first of them reaches 0 and that index
    leaves $P$. Since the rows of $P$ stay independent, $G_{PP}$ is never singular, whatever the
    rank of $G$, and the objective decreases at every step, so the method terminates. Each
    iteration is one Cholesky factorisation per problem, of $G_{PP}$ only (gathered to the
    largest $|P|$, at most the rank of $G$ plus one), in float64.

    ``lam_u = u @ G`` holds the problems, one per row, for bounds of unit size, on the
    unit-diagonal Gramian ``G``; ``iterations`` counts those spent before. Returns ``w`` in
    ``lam_u``'s dtype.

    Raises:
        DualConeConvergenceError: After ``max_iters`` iterations in all, or where the KKT
            conditions do not hold at termination: to the tolerance $\tau$, and to
            $\sqrt\varepsilon$ on rows set aside (parallel to rows of $P$ to within rounding,
            their multiplier should be 0).
    """
    dtype = lam_u.dtype
    accept = torch.finfo(dtype).eps ** 0.5
    lam_u, G = lam_u.to(torch.float64), G.to(torch.float64)
    n, m = lam_u.shape
    device = lam_u.device
    min_pivot2 = 1e3 * tau
    W = torch.zeros_like(lam_u)
    rows = torch.arange(n, device=device)
    passive = torch.zeros(n, m, dtype=torch.bool, device=device)
    aside = torch.zeros_like(passive)
    w = torch.zeros_like(lam_u)
    # Whether w solves the equations on its passive set (with w_P > 0): then an index may enter.
    settled = torch.ones(n, dtype=torch.bool, device=device)
    positions = torch.arange(m, device=device)
    while True:
        lam = torch.addmm(lam_u, w, G)
        size = 1 + w.abs().sum(dim=1)
        best, j = torch.where(passive | aside, torch.inf, lam).min(dim=1)
        finished = settled & (best >= -tau * size)
        if bool(finished.any()):
            # The KKT conditions: to the tolerance on P and off the indices set aside, to √ε on
            # these (their rows are parallel to rows of P to within rounding).
            stationarity = torch.where(passive, lam, 0.0).abs().amax(dim=1)
            dual = torch.where(passive | aside, 0.0, -lam).amax(dim=1)
            dual_aside = torch.where(aside, -lam, 0.0).amax(dim=1)
            wrong = (torch.maximum(stationarity, dual) > tau * size) | (dual_aside > accept * size)
            bad = finished & wrong
            if bool(bad.any()):
                raise _convergence_error(iterations, w[bad], lam_u[bad], G, passive[bad])
            W[rows[finished]] = w[finished]
            if bool(finished.all()):
                return W.to(dtype)
            keep = (~finished).nonzero().squeeze(1)
            rows, lam_u, passive, aside, w, settled, j = (
                t[keep] for t in (rows, lam_u, passive, aside, w, settled, j)
            )
        if iterations >= max_iters:
            raise _convergence_error(iterations, w, lam_u, G, passive)
        iterations += 1
        k = rows.numel()
        here = torch.arange(k, device=device)
        trial = passive.clone()
        trial[here[settled], j[settled]] = True
        # Gather G_PP, the passive indices first (padding with the identity).
        count = trial.sum(dim=1)
        width = max(int(count.max()), 1)
        index = torch.argsort((~trial).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = positions[:width] < count.unsqueeze(1)
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        G_PP = torch.where(
            pair,
            G[index.unsqueeze(2), index.unsqueeze(1)],
            torch.eye(width, dtype=G.dtype, device=device),
        )
        rhs = torch.where(valid, -lam_u.gather(1, index), 0.0)
        L, info = torch.linalg.cholesky_ex(G_PP)
        solution = torch.cholesky_solve(rhs.unsqueeze(2), L).squeeze(2)
        z = torch.zeros_like(w).scatter_(1, index, torch.where(valid, solution, 0.0))
        pivots = L.diagonal(dim1=1, dim2=2).amin(dim=1)
        sound = (info == 0) & (pivots * pivots >= min_pivot2)
        # An entering index whose row depends on P, or whose value is not positive, waits.
        entering = z[here, j]
        refused = settled & (~sound | (entering <= 0))
        aside[here[refused], j[refused]] = True
        moving = ~refused
        passive = torch.where(moving.unsqueeze(1), trial, passive)
        positive = torch.where(passive, z, 1.0).amin(dim=1) > 0
        take = moving & positive
        # Towards z, until the first w_i on P reaches 0; those indices leave P.
        ratio = torch.where(passive & (z <= 0), w / (w - z), torch.inf)
        alpha = ratio.amin(dim=1, keepdim=True).clamp_(0.0, 1.0)
        step = moving & ~positive
        moved = torch.addcmul(w, alpha, z - w)
        leaving = passive & ((ratio <= alpha) | (moved <= 0)) & step.unsqueeze(1)
        passive = passive & ~leaving
        w = torch.where(take.unsqueeze(1), z, torch.where(step.unsqueeze(1), moved, w))
        w = torch.where(passive, w, 0.0)
        settled = torch.where(moving, take, settled)
        aside = aside & ~take.unsqueeze(1)


def _convergence_error(
    iterations: int, w: Tensor, lam_u: Tensor, G: Tensor, passive: Tensor
) -> DualConeConvergenceError:
    """Build the error reporting the KKT residuals of the problems left unsolved.

    ``w`` and ``lam_u = u @ G`` are those of bounds scaled to unit size ``Σ|u_j| = 1``.
    """
    lam = torch.addmm(lam_u, w, G)
    size = 1 + w.abs().sum(dim=1, keepdim=True)
    stationarity = (torch.where(passive, lam, 0.0).abs() / size).amax()
    dual = (torch.where(passive, 0.0, -lam) / size).amax()
    primal = (torch.where(passive, -w, 0.0) / size).amax()
    residuals = {
        "stationarity": float(stationarity),
        "dual_feasibility": max(float(dual), 0.0),
        "primal_feasibility": max(float(primal), 0.0),
    }
    return DualConeConvergenceError(iterations, w.shape[0], residuals)
