r"""Minimum-norm point of the convex hull of a Jacobian's rows, from its Gramian.

Both functions solve the MGDA sub-problem

$$
\min_{w \in \Delta_m} w^\top G w,\qquad \Delta_m = \{w \ge 0,\ \mathbf 1^\top w = 1\},
$$

whose solution $w^\star$ gives the point $J^\top w^\star$ of the convex hull of the rows of
$J$ nearest to the origin ($G = J J^\top$). `min_norm_weights` solves it exactly, by Wolfe's
active-set method; `min_norm_frank_wolfe` runs the Frank-Wolfe iteration of the MGDA papers, which
stops at a tolerance of its own.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

GAP_TOL = 16.0
"""Optimality is accepted when no vertex improves on the current point by more than this many
units of rounding (see `min_norm_weights`)."""

DEPENDENCE_TOL = 64.0
"""A vertex whose lifted point is within this many units of float64 rounding of the span of the
corral counts as affinely dependent on it (see `min_norm_weights`)."""


def min_norm_weights(G: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    r"""The exact minimiser of $w^\top G w$ over the probability simplex (MGDA's weights).

    Wolfe's nearest-point algorithm (P. Wolfe, *Finding the nearest point in a polytope*,
    Math. Programming 11, 1976), on the points $p_i$ with Gram matrix $G$: it keeps a *corral*
    $S$ of affinely independent points and the barycentric weights $\lambda$ of the current point
    $x = \sum_{i \in S} \lambda_i p_i$. A major cycle adds the point $p_j$ of smallest
    $p_j^\top x$, unless $p_j^\top x \ge \lVert x \rVert^2$ (then every point is on the far side
    of the hyperplane through $x$ orthogonal to $x$, and $x$ is the nearest point: the KKT
    conditions $(Gw)_i \ge w^\top G w$ hold). Minor cycles then move $x$ towards the nearest
    point of the affine hull of $S$, $\alpha \propto (G_{SS} + \sigma \mathbf 1 \mathbf 1^\top)^{-1}
    \mathbf 1$ (any $\sigma > 0$; here the largest $G_{ii}$ of $S$, which keeps the matrix scaled),
    dropping the points whose weight reaches zero on the way. It terminates after finitely many
    steps, and its result is exact up to rounding: unlike Frank-Wolfe, it does not approach the
    solution but lands on it.

    Degenerate input is exact too: a zero row is the answer at once; duplicated rows and rows in
    the affine hull of others are never added to a corral (they cannot improve on its nearest
    point); a point is added only if its lifted vector $(p_j, \sqrt\sigma)$ stands out of the span
    of the corral's by more than `DEPENDENCE_TOL` units of float64 rounding (the Cholesky pivot
    of the new point), so no singular system is ever solved.

    Everything is relative to the data's scale: ``G`` is divided by its largest diagonal entry,
    and a point improves on $x$ only if $\lVert x \rVert^2 - p_j^\top x$ exceeds `GAP_TOL` units
    of rounding of its terms, $\varepsilon\,(\lVert p_j \rVert + s)\,s$ with
    $s = \sum_{i \in S} \lambda_i \lVert p_i \rVert$ and $\varepsilon$ the machine epsilon of
    ``dtype`` (the precision the Gramian was computed in). The squared norm of $x$ decreases at
    every major cycle; if rounding stops it from decreasing, the previous point is returned.

    Args:
        G: A finite Gramian, symmetric positive semi-definite up to rounding, shape ``[m, m]``.
        dtype: The precision ``G`` was computed in (its own dtype by default).

    Returns:
        The weights $w^\star$ on the simplex, float64, on the CPU.

    Examples:
        >>> import torch
        >>> from jdoptim.linalg import min_norm_weights
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
        >>> min_norm_weights(J @ J.T)  # x = (0.8, 0.4): (Gw)_i = 0.8 = |x|² for i = 1, 2
        tensor([0.8000, 0.2000, 0.0000], dtype=torch.float64)
    """
    eps = torch.finfo(G.dtype if dtype is None else dtype).eps
    G = G.detach().to(device="cpu", dtype=torch.float64)
    m = G.shape[0]
    squared_norms = G.diagonal().clamp(min=0.0)
    scale = float(squared_norms.max())
    weights = torch.zeros(m, dtype=torch.float64)
    weights[int(squared_norms.argmin())] = 1.0
    if m == 1 or scale == 0.0:
        return weights
    G = (G + G.T) / (2.0 * scale)
    norms = G.diagonal().clamp(min=0.0).sqrt()
    corral = _Corral(G, int(squared_norms.argmin()))
    best = float(weights @ G @ weights)
    for _ in range(50 * m + 50):
        products = G @ weights  # p_i^T x for every i
        squared_norm = float(weights @ products)
        s = float(norms @ weights)
        gaps = squared_norm - products
        tolerance = GAP_TOL * eps * (norms + s) * s
        j = int((gaps - tolerance).argmax())
        if not gaps[j] > tolerance[j] or j in corral.points:
            break
        candidate = corral.copy()
        lam = _improve(candidate, weights[corral.points], j)
        if lam is None:
            break
        new_weights = torch.zeros_like(weights)
        new_weights[candidate.points] = lam
        new_squared_norm = float(new_weights @ G @ new_weights)
        if not new_squared_norm < best:
            break
        corral, weights, best = candidate, new_weights, new_squared_norm
    else:
        warnings.warn(
            f"Wolfe's min-norm algorithm stopped after {50 * m + 50} major cycles without "
            "certifying optimality; the last point is used.",
            RuntimeWarning,
            stacklevel=2,
        )
    return weights


class _Corral:
    r"""An affinely independent set of points $p_i$ (indices into the Gram matrix ``G``), the
    first of which, $p_b$, has the smallest norm, with the Cholesky factor of the Gram matrix
    $D$ of the differences $p_i - p_b$ of the others.

    The nearest point to the origin of their affine hull is $p_b + \sum_i \beta_i (p_i - p_b)$
    with $D\beta = (G_{bb} - G_{ib})_i$. Working with differences from the smallest point keeps
    the tiny entries of ``G`` that a system on ``G`` itself would round away. Adding a point
    extends the factor by one row; a Cholesky pivot up to `DEPENDENCE_TOL` units of rounding of
    its diagonal entry (the squared distance of the new point from the affine hull of the
    others, relative to its distance from $p_b$) means dependence, and the point is refused.
    """

    def __init__(self, G: Tensor, first: int) -> None:
        self.G = G
        self.squared_norms = G.diagonal().tolist()
        self.points = [first]
        self.factor = G.new_zeros(0, 0)

    def copy(self) -> _Corral:
        twin = _Corral.__new__(_Corral)
        twin.G, twin.squared_norms = self.G, self.squared_norms
        twin.points, twin.factor = list(self.points), self.factor
        return twin

    def add(self, j: int) -> bool:
        """Add point ``j``; ``False`` (and no change) if it is affinely dependent."""
        G, b = self.G, self.points[0]
        if self.squared_norms[j] < self.squared_norms[b]:
            return self._rebuild([*self.points, j])
        others = torch.tensor(self.points[1:], dtype=torch.long)
        c = G[j, j] - 2.0 * G[b, j] + G[b, b]
        cross = G[others, j] - G[others, b] - G[b, j] + G[b, b]
        row = torch.linalg.solve_triangular(self.factor, cross[:, None], upper=False).squeeze(1)
        pivot = c - row @ row
        tolerance = DEPENDENCE_TOL * len(self.points) * torch.finfo(torch.float64).eps * c
        if not pivot > tolerance:
            return False
        k = len(self.points) - 1
        factor = G.new_zeros(k + 1, k + 1)
        factor[:k, :k] = self.factor
        factor[k, :k] = row
        factor[k, k] = pivot.sqrt()
        self.factor = factor
        self.points.append(j)
        return True

    def keep(self, kept: list[bool]) -> bool:
        """Keep the points where ``kept`` is true (in the order of `points`)."""
        return self._rebuild([p for p, keep in zip(self.points, kept, strict=True) if keep])

    def _rebuild(self, points: list[int]) -> bool:
        G = self.G
        base = min(points, key=self.squared_norms.__getitem__)
        others = [p for p in points if p != base]
        index = torch.tensor(others, dtype=torch.long)
        cross = G[index, base]
        D = G[index][:, index] - cross[:, None] - cross[None, :] + G[base, base]
        factor, info = torch.linalg.cholesky_ex(D)
        tolerance = DEPENDENCE_TOL * len(points) * torch.finfo(torch.float64).eps * D.diagonal()
        if int(info) != 0 or bool((factor.diagonal() ** 2 <= tolerance).any()):
            return False
        self.points, self.factor = [base, *others], factor
        return True

    def affine_minimizer(self) -> Tensor:
        """Barycentric weights (in the order of `points`) of the nearest point to the origin
        of the affine hull."""
        G, b = self.G, self.points[0]
        others = torch.tensor(self.points[1:], dtype=torch.long)
        beta = torch.cholesky_solve((G[b, b] - G[others, b])[:, None], self.factor).squeeze(1)
        alpha = torch.cat([(1.0 - beta.sum()).reshape(1), beta])
        return alpha / alpha.sum()


def _improve(corral: _Corral, lam: Tensor, j: int) -> Tensor | None:
    """Wolfe's minor cycles: add point ``j`` to ``corral`` (whose points have the barycentric
    weights ``lam``) and move to the next major cycle's weights, dropping the points whose
    weight reaches zero; ``None`` if ``j`` is affinely dependent on the corral up to rounding."""
    weight = dict(zip(corral.points, lam.tolist(), strict=True))
    if not corral.add(j):
        return None
    weight[j] = 0.0
    while True:
        lam = torch.tensor([weight[p] for p in corral.points], dtype=torch.float64)
        alpha = corral.affine_minimizer()
        if bool((alpha > 0).all()):
            return alpha
        # Move from lam towards alpha until a weight reaches zero, and drop that point.
        step = lam - alpha
        ratios = torch.where(alpha <= 0, lam / torch.where(step > 0, step, 1.0), torch.inf)
        first_zero = int(ratios.argmin())
        lam = (lam + float(ratios[first_zero]) * (alpha - lam)).clamp(min=0.0)
        lam[first_zero] = 0.0
        kept = (lam > 0).tolist()
        pairs = zip(corral.points, lam.tolist(), kept, strict=True)
        survivors = {p: value for p, value, k in pairs if k}
        if not survivors or not corral.keep(kept):
            return None
        total = sum(survivors.values())
        weight = {p: value / total for p, value in survivors.items()}


def min_norm_frank_wolfe(G: Tensor, epsilon: float, max_iters: int) -> Tensor:
    """Frank-Wolfe for ``min_{α ∈ Δ} αᵀ G α`` (the MGDA sub-problem, arXiv 1810.04650, Alg. 2).

    Starting from uniform weights, each iteration moves towards the vertex ``e_t`` with the
    smallest ``(Gα)_t`` by the exact line-search step

        γ = clamp((αᵀGα − (Gα)_t) / (αᵀGα − 2 (Gα)_t + G_tt), 0, 1),

    and stops when ``γ < epsilon`` or after ``max_iters`` iterations. It approaches the
    minimiser without reaching it (see `min_norm_weights` for the exact solution).

    Args:
        G: Gramian ``J Jᵀ``, shape ``[m, m]``.
        epsilon: Step size under which the iteration stops.
        max_iters: Largest number of iterations.

    Returns:
        Weights on the simplex, shape ``[m]``.
    """
    m = G.shape[0]
    alpha = torch.full((m,), 1.0 / m, dtype=G.dtype, device=G.device)
    for _ in range(max_iters):
        G_alpha = G @ alpha
        t = torch.argmin(G_alpha)
        a = alpha @ G_alpha
        b = G_alpha[t]
        c = G[t, t]
        denominator = a - 2 * b + c
        if denominator <= 0:
            break
        gamma = ((a - b) / denominator).clamp(0.0, 1.0)
        alpha = (1 - gamma) * alpha
        alpha[t] += gamma
        if gamma < epsilon:
            break
    return alpha
