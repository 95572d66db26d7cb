from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_non_negative,
    check_positive_int,
)
from jdoptim.linalg._constraints import (
    Tolerances,
    gramian_factor,
    project_onto_constraints,
    tolerances,
)
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2110.14048"

ROOT_TOL = 1e-12
"""The level search stops once the squared distance to the mean gradient is within this fraction
of phi (when the exact root of the last piece has not already been certified)."""


def cagrad_multipliers(L: Tensor, c: float, tol: Tolerances, max_iters: int) -> Tensor:
    r"""Multipliers $\mu \ge 0$ of CAGrad's update $d = g_0 + J^\top \mu$, from the Gramian.

    CAGrad's problem $\max_d \min_i g_i^\top d$ s.t. $\lVert d - g_0 \rVert \le \sqrt\phi$ is
    solved through its level sets: for a level $t$, let $d_t$ be the projection of $g_0$ onto
    $P_t = \{d : Jd \ge t \mathbf 1\}$ and $D(t) = \lVert d_t - g_0 \rVert$. $D^2$ is convex and
    piecewise quadratic in $t$, with derivative $2 \mathbf 1^\top \mu_t$ where $\mu_t$ are the
    projection's multipliers, and the optimal level is $t^\star = \max\{t : D(t) \le
    \sqrt\phi\}$, with $d^\star = d_{t^\star}$. Each projection is solved exactly
    (`project_onto_constraints`). Newton's method on $D^2(t) = \phi$ runs from
    $t_0 = \min_i (g_i^\top g_0 + \sqrt\phi \lVert g_i \rVert) \ge t^\star$, so it decreases
    monotonically to $t^\star$; at each step the exact root of the current quadratic piece is
    tried, and accepted once its multipliers satisfy the KKT conditions of the projection, which
    makes the result exact up to rounding.

    Args:
        L: Coordinates of the rows, ``[m, r]`` (see `gramian_factor`), scaled to a Gramian
            $G = L L^\top$ of trace about 1.
        c: CAGrad's $c \ge 0$.
        tol: Relative tolerances of the projections and of the KKT checks.
        max_iters: Largest number of Newton steps.

    Raises:
        RuntimeError: If $t^\star$ is not found within ``max_iters`` Newton steps.
    """
    m = L.shape[0]
    G = L @ L.T
    gg0 = G.mean(dim=1)  # g_i^T g_0
    magnitude = G.abs().mean(dim=1)  # of the terms of g_i^T g_0
    g0_sq = float(gg0.mean())
    # A mean below the rounding level of the Gramian counts as zero: the update is then g0.
    if not g0_sq > tol.dependence * float(G.diagonal().max()) or c == 0.0:
        return G.new_zeros(m)
    phi = c**2 * g0_sq

    def project(level: float) -> tuple[Tensor, bool]:
        return project_onto_constraints(L, level - gg0, tol, abs(level) + magnitude)

    level = float((gg0 + math.sqrt(phi) * G.diagonal().clamp(min=0.0).sqrt()).min())
    mu, feasible = project(level)
    for _ in range(max_iters):
        if not feasible:
            # P_t is empty above t = 0 exactly when 0 is in the convex hull of the rows; when
            # that hull nearly contains 0, it can take a projection at a lower level to tell.
            if level <= 0.0:
                raise RuntimeError("CAGrad: the projection onto {d : Jd >= t}, t <= 0, failed.")
            level = 0.0
            mu, feasible = project(level)
            continue
        excess = float(mu @ G @ mu) - phi
        if excess <= ROOT_TOL * phi:
            return mu
        exact = _exact_root_on_piece(G, gg0, magnitude, mu > 0, phi, tol.slack)
        if exact is not None:
            return exact
        level -= excess / (2.0 * float(mu.sum()))
        mu, feasible = project(level)
    raise RuntimeError(
        f"CAGrad's solver did not converge within max_iters={max_iters} Newton steps; "
        "increase max_iters."
    )


def _exact_root_on_piece(
    G: Tensor, gg0: Tensor, magnitude: Tensor, active: Tensor, phi: float, slack_tol: float
) -> Tensor | None:
    """Multipliers at the level where the quadratic piece of active set ``active`` reaches
    ``phi``, if they satisfy the KKT conditions of the projection there; otherwise ``None``."""
    index = active.nonzero().squeeze(1)
    K = G[index][:, index]
    ones = torch.ones_like(gg0[index])
    try:
        p = torch.linalg.solve(K, ones)
        q = torch.linalg.solve(K, gg0[index])
    except torch.linalg.LinAlgError:  # numerically dependent rows: leave it to Newton's steps
        return None
    a, b, c = float(p.sum()), float(q.sum()), float(gg0[index] @ q)
    discriminant = b * b - a * (c - phi)
    if not (a > 0.0 and discriminant >= 0.0):
        return None
    level = (b + math.sqrt(discriminant)) / a
    mu_active = level * p - q
    if (mu_active < -slack_tol * mu_active.abs().max()).any():
        return None
    mu = G.new_zeros(G.shape[0])
    mu[index] = mu_active.clamp(min=0.0)
    slack = G @ mu - (level - gg0)
    scale = G.abs() @ mu + abs(level) + magnitude
    if (slack < -slack_tol * scale).any():
        return None
    return mu


