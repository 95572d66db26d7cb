from __future__ import annotations

from torch import Tensor

from jdoptim.registry import register
from jdoptim.scalarization._bases import Scalarizer


@register(name="scalarization.sum", linear_under_scaling=True, permutation_invariant=True)
class Sum(Scalarizer):
    r"""The sum of the losses: $s(L) = \sum_{i=1}^m L_i$.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import Sum
        >>> Sum()(torch.tensor([1.0, 2.0, 3.0]))
        tensor(6.)
    """

    def _scalarize(self, losses: Tensor) -> Tensor:
        return losses.sum()
