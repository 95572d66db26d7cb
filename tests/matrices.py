"""A library of seeded Jacobians that every aggregator is tested on.

Each entry builds a float64 matrix; tests cast it to the dtype under test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _normal(m: int, n: int, seed: int) -> Tensor:
    return torch.randn(m, n, generator=_gen(seed), dtype=torch.float64)


def _low_rank(m: int, n: int, rank: int, seed: int) -> Tensor:
    return _normal(m, rank, seed) @ _normal(rank, n, seed + 1)


def _strongly_stationary() -> Tensor:
    # 0 = g1 + g2 + g3 + g4 with strictly positive weights.
    g, h = _normal(2, 6, 11)
    return torch.stack([g, -g, h, -h])


def _weakly_stationary() -> Tensor:
    # 0 = g1 + g2, but only with a zero weight on g3.
    g, h = _normal(2, 6, 12)
    return torch.stack([g, -g, h])


def _duplicated_rows() -> Tensor:
    J = _normal(3, 7, 13)
    return torch.cat([J, J[:2]])


def _zero_row() -> Tensor:
    J = _normal(4, 7, 14)
    J[2] = 0.0
    return J


def _tiny_row() -> Tensor:
    # A well-classified sample: its cross-entropy gradient is ~1e-18 times the others'.
    J = _normal(16, 50, 20)
    J[0] *= 1e-18
    return J


def _spread_norms() -> Tensor:
    scales = torch.logspace(-3, 3, 5, dtype=torch.float64)
    return _normal(5, 8, 15) * scales[:, None]


MATRICES: dict[str, Callable[[], Tensor]] = {
    "normal_5x8": lambda: _normal(5, 8, 0),
    "normal_2x3": lambda: _normal(2, 3, 1),
    "normal_12x6": lambda: _normal(12, 6, 2),
    "rank2_6x9": lambda: _low_rank(6, 9, 2, 3),
    "rank1_4x5": lambda: _low_rank(4, 5, 1, 5),
    "single_row": lambda: _normal(1, 7, 7),
    "zero": lambda: torch.zeros(4, 6, dtype=torch.float64),
    "duplicated_rows": _duplicated_rows,
    "zero_row": _zero_row,
    "strongly_stationary": _strongly_stationary,
    "weakly_stationary": _weakly_stationary,
    "spread_norms": _spread_norms,
    "tiny_row": _tiny_row,
    "scaled_1e-10": lambda: _normal(5, 8, 16) * 1e-10,
    "scaled_1e15": lambda: _normal(5, 8, 17) * 1e15,
}
"""Name → builder of a float64 Jacobian."""

STRONGLY_STATIONARY = {"zero", "strongly_stationary"}
"""Matrices with 0 as a strictly positive combination of the rows."""


def losses_for(m: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> Tensor:
    """Positive values of ``m`` losses, for the methods that need them (one per row)."""
    generator = _gen(1000 + seed)
    return (torch.rand(m, generator=generator, dtype=torch.float64) + 0.5).to(dtype)


def call(method: torch.nn.Module, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
    """Call an aggregator or weighting on ``matrix``, with the values of the losses when it
    needs them (``losses``, or `losses_for` the rows)."""
    if not getattr(method, "needs_losses", False):
        return method(matrix)
    if losses is None:
        losses = losses_for(matrix.shape[0], matrix.dtype)
    return method(matrix, losses=losses)
