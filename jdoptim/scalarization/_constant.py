from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from jdoptim.aggregation._bases import Argument, check_weights
from jdoptim.registry import register
from jdoptim.scalarization._bases import Scalarizer, check_count


def _example(m: int) -> dict[str, list[float]]:
    return {"weights": [float(i + 1) for i in range(m)]}


@register(name="scalarization.constant", linear_under_scaling=True, example_args=_example)
class Constant(Scalarizer):
    r"""A fixed linear combination of the losses: $s(L) = \sum_{i=1}^m w_i L_i$.

    Args:
        weights: One finite weight $w_i$ per objective.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import Constant
        >>> Constant([1.0, 2.0, 0.5])(torch.tensor([1.0, 2.0, 3.0]))
        tensor(6.5000)
    """

    weights = Argument(check_weights)

    def __init__(self, weights: Tensor | Sequence[float]) -> None:
        super().__init__()
        self.weights = weights

    def _scalarize(self, losses: Tensor) -> Tensor:
        check_count(self.weights.shape[0], losses, type(self).__name__, "weights")
        return self.weights.to(dtype=losses.dtype, device=losses.device) @ losses
