from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.registry import register


@register(linear_under_scaling=True, permutation_invariant=True)
class SumWeighting(Weighting):
    r"""Unit weights $w_i = 1$."""

    uses_matrix = False

    def __init__(self) -> None:
        super().__init__()

    def _weights(self, matrix: Tensor) -> Tensor:
        return matrix.new_ones(matrix.shape[0])


@register(linear_under_scaling=True, permutation_invariant=True)
class Sum(GramianWeightedAggregator):
    r"""The sum of the rows: $\mathcal A(J) = \sum_i g_i$.

    Examples:
        >>> import torch
        >>> from jdoptim import Sum
        >>> Sum()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([2., 2., 2.])
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())