@register(paper=_PAPER, permutation_invariant=True, example_args=lambda m: {"c": 0.5})
class CAGradWeighting(Weighting):
    r"""CAGrad's weights $w = \mathbf 1/m + \mu$, where $J^\top \mu$ is the correction added to
    the mean gradient (see `CAGrad`).

    Args:
        c: Radius of the ball around $g_0$, relative to $\lVert g_0 \rVert$.
        norm_eps: A Gramian whose trace is not above this value is treated as zero (zero
            weights). TorchJD uses 1e-4; the default 0 keeps the method exact at every scale.
        max_iters: Largest number of Newton steps of the solver.
    """

    c = Argument(check_non_negative)
    norm_eps = Argument(check_non_negative)
    max_iters = Argument(check_positive_int)

    def __init__(self, c: float, norm_eps: float = 0.0, max_iters: int = 100) -> None:
        super().__init__()
        self.c = c
        self.norm_eps = norm_eps
        self.max_iters = max_iters

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        # The solver branches on values at every step: one transfer to the CPU costs less than a
        # host synchronisation per step.
        G = matrix.detach().to(device="cpu", dtype=torch.float64)
        trace = float(G.diagonal().sum())
        if not math.isfinite(trace):
            return torch.full_like(matrix[0], math.nan)
        if not trace > self.norm_eps:
            return torch.zeros_like(matrix[0])
        L = gramian_factor(G / trace, matrix.dtype)
        mu = cagrad_multipliers(L, self.c, tolerances(matrix.dtype), self.max_iters)
        weights = mu + 1.0 / m
        return weights.to(device=matrix.device, dtype=matrix.dtype)


@register(paper=_PAPER, permutation_invariant=True, example_args=lambda m: {"c": 0.5})
class CAGrad(GramianWeightedAggregator):
    r"""Conflict-Averse Gradient descent (Liu et al., *Conflict-Averse Gradient Descent for
    Multi-task Learning*, NeurIPS 2021, [arXiv 2110.14048](https://arxiv.org/abs/2110.14048)).

    The update maximises the worst improvement rate over the objectives, within a ball around the
    mean gradient $g_0 = \frac1m \sum_i g_i$:

    $$
    \max_d \min_i g_i^\top d \quad\text{s.t.}\quad \lVert d - g_0 \rVert \le c \lVert g_0 \rVert.
    $$

    By duality (Algorithm 1 of the paper), with $\phi = c^2 \lVert g_0 \rVert^2$ and
    $g_w = J^\top w$,

    $$
    w^\star = \arg\min_{w \in \Delta_m} g_w^\top g_0 + \sqrt{\phi} \lVert g_w \rVert,
    \qquad
    \mathcal A(J) = g_0 + \frac{\sqrt\phi}{\lVert g_{w^\star} \rVert} g_{w^\star}.
    $$

    The problem is solved exactly from the Gramian, in torch, by a search over the level
    $t = \min_i g_i^\top d$ in which each step is an exact projection (see
    `cagrad_multipliers`): the result agrees with the optimum to rounding, whereas the paper's
    code uses scipy's SLSQP and TorchJD uses cvxpy with Clarabel, both to a solver tolerance.
    There is no rescaling by $1/(1 + c^2)$ (an option of the paper's code), as in TorchJD.

    When the optimum is not unique, which happens only when $0$ is in the convex hull of the
    rows (the optimal value is then $0$ and $g_{w^\star} = 0$), the update is the optimal $d$
    closest to $g_0$. TorchJD returns $0$ in that case, which lies outside the ball when
    $c < 1$. When $c = 0$, or $g_0 = 0$ up to the rounding level of the Gramian's dtype, the
    update is $g_0$. Directions of the Gramian below that rounding level are removed before
    solving (`gramian_factor`).

    Args:
        c: Radius of the ball around $g_0$, relative to $\lVert g_0 \rVert$.
        norm_eps: A Gramian whose trace is not above this value is treated as zero (zero
            update). TorchJD uses 1e-4; the default 0 keeps the method exact at every scale.
        max_iters: Largest number of Newton steps of the solver; it raises a `RuntimeError`
            if they do not suffice.

    Examples:
        >>> import torch
        >>> from jdoptim import CAGrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> CAGrad(c=0.5)(J)
        tensor([0.1835, 1.2041, 1.2041], dtype=torch.float64)
        >>> CAGrad(c=0.5).weighting(J @ J.T)
        tensor([0.7041, 0.5000], dtype=torch.float64)
    """

    def __init__(self, c: float, norm_eps: float = 0.0, max_iters: int = 100) -> None:
        super().__init__(CAGradWeighting(c, norm_eps, max_iters))
