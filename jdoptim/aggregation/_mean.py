from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.registry import register


@register(linear_under_scaling=True, permutation_invariant=True)
class MeanWeighting(Weighting):
    r"""Uniform weights $w_i = 1/m$."""

    uses_matrix = False

    def __init__(self) -> None:
        super().__init__()

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        return matrix.new_full((m,), 1.0 / m)


@register(linear_under_scaling=True, permutation_invariant=True)
class Mean(GramianWeightedAggregator):
    r"""The average of the rows: $\mathcal A(J) = \frac1m \sum_i g_i$.

    Jacobian descent with ``Mean`` is gradient descent on the mean of the losses.

    Examples:
        >>> import torch
        >>> from jdoptim import Mean
        >>> Mean()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())
