"""Euclidean projection onto the probability simplex."""

from __future__ import annotations

import torch
from torch import Tensor


def project_onto_simplex(y: Tensor) -> Tensor:
    r"""Euclidean projection of ``y`` onto the probability simplex $\{w \ge 0,\ \sum w = 1\}$.

    Sort-based and exact (Held, Wolfe and Crowder, 1974): with $v$ the entries of $y$ in
    decreasing order and $\rho$ the largest $k$ such that
    $v_k > (\sum_{i \le k} v_i - 1)/k$, the projection is
    $\max(y - \theta, 0)$, $\theta = (\sum_{i \le \rho} v_i - 1)/\rho$. No host
    synchronisation.
    """
    ordered = y.sort(descending=True).values
    shifted_sums = ordered.cumsum(dim=0) - 1
    counts = torch.arange(1, y.shape[0] + 1, dtype=y.dtype, device=y.device)
    rho = (ordered - shifted_sums / counts > 0).sum().clamp(min=1) - 1
    theta = shifted_sums[rho] / (rho + 1).to(y.dtype)
    return (y - theta).clamp(min=0)
