"""Projection onto polyhedral constraints ``J d ≥ b`` expressed through a factor of the
Gramian, for the methods whose sub-problems are small quadratic programs on ``J Jᵀ`` (PCD, CAGrad,
FairGrad, Nash-MTL)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Tolerances(NamedTuple):
    """Relative tolerances of `project_onto_constraints`."""

    slack: float
    """A constraint counts as satisfied when violated by at most this fraction of the magnitude
    of the terms of its slack."""
    dependence: float
    """A row counts as a combination of others when its squared distance to their span is at
    most this fraction of its squared norm."""


def tolerances(dtype: torch.dtype) -> Tolerances:
    """Tolerances for a Gramian computed in ``dtype``.

    Its entries carry relative rounding errors of about ``eps(dtype)``, so that rows dependent in
    exact arithmetic, or constraints that hold together with equality, look slightly otherwise:
    both tolerances are set well above that (100 eps, at most 1e-2), and the slack tolerance is
    never below 1e-10.
    """
    noise = min(100.0 * torch.finfo(dtype).eps, 1e-2)
    return Tolerances(slack=max(1e-10, noise), dependence=noise)


def correlation_spectrum(G: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    r"""The row norms of ``G`` and the eigenpairs of its correlation matrix that stand above the
    rounding level of ``dtype``.

    A Gramian computed in ``dtype`` has entries $G_{ij}$ wrong by about
    $\mathrm{eps} \lVert g_i \rVert \lVert g_j \rVert$, so that rows that are linearly dependent
    look independent through tiny eigenvalues, which conditioning then amplifies. The eigenvalues
    of the correlation matrix $C = D^{-1} G D^{-1}$ ($D = \operatorname{diag}(\lVert g_i
    \rVert)$, zero rows left at zero, which makes this independent of the scales of the rows)
    up to ``m`` times the dependence tolerance of `tolerances` are dropped. $C$ has entries in
    $[-1, 1]$, so its decomposition cannot overflow.

    Args:
        G: A finite Gramian, shape ``[m, m]``, float64.
        dtype: The precision ``G`` was computed in.

    Returns:
        ``(norms, eigenvalues, eigenvectors)``: the ``m`` row norms, the ``r`` kept eigenvalues of
        $C$ and their eigenvectors (``[m, r]``), so that $G \approx D V \Lambda V^\top D$.
    """
    m = G.shape[0]
    norms = G.diagonal().clamp(min=0.0).sqrt()
    inverse = torch.where(norms > 0.0, 1.0 / norms, 0.0)
    C = G * torch.outer(inverse, inverse)
    eigenvalues, eigenvectors = torch.linalg.eigh((C + C.T) / 2)
    keep = eigenvalues > m * tolerances(dtype).dependence
    return norms, eigenvalues[keep], eigenvectors[:, keep]


def gramian_factor(G: Tensor, dtype: torch.dtype) -> Tensor:
    r"""A factor $L$ (``[m, r]``, float64) with $L L^\top \approx G$, without the directions
    of ``G`` that are below the rounding level of ``dtype`` (see `correlation_spectrum`).

    Row $i$ of $L$ holds the coordinates of $g_i$ in an orthonormal basis of the remaining span,
    so $r$ is the numerical rank of the rows.
    """
    norms, eigenvalues, eigenvectors = correlation_spectrum(G, dtype)
    return norms[:, None] * eigenvectors * eigenvalues.sqrt()


def project_onto_constraints(
    L: Tensor,
    b: Tensor,
    tol: Tolerances,
    b_magnitude: Tensor | None = None,
    max_iters: int | None = None,
) -> tuple[Tensor, bool]:
    r"""Multipliers of the projection of a point onto a polyhedron, from the constraint rows'
    coordinates only.

    Solves $\min_d \tfrac12 \lVert d - x_0 \rVert^2$ subject to $a_j^\top d \ge h_j$
    ($j = 1..k$) given $L$ with $L L^\top = K = A A^\top$ (e.g. from `gramian_factor`) and
    $b = h - A x_0$. By the KKT conditions the solution is $d = x_0 + A^\top \mu$ with
    $\mu \ge 0$, $K\mu \ge b$ and $\mu^\top (K\mu - b) = 0$; this returns $\mu$.

    The method is the dual active-set method of Goldfarb and Idnani (Math. Programming 27, 1983)
    for an identity Hessian: starting from $\mu = 0$ (the unconstrained minimum), it adds the
    most violated constraint, dropping active constraints whose multiplier reaches zero on the
    way. It stops after finitely many steps in exact arithmetic; at the end, the multipliers are
    recomputed by one solve on the final active set, so that they are exact up to rounding.

    A constraint counts as violated when its slack $(K\mu - b)_j$ is below $-$``tol.slack`` times
    $\sum_i |K_{ji} \mu_i| + \beta_j$, where $\beta_j$ is the magnitude of the terms that $b_j$
    was computed from (``b_magnitude``, $|b_j|$ by default). A constraint whose row's component
    $z$ orthogonal to the active rows (computed from the coordinates, which is accurate even when
    the active rows are ill-conditioned) has $\lVert z \rVert^2$ at most ``tol.dependence``
    times its squared norm counts as dependent on them; so does any row once the active rows
    span all $r$ coordinates.

    Args:
        L: Coordinates of the constraint rows, shape ``[k, r]``.
        b: ``h - A x0``, shape ``[k]``; $b_j > 0$ when $x_0$ violates constraint $j$.
        tol: Relative tolerances (see `tolerances`).
        b_magnitude: Magnitude of the terms summed into ``b`` (such as $|h| + |A x_0|$ computed
            from absolute values), so that cancellation in ``b`` is not mistaken for violation.
        max_iters: Largest number of add or drop steps; ``10 k + 10`` by default.

    Returns:
        ``(mu, feasible)``. When the constraints cannot hold together, ``feasible`` is ``False``
        and ``mu`` holds the multipliers reached so far.

    Raises:
        RuntimeError: If the method has not finished within ``max_iters`` steps (only rounding
            errors can make it cycle).
    """
    k, rank = L.shape
    K = L @ L.T
    mu = K.new_zeros(k)
    if k == 0:
        return mu, True
    if max_iters is None:
        max_iters = 10 * k + 10
    if b_magnitude is None:
        b_magnitude = b.abs()
    tiny = torch.finfo(K.dtype).tiny

    def violations(mu: Tensor) -> Tensor:
        slack = K @ mu - b
        return slack / torch.clamp(K.abs() @ mu.abs() + b_magnitude, min=tiny)

    active: list[int] = []
    steps = 0
    while True:
        violation = violations(mu)
        if active:
            violation[active] = 0.0
        p = int(violation.argmin())
        if violation[p] >= -tol.slack:
            break
        slack_p = K[p] @ mu - b[p]
        while True:
            steps += 1
            if steps > max_iters:
                raise RuntimeError(
                    f"The active-set projection did not finish within {max_iters} steps on a "
                    f"{k}x{k} problem; the constraints are too ill-conditioned."
                )
            if active:
                index = torch.tensor(active, device=K.device)
                r = torch.linalg.solve(K[index][:, index], K[index, p])
                z = L[p] - r @ L[index]
                positive = r > 0
                ratios = torch.where(positive, mu[index] / torch.where(positive, r, 1.0), math.inf)
                drop = int(ratios.argmin())
                partial_step = float(ratios[drop])
            else:
                index = None
                r = None
                z = L[p]
                drop = -1
                partial_step = math.inf
            # z is the part of row p orthogonal to the active rows; if it vanishes, adding p can
            # only be done by trading multipliers with the active constraints.
            z_sq = z @ z
            independent = (
                len(active) < rank and bool(K[p, p] > 0) and bool(z_sq > tol.dependence * K[p, p])
            )
            full_step = float(-slack_p / z_sq) if independent else math.inf
            step = min(partial_step, full_step)
            if step == math.inf:
                return mu, False
            if index is not None:
                mu[index] -= step * r
            mu[p] += step
            if full_step <= partial_step:
                active.append(p)
                break
            mu[active[drop]] = 0.0
            del active[drop]
            slack_p = K[p] @ mu - b[p]
    mu = mu.clamp(min=0.0)
    if active:
        # Recompute the multipliers in one solve, unless rounding makes that worse.
        index = torch.tensor(active, device=K.device)
        polished = K.new_zeros(k)
        polished[index] = torch.linalg.solve(K[index][:, index], b[index])
        if bool((polished >= -tol.slack * polished.abs().max()).all()):
            polished = polished.clamp(min=0.0)
            worst = min(float(violations(mu).min()), -tol.slack)
            if float(violations(polished).min()) >= worst:
                mu = polished
    return mu, True
