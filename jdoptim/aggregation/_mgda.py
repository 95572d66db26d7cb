from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._bases import (
    GramianWeightedAggregator,
    Weighting,
    check_non_negative,
    check_positive_int,
)
from jdoptim.linalg import min_norm_frank_wolfe
from jdoptim.registry import register


@register(
    paper="https://arxiv.org/abs/1810.04650", non_conflicting=True, permutation_invariant=True
)
class MGDAWeighting(Weighting):
    r"""Weights of the minimum-norm point of the convex hull of the rows:
    $w = \arg\min_{w \in \Delta_m} w^\top G w$ (Frank-Wolfe, see `MGDA`).

    Args:
        epsilon: Frank-Wolfe stops once its step size falls below this value.
        max_iters: Largest number of Frank-Wolfe iterations.
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__()
        self.epsilon = check_non_negative(epsilon, "epsilon")
        self.max_iters = check_positive_int(max_iters, "max_iters")

    def _weights(self, matrix: Tensor) -> Tensor:
        return min_norm_frank_wolfe(matrix, self.epsilon, self.max_iters)


@register(
    paper="https://arxiv.org/abs/1810.04650", non_conflicting=True, permutation_invariant=True
)
class MGDA(GramianWeightedAggregator):
    r"""Multiple-gradient descent: the minimum-norm point of the convex hull of the rows,

    $$
    \mathcal A(J) = J^\top w^\star,\qquad
    w^\star = \arg\min_{w \in \Delta_m} \lVert J^\top w \rVert^2,
    $$

    solved by Frank-Wolfe on the Gramian as in Sener & Koltun, *Multi-Task Learning as
    Multi-Objective Optimization* ([arXiv 1810.04650](https://arxiv.org/abs/1810.04650)),
    after Désidéri's MGDA.

    Args:
        epsilon: Frank-Wolfe stops once its step size falls below this value.
        max_iters: Largest number of Frank-Wolfe iterations.

    Examples:
        >>> import torch
        >>> from jdoptim import MGDA
        >>> MGDA()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0., 1., 1.])
    """

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100) -> None:
        super().__init__(MGDAWeighting(epsilon, max_iters))
