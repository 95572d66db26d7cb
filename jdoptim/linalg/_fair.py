"""The system ``G w = w^(−1/α)`` (w > 0) of FairGrad, whose case α = 1 is Nash-MTL's
bargaining system ``G w = 1/w``, solved by Newton's method in torch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from jdoptim.linalg._constraints import (
    Tolerances,
    project_onto_constraints,
)

RESIDUAL_TOL = 1e-10
"""FairGrad's system counts as solved once each equation w_i (Gw)_i = w_i^(1 - 1/alpha) holds up to
this fraction of the magnitude of its terms."""


def common_ascent_multipliers(L: Tensor, tol: Tolerances) -> Tensor | None:
    r"""Weights $\mu \ge 0$ with $G\mu \ge \mathbf 1$ (so $d = J^\top \mu$ has
    $g_i^\top d \ge 1$ for every row), or ``None`` if there are none.

    They exist iff some direction improves every objective, i.e. iff $0$ is not in the convex
    hull of the rows. This is decided exactly from the coordinates ``L`` of the rows
    (`gramian_factor`): $\mu$ are the multipliers of the projection of $0$ onto
    $\{d : J d \ge \mathbf 1\}$ (`project_onto_constraints`), which exists iff that set is not
    empty.
    """
    mu, feasible = project_onto_constraints(L, L.new_ones(L.shape[0]), tol)
    return mu if feasible else None


def solve_fair_system(
    G: Tensor, alpha: float, max_iters: int, starts: list[Tensor]
) -> tuple[Tensor, bool]:
    r"""Solve $G w = w^{-1/\alpha}$, $w > 0$, by Newton's method.

    The solution is the unique minimiser of the strictly convex
    $F(w) = \tfrac12 w^\top G w - \sum_i h(w_i)$ with $h'(w) = w^{-1/\alpha}$, which exists iff
    $0$ is not in the convex hull of the rows (see `common_ascent_multipliers`). Each step is a
    Newton step for $F$, $w \leftarrow w \odot (\mathbf 1 + t\delta)$ with
    $(W G W + \operatorname{diag}(w^{1-1/\alpha}/\alpha))\,\delta = -(w \odot \nabla F)$ (the
    system scaled by $W = \operatorname{diag}(w)$), where $t \le 1$ keeps every weight above
    1% of its value and then halves until $F$ decreases enough (Armijo). The decrease of $F$ is
    computed directly, not as a difference of two values of $F$, so that the line search stays
    exact when the weights span many orders of magnitude; a step is also accepted when every
    equation gets closer to holding, which matters once the decrease of $F$ is below rounding.
    As $F$ is strictly convex, the method converges from any positive start, quadratically near
    the solution. It stops when every
    residual $|w_i (Gw)_i - w_i^{1 - 1/\alpha}|$ is at most `RESIDUAL_TOL` times
    $w_i \sum_j |G_{ij}| w_j + w_i^{1 - 1/\alpha}$: every equation then holds to a relative
    $10^{-10}$ of its terms.

    Args:
        G: Gramian ``[m, m]``, float64, such that a solution exists.
        alpha: $\alpha > 0$.
        max_iters: Largest number of Newton steps.
        starts: Positive candidate starting points; each is first rescaled along its ray to
            minimise $F$, and the one with the lowest $F$ is used.

    Returns:
        ``(w, converged)``: the last iterate, and whether it meets the tolerance.
    """
    p = 1.0 - 1.0 / alpha  # h(w) = w^p / p, or log(w) when p = 0

    def decrease(w: Tensor, relative_change: Tensor) -> float:
        """F(w ⊙ (1 + relative_change)) - F(w), without cancellation between two values of F."""
        change = w * relative_change
        quadratic = 0.5 * change @ G @ (2.0 * w + change)
        log_ratio = torch.log1p(relative_change)
        barrier = log_ratio.sum() if p == 0.0 else (w**p * torch.expm1(p * log_ratio)).sum() / p
        return float(quadratic - barrier)

    def best_multiple(w: Tensor) -> Tensor:
        # d/ds F(s w) = s wᵀGw - s^(p-1) Σ w^p vanishes at this s.
        quadratic = float(w @ G @ w)
        if not quadratic > 0.0:
            return torch.full_like(w, math.nan)
        return w * (float((w**p).sum()) / quadratic) ** (1.0 / (2.0 - p))

    def relative_residuals(w: Tensor) -> tuple[Tensor, Tensor]:
        power = w**p
        scaled_gradient = w * (G @ w) - power  # w ⊙ ∇F
        return scaled_gradient, scaled_gradient.abs() / (w * (G.abs() @ w) + power)

    w = best_multiple(starts[0])
    for other in starts[1:]:
        other = best_multiple(other)
        if bool(torch.isfinite(other).all()) and decrease(w, other / w - 1.0) < 0.0:
            w = other
    scaled_gradient, relative = relative_residuals(w)
    for _ in range(max_iters):
        if float(relative.max()) <= RESIDUAL_TOL:
            return w, True
        hessian = w[:, None] * G * w[None, :] + torch.diag(w**p / alpha)
        scale = hessian.diagonal().rsqrt()
        delta = -scale * torch.linalg.solve(
            scale[:, None] * hessian * scale[None, :], scale * scaled_gradient
        )
        slope = float(scaled_gradient @ delta)
        t = min(1.0, 0.99 / max(-float(delta.min()), 1e-300))
        while True:
            trial = w * (1.0 + t * delta)
            trial_gradient, trial_relative = relative_residuals(trial)
            # F must decrease enough (Armijo), unless the decrease is lost in rounding while
            # every equation still gets closer to holding.
            if decrease(w, t * delta) <= 1e-4 * t * slope or bool(
                trial_relative.max() < (1.0 - 1e-4 * t) * relative.max()
            ):
                break
            t *= 0.5
            if t < 1e-15:
                return w, False
        w, scaled_gradient, relative = trial, trial_gradient, trial_relative
    return w, float(relative.max()) <= RESIDUAL_TOL


def fair_weights(
    L: Tensor, alpha: float, max_iters: int, tol: Tolerances, start: Tensor | None = None
) -> tuple[Tensor, bool]:
    r"""Solve FairGrad's system for the Gramian $G = L L^\top$: ``(weights, converged)``.

    ``L`` holds the coordinates of the rows (`gramian_factor`), float64. The system is solved for
    the trace-normalised Gramian and the solution scaled back. When no solution exists (no common
    ascent direction), the weights are zero. The starting points tried are
    $w_i = G_{ii}^{-\alpha/(1+\alpha)}$ (the solution for orthogonal rows), a positive
    perturbation of `common_ascent_multipliers`, and ``start`` (a previous solution).
    """
    m = L.shape[0]
    trace = float((L * L).sum())
    if not trace > 0.0:
        return L.new_zeros(m), True
    L = L / math.sqrt(trace)
    mu = common_ascent_multipliers(L, tol)
    if mu is None:
        return L.new_zeros(m), True
    G = L @ L.T
    # If G = s Gn, then w(G) = s^(-α/(1+α)) w(Gn).
    factor = trace ** (-alpha / (1.0 + alpha))
    starts = [G.diagonal() ** (-alpha / (1.0 + alpha)), mu + float(mu.max()) * 1e-3]
    if start is not None and bool((start > 0).all()) and bool(torch.isfinite(start).all()):
        starts.append(start / factor)
    w, converged = solve_fair_system(G, alpha, max_iters, starts)
    return w * factor, converged
