from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_length,
    check_weights,
)
from jdoptim.registry import register


def _example(m: int) -> dict[str, list[float]]:
    return {"weights": [float(i + 1) for i in range(m)]}


@register(linear_under_scaling=True, example_args=_example)
class ConstantWeighting(Weighting):
    r"""Fixed weights $w$, whatever the matrix.

    Args:
        weights: One finite weight per objective.
    """

    uses_matrix = False
    weights = Argument(check_weights)

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__()
        self.weights = weights

    def _weights(self, matrix: Tensor) -> Tensor:
        check_length(self.weights, matrix.shape[0], type(self).__name__, "weights")
        return self.weights.to(dtype=matrix.dtype, device=matrix.device)


@register(linear_under_scaling=True, example_args=_example)
class Constant(GramianWeightedAggregator):
    r"""A fixed linear combination of the rows: $\mathcal A(J) = J^\top w$.

    Args:
        weights: One finite weight per objective.

    Examples:
        >>> import torch
        >>> from jdoptim import Constant
        >>> Constant([1.0, 2.0])(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([8., 3., 3.])
    """

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__(ConstantWeighting(weights))
