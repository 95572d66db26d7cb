r"""Projection of weight vectors onto the dual cone of a Jacobian's rows, in weight space.

For a Jacobian $J$ with Gramian $G = J J^\top$ and a weight vector $u$, the projection of
$J^\top u$ onto the dual cone $\{x : Jx \ge 0\}$ is $J^\top v$, where $v$ solves

$$
\min_v\ v^\top G v \quad\text{subject to}\quad v \ge u
$$

(Proposition 1 of [arXiv 2406.16232](https://arxiv.org/abs/2406.16232)). UPGrad solves it for
every row of $\operatorname{diag}(u)$, DualProj for $u$ itself. Two solvers are available:

- ``"active_set"``: `project_weights_active_set`, all problems at once in torch, on $G$'s
  device and in its dtype; exact at convergence and valid for singular $G$.
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
        iterations: Conjugate-gradient iterations performed.
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
    how much the projection agrees with row $i$). Each problem keeps a passive set $P$ of
    indices where $w$ is free ($w = 0$ elsewhere) and solves $(G(u + w))_P = 0$ on it:

    1. Block principal pivoting (J. Kim and H. Park, *Fast nonnegative matrix factorization:
       an active-set-like method and comparisons*, SIAM J. Sci. Comput. 33(6), 2011): every
       index with $w_i < 0$ or $\lambda_i < 0$ changes sides at once. This finds the solution
       in a few exchanges when the passive rows are independent, but may cycle when they are
       not, so it is kept only while it reduces the number of infeasible indices (with three
       steps of grace).
    2. Then a feasible, monotone active-set method (after the NNLS algorithm of Lawson and
       Hanson), from $w$ clipped to $w \ge 0$: each step is an exact line search cut short
       where some $w_i$ reaches 0 (which then leaves $P$), and indices with $\lambda_i < 0$
       join $P$. The objective never increases, which keeps this phase from cycling where
       the first one does, and it needs no independence.

    All problems are solved together, as rows of one batch. The equations on the passive sets
    are solved by conjugate gradients on the Gramian scaled to a unit diagonal (rows scaled to
    unit norm), restarted where a passive set changes, so that every iteration is one product
    of the batch with $G$. This needs no factorisation and no regularisation: the equations are
    consistent even when $G$ is singular (duplicated, zero or dependent rows), and conjugate
    gradients solves consistent semi-definite systems. Problems without conflict
    ($Gu \ge 0$) need no iteration at all.

    The iteration stops only once the KKT conditions hold to rounding for every problem,
    relative to the problem's scale: with $\hat\lambda_i = \lambda_i / \lVert g_i \rVert$ and
    $\sigma = \sum_j \lVert g_j \rVert\, (|u_j| + |w_j|)$ (the size of the terms of $J^\top v$),
    $\hat\lambda_i \ge -\tau\sigma$ everywhere, $|\hat\lambda_i| \le \tau\sigma$ where
    $i \in P$, $w_i \ge -\tau\sigma / \lVert g_i \rVert$ (the output is clipped to $v \ge u$),
    with $\tau = 4 \max(m, 16)\, \varepsilon$ for the dtype's machine epsilon $\varepsilon$.
    The minimiser $v$ is not unique when $G$ is singular, but $J^\top v$, the projection, is.
    A problem whose residual stops decreasing (rows parallel to within about
    $\sqrt\varepsilon$, which the Gramian cannot tell apart) is accepted if its residual is
    below $\sqrt\varepsilon$ instead of $\tau$; otherwise the solver raises.

    Args:
        U: Lower bounds, shape ``[k, m]``.
        G: Symmetric positive semi-definite Gramian, shape ``[m, m]``.
        max_iters: Largest number of conjugate-gradient iterations; ``100 + 20·m`` when
            ``None``.

    Returns:
        The minimisers, shape ``[k, m]``, with ``U``'s dtype and device. The computation runs
        on ``G``'s device in the common dtype of ``U`` and ``G``, with a few host
        synchronisations every few iterations (none per problem).

    Raises:
        DualConeConvergenceError: If the KKT conditions do not hold after ``max_iters``
            iterations, or if a problem stops making progress with a residual above
            $\sqrt\varepsilon$.

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
    # The solution is not differentiated through (nor is quadprog's).
    U_work = U.detach().to(device=device, dtype=dtype)
    G = G.detach().to(dtype)
    tau = 4.0 * max(m, 16) * torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    accept_stuck = torch.finfo(dtype).eps ** 0.5

    # Scale the rows of J to unit norm: G_hat = S⁻¹ G S⁻¹ and u_hat = S u, with S = diag(‖g_i‖).
    # Zero rows are left out: their multiplier is 0 whatever v is.
    norms = G.diagonal().clamp(min=0.0).sqrt()
    live = norms > 0
    inv_norms = torch.where(live, 1.0 / torch.where(live, norms, 1.0), 0.0)
    G_hat = G * inv_norms[:, None] * inv_norms[None, :]
    G_hat = (G_hat + G_hat.T) / 2
    u_hat = U_work * norms

    # First exchange, from the empty passive set: every index with a negative multiplier.
    # Problems without one (no conflict) are solved by w = 0.
    lam0 = u_hat @ G_hat
    u_size0 = u_hat.abs().sum(dim=1, keepdim=True)
    passive0 = live & (lam0 < -tau * u_size0)
    W = torch.zeros_like(u_hat)
    unsolved = passive0.any(dim=1).nonzero().squeeze(1)
    # Conjugate gradients solves a passive set of p indices in p steps (in exact arithmetic), so
    # the passive sets are updated after at most that many steps.
    check_every = min(_CHECK_EVERY, int(passive0.sum(dim=1).max()))

    # State of the unsolved problems, one row each: the passive set and its 0/1 mask; w, zero
    # off the passive set; the multipliers lam = G_hat (u + w); the gradient g = lam on the
    # passive set; the conjugate-gradient direction d and the squared norm gg of g; whether the
    # problem is in the monotone phase; the bookkeeping of the exchanges and of the progress.
    n = unsolved.numel()
    u = u_hat[unsolved]
    u_size = u_size0[unsolved]
    passive = passive0[unsolved]
    mask = passive.to(dtype)
    lam = lam0[unsolved]
    w = torch.zeros_like(u)
    g = lam * mask
    d = g
    gg = torch.linalg.vecdot(g, g).unsqueeze(1)
    # Once ‖g‖ is below half the tolerance a problem stops stepping: going on would only
    # amplify rounding noise along the null space of a singular G.
    gg_floor = (tau / 2 * u_size) ** 2
    monotone = torch.zeros(n, 1, dtype=torch.bool, device=device)
    least_infeasible = torch.full((n, 1), m + 1, device=device)
    backup = torch.full((n, 1), _BACKUP_STEPS, device=device)
    best_residual = torch.full((n, 1), torch.inf, dtype=dtype, device=device)
    idle_checks = torch.zeros(n, 1, dtype=torch.long, device=device)
    moved = torch.zeros(n, 1, dtype=torch.bool, device=device)
    any_monotone = False

    iterations = 0
    while n > 0:
        if iterations >= max_iters:
            raise _convergence_error(iterations, u, w, lam, passive, live)
        for _ in range(check_every):
            # One conjugate-gradient step on each passive set (d is 0 off the set).
            # The step is the exact line search along d (gg / dGd in exact arithmetic), so that
            # no step can increase the objective whatever rounding does to conjugacy.
            Gd = d @ G_hat
            dGd = torch.linalg.vecdot(d, Gd).unsqueeze(1)
            gd = torch.linalg.vecdot(g, d).unsqueeze(1)
            stepping = (gg > gg_floor) & (dGd > 0) & (gd > 0)
            alpha = torch.where(stepping, gd / dGd, 0.0)
            if any_monotone:
                # In the monotone phase the step stops where the first w_i reaches 0.
                ratio = torch.where(monotone & (d > 0), w / d, torch.inf)
                reach = ratio.amin(dim=1, keepdim=True)
                blocked = reach < alpha
                alpha = torch.minimum(alpha, reach)
            w.addcmul_(alpha, d, value=-1.0)
            lam.addcmul_(alpha, Gd, value=-1.0)
            if any_monotone:
                hit = blocked & (ratio <= reach)
                w.masked_fill_(hit, 0.0)
                passive = passive & ~hit
                mask = passive.to(dtype)
                moved |= blocked
            g = lam * mask
            gg_next = torch.linalg.vecdot(g, g).unsqueeze(1)
            beta = torch.where(stepping, gg_next / gg, 0.0)
            if any_monotone:
                beta = beta.masked_fill(blocked, 0.0)
            d = torch.addcmul(g, beta, d)
            gg = gg_next
        iterations += check_every

        # Exchange the infeasible indices whose sign is clear at the current accuracy.
        size = u_size + w.abs().sum(dim=1, keepdim=True)
        threshold = torch.maximum(tau * size, g.abs().amax(dim=1, keepdim=True))
        enter = live & ~passive & (lam < -threshold)
        infeasible = enter | (passive & (w < -threshold))
        count = infeasible.sum(dim=1, keepdim=True)
        improved = count < least_infeasible
        least_infeasible = torch.where(improved, count, least_infeasible)
        backup = torch.where(improved, _BACKUP_STEPS, backup - (count > 0).long())
        switched = ~monotone & (backup < 0)
        monotone = monotone | switched
        exchange = torch.where(monotone, enter, infeasible)
        exchanged = exchange.any(dim=1, keepdim=True)
        passive = passive ^ exchange
        mask = passive.to(dtype)
        w = torch.where(monotone, w.clamp(min=0.0), w) * mask

        # Exact multipliers and the KKT test; restart where the passive set changed.
        lam = (u + w) @ G_hat
        size = u_size + w.abs().sum(dim=1, keepdim=True)
        g = lam * mask
        gg = torch.linalg.vecdot(g, g).unsqueeze(1)
        gg_floor = (tau / 2 * size) ** 2
        d = torch.where(exchanged | switched | (gg <= gg_floor), g, d)
        # The worst KKT residual of each problem, relative to its size (positive when violated).
        residual = torch.maximum(
            g.abs().amax(dim=1, keepdim=True),
            -torch.minimum(
                torch.where(live & ~passive, lam, 0.0).amin(dim=1, keepdim=True),
                w.amin(dim=1, keepdim=True),
            ),
        ) / size.clamp(min=tiny)
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

        solved, failed, in_monotone, largest = torch.stack(
            [done.sum(), (stuck & ~done).sum(), monotone.sum(), passive.sum(dim=1).max()]
        ).tolist()
        if failed:
            raise _convergence_error(iterations, u, w, lam, passive, live)
        any_monotone = in_monotone > 0
        check_every = min(_CHECK_EVERY, max(largest, 1))
        if solved:
            done = done.squeeze(1)
            W[unsolved[done]] = w[done]
            keep = (~done).nonzero().squeeze(1)
            unsolved = unsolved[keep]
            n = unsolved.numel()
            (u, u_size, passive, mask, lam, w, g, d, gg, gg_floor, monotone) = (
                t[keep] for t in (u, u_size, passive, mask, lam, w, g, d, gg, gg_floor, monotone)
            )
            (least_infeasible, backup, best_residual, idle_checks, moved) = (
                t[keep] for t in (least_infeasible, backup, best_residual, idle_checks, moved)
            )

    V = U_work + W.clamp(min=0.0) * inv_norms
    return V.to(device=U.device, dtype=U.dtype)


def _convergence_error(
    iterations: int,
    u: Tensor,
    w: Tensor,
    lam: Tensor,
    passive: Tensor,
    live: Tensor,
) -> DualConeConvergenceError:
    """Build the error reporting the KKT residuals of the problems left unsolved."""
    size = (u.abs() + w.abs()).sum(dim=1, keepdim=True).clamp(min=torch.finfo(u.dtype).tiny)
    stationarity = (torch.where(passive, lam, 0.0).abs() / size).amax()
    dual = (torch.where(live & ~passive, -lam, 0.0) / size).amax().clamp(min=0.0)
    primal = (torch.where(passive, -w, 0.0) / size).amax().clamp(min=0.0)
    residuals = {
        "stationarity": float(stationarity),
        "dual_feasibility": float(dual),
        "primal_feasibility": float(primal),
    }
    return DualConeConvergenceError(iterations, u.shape[0], residuals)
