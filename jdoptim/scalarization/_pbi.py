from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from jdoptim.aggregation._bases import Argument, check_non_negative, check_weights, optional
from jdoptim.registry import register
from jdoptim.scalarization._bases import (
    Scalarizer,
    as_preference_tensor,
    check_count,
    stable_norm,
)


def _example(m: int) -> dict[str, float | list[float]]:
    return {"theta": 5.0, "weights": [float(i + 1) for i in range(m)]}


@register(
    name="scalarization.pbi",
    paper="https://ieeexplore.ieee.org/document/4358754",
    example_args=_example,
)
class PBI(Scalarizer):
    r"""Penalty-based Boundary Intersection (Zhang and Li, *MOEA/D: A Multiobjective
    Evolutionary Algorithm Based on Decomposition*, IEEE TEVC 2007,
    [doi 10.1109/TEVC.2007.892759](https://ieeexplore.ieee.org/document/4358754)), in its
    minimisation form. With the unit preference direction $\hat w = w / \lVert w \rVert$:

    $$ d_1 = (L - z^*)^\top \hat w, \qquad d_2 = \lVert L - z^* - d_1 \hat w \rVert, \qquad
    s(L) = d_1 + \theta\, d_2. $$

    $d_1$ is the progress along the ray from the reference point $z^*$ in direction $w$ and
    $d_2$ the distance to that ray. On the ray ($d_2 = 0$) the norm has a kink; the gradient
    used there is the zero subgradient of $d_2$ (the value is exact everywhere).

    Args:
        theta: The penalty $\theta \ge 0$ on the distance to the ray; $0$ keeps only $d_1$.
            The paper uses $\theta = 5$ and notes that no value is best everywhere, so it has
            no default.
        weights: The preference direction $w$ (non-negative, one entry per objective).
        reference: The reference (ideal) point $z^*$, a lower bound of the losses. ``None``
            means the origin.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import PBI
        >>> losses = torch.tensor([3.0, 1.0], dtype=torch.float64)
        >>> PBI(theta=5.0, weights=[1.0, 1.0])(losses)  # 2√2 + 5√2
        tensor(9.8995, dtype=torch.float64)
    """

    theta = Argument(check_non_negative)
    weights = Argument(as_preference_tensor)
    reference = Argument(optional(check_weights))

    def __init__(
        self,
        theta: float,
        weights: Tensor | Sequence[float],
        reference: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.theta = theta
        self.weights = weights
        self.reference = reference

    def _scalarize(self, losses: Tensor) -> Tensor:
        owner = type(self).__name__
        check_count(self.weights.shape[0], losses, owner, "weights")
        shifted = losses
        if self.reference is not None:
            check_count(self.reference.shape[0], losses, owner, "reference entries")
            shifted = losses - self.reference.to(dtype=losses.dtype, device=losses.device)
        direction = self.weights.to(dtype=losses.dtype, device=losses.device)
        direction = direction / stable_norm(direction)
        d1 = shifted @ direction
        d2 = stable_norm(shifted - d1 * direction)
        return d1 + self.theta * d2
