from __future__ import annotations

from torch import Tensor

from jdoptim.registry import register
from jdoptim.scalarization._bases import Scalarizer


@register(name="scalarization.mean", linear_under_scaling=True, permutation_invariant=True)
class Mean(Scalarizer):
    r"""The average of the losses: $s(L) = \frac1m \sum_{i=1}^m L_i$.

    Its gradient is the average of the objectives' gradients, the same update as the
    `jdoptim.Mean` aggregator, for the price of one ordinary backward pass.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import Mean
        >>> Mean()(torch.tensor([1.0, 2.0, 3.0]))
        tensor(2.)
    """

    def _scalarize(self, losses: Tensor) -> Tensor:
        return losses.mean()
