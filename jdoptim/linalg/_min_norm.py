"""Minimum-norm point of the convex hull of a Jacobian's rows, from its Gramian."""

from __future__ import annotations

import torch
from torch import Tensor


def min_norm_frank_wolfe(G: Tensor, epsilon: float, max_iters: int) -> Tensor:
    """Frank-Wolfe for ``min_{α ∈ Δ} αᵀ G α`` (the MGDA sub-problem, arXiv 1810.04650, Alg. 2).

    Starting from uniform weights, each iteration moves towards the vertex ``e_t`` with the
    smallest ``(Gα)_t`` by the exact line-search step

        γ = clamp((αᵀGα − (Gα)_t) / (αᵀGα − 2 (Gα)_t + G_tt), 0, 1),

    and stops when ``γ < epsilon`` or after ``max_iters`` iterations.

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
