from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Aggregator,
    Argument,
    all_finite,
    check_length,
    check_weights,
    optional,
    solve_dtype,
)
from jdoptim.registry import register


@register(
    paper="https://arxiv.org/abs/2408.11104", linear_under_scaling=True, permutation_invariant=True
)
class ConFIG(Aggregator):
    r"""Conflict-free inverse gradients (Liu et al., *ConFIG: Towards Conflict-free Training of
    Physics Informed Neural Networks*, ICLR 2025,
    [arXiv 2408.11104](https://arxiv.org/abs/2408.11104), Equation 2).

    The direction is the one whose inner products with the unit rows are the preferences $w$
    (in the least-squares, minimum-norm sense of the pseudo-inverse), and its length is the sum
    of the rows' projections onto it:

    $$
    u = \frac{x}{\lVert x \rVert},\quad x = U^{+} w,\quad
    U = \begin{bmatrix} g_1 / \lVert g_1 \rVert \\ \vdots \\ g_m / \lVert g_m \rVert
        \end{bmatrix},\qquad
    \mathcal A(J) = \Bigl(\sum_{i=1}^m g_i^\top u\Bigr)\, u,
    $$

    with zero rows of $J$ kept as zero rows of $U$. Singular values of $U$ below
    $\sqrt{mn}\,\varepsilon\,\sigma_{\max}$ ($\varepsilon$ the dtype's machine
    epsilon) are treated as zero: torch's default cut-off $\max(m, n)\,\varepsilon$, which
    TorchJD uses, would discard genuine directions of wide float32 Jacobians. When the part of
    $w$ that $U x$ reproduces is at that rounding level (for instance for the rows
    $g, -g, h, -h$ with equal preferences), no direction is defined and
    $\mathcal A(J) = 0$. The direction depends only on the directions of the rows, so the update is
    linear under positive scaling of the rows.

    When the rows are linearly independent, $U x = w$ holds exactly, so every row gets a
    positive inner product $\lVert g_i \rVert w_i / \lVert x \rVert$ with $u$ (for positive
    $w$) and the update conflicts with none of them. When they are dependent (more objectives
    than the rank of $J$), $U x = w$ is only solved in the least-squares sense and the update
    can conflict with some rows, so the method is not declared non-conflicting. It needs $J$
    itself; the pseudo-inverse of $U$ comes from the SVD of the triangular factor of
    $U^\top = Q R$ (for $m \le n$).

    Args:
        pref_vector: The preferences $w$ (one per objective); all ones when ``None``, as in
            the paper and TorchJD.

    Examples:
        >>> import torch
        >>> from jdoptim import ConFIG
        >>> ConFIG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.1588, 2.0706, 2.0706])
    """

    pref_vector = Argument(optional(check_weights))

    def __init__(self, pref_vector: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        self.pref_vector = pref_vector

    def _aggregate(self, matrix: Tensor) -> Tensor:
        m, n = matrix.shape
        if not bool(all_finite(matrix)):
            return matrix.new_full((n,), torch.nan)
        J = matrix.to(solve_dtype(matrix.dtype))  # half precision is solved in float32
        if self.pref_vector is None:
            weights = J.new_ones(m)
        else:
            check_length(self.pref_vector, m, type(self).__name__, "preferences")
            weights = self.pref_vector.to(dtype=J.dtype, device=J.device)
        # Accumulated in float64, so that the squares of entries near 1e±30 neither overflow nor
        # underflow.
        norms = torch.linalg.vector_norm(J, dim=1, keepdim=True, dtype=torch.float64).to(J.dtype)
        units = J / torch.where(norms > 0, norms, 1.0)
        tolerance = torch.finfo(J.dtype).eps * math.sqrt(m * n)
        if m <= n:
            # U = Rᵀ Qᵀ, so U⁺ w = Q (Rᵀ)⁺ w: faster than an SVD of the wide U, and more
            # accurate in float32.
            q, r = torch.linalg.qr(units.T)
            coordinates = torch.linalg.pinv(r.T, rtol=tolerance) @ weights
            direction = q @ coordinates
            fitted = (r.T @ coordinates).norm()
        else:
            direction = torch.linalg.pinv(units, rtol=tolerance) @ weights
            fitted = (units @ direction).norm()
        length = direction.norm()
        defined = (fitted > tolerance * weights.norm()) & (length > 0)
        unit = torch.where(defined, direction / torch.where(length > 0, length, 1.0), 0.0)
        return ((J @ unit).sum() * unit).to(matrix.dtype)
