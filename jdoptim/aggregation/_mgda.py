from __future__ import annotations

from typing import Literal

from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_non_negative,
    check_positive_int,
    one_of,
    solve_dtype,
)
from jdoptim.linalg import min_norm_frank_wolfe, min_norm_weights
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/1810.04650"
Solver = Literal["active_set", "frank_wolfe"]
SOLVERS: tuple[str, ...] = ("active_set", "frank_wolfe")


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True)
class MGDAWeighting(Weighting):
    r"""Weights of the minimum-norm point of the convex hull of the rows:
    $w = \arg\min_{w \in \Delta_m} w^\top G w$ (see `MGDA`).

    Its arguments are those of `MGDA`.
    """

    solver = Argument(one_of(SOLVERS))
    epsilon = Argument(check_non_negative)
    max_iters = Argument(check_positive_int)

    def __init__(
        self, solver: Solver = "active_set", epsilon: float = 0.001, max_iters: int = 100
    ) -> None:
        super().__init__()
        self.solver = solver
        self.epsilon = epsilon
        self.max_iters = max_iters

    def _weights(self, matrix: Tensor) -> Tensor:
        if self.solver == "frank_wolfe":
            G = matrix.to(solve_dtype(matrix.dtype))
            return min_norm_frank_wolfe(G, self.epsilon, self.max_iters)
        # Wolfe's algorithm branches on values at every step: one transfer to the CPU costs less
        # than a host synchronisation per step.
        return min_norm_weights(matrix, matrix.dtype).to(device=matrix.device, dtype=matrix.dtype)


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True)
class MGDA(GramianWeightedAggregator):
    r"""Multiple-gradient descent: the minimum-norm point of the convex hull of the rows,

    $$
    \mathcal A(J) = J^\top w^\star,\qquad
    w^\star = \arg\min_{w \in \Delta_m} \lVert J^\top w \rVert^2 = w^\top G w,
    $$

    after Désidéri's MGDA, as in Sener & Koltun, *Multi-Task Learning as Multi-Objective
    Optimization* ([arXiv 1810.04650](https://arxiv.org/abs/1810.04650)). By the optimality
    conditions, $g_i^\top \mathcal A(J) \ge \lVert \mathcal A(J) \rVert^2$ for every row: the
    update conflicts with no objective, and it is $0$ exactly when $0$ is in the convex hull of
    the rows.

    The default solver, ``"active_set"``, finds $w^\star$ exactly (up to rounding) from the
    Gramian, by Wolfe's nearest-point algorithm in float64 (`jdoptim.linalg.min_norm_weights`),
    also on zero, duplicated, tiny and linearly dependent rows. ``"frank_wolfe"`` runs the
    paper's Frank-Wolfe iteration (Algorithm 2), as TorchJD does, on the Gramian's device; it
    stops once its step is below ``epsilon`` or after ``max_iters`` steps, which can leave it far
    from $w^\star$ (then the update can conflict with some rows). ``epsilon`` and ``max_iters``
    are used by ``"frank_wolfe"`` only; ``MGDA(solver="frank_wolfe")`` gives TorchJD's numbers.

    Args:
        solver: ``"active_set"`` (exact) or ``"frank_wolfe"`` (TorchJD's iteration).
        epsilon: Frank-Wolfe stops once its step size falls below this value.
        max_iters: Largest number of Frank-Wolfe iterations.

    Examples:
        >>> import torch
        >>> from jdoptim import MGDA
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
        >>> MGDA()(J)  # (0.8, 0.4): its inner product with rows 1 and 2 is its squared norm
        tensor([0.8000, 0.4000], dtype=torch.float64)
        >>> MGDA().weighting(J @ J.T)
        tensor([0.8000, 0.2000, 0.0000], dtype=torch.float64)
    """

    def __init__(
        self, solver: Solver = "active_set", epsilon: float = 0.001, max_iters: int = 100
    ) -> None:
        super().__init__(MGDAWeighting(solver, epsilon, max_iters))
