"""Small operations on Gramians shared by the weightings."""

from __future__ import annotations

import torch
from torch import Tensor


def normalize_gramian(G: Tensor, eps: float) -> Tensor:
    """Divide ``G`` by its trace (the squared Frobenius norm of the Jacobian).

    A Gramian whose trace is not above ``eps`` is treated as zero, as in the reference
    implementation of UPGrad (arXiv 2406.16232). The division happens on ``G``'s device, with no
    synchronisation with the host.
    """
    trace = G.diagonal().sum()
    return G * torch.where(trace > eps, trace.reciprocal(), torch.zeros_like(trace))


def regularize_gramian(G: Tensor, eps: float) -> Tensor:
    """Return ``G + eps·I``."""
    return G + eps * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
