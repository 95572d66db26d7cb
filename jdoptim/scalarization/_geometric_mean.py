from __future__ import annotations

from torch import Tensor

from jdoptim.registry import register
from jdoptim.scalarization._bases import Scalarizer


@register(
    name="scalarization.geometricmean",
    paper="https://arxiv.org/abs/1904.08492",
    permutation_invariant=True,
)
class GeometricMean(Scalarizer):
    r"""The geometric mean of the losses, $s(L) = \left(\prod_{i=1}^m L_i\right)^{1/m}
    = \exp\left(\frac1m \sum_i \log L_i\right)$ (the Geometric Loss Strategy of Chennupati et
    al., *MultiNet++*, [arXiv 1904.08492](https://arxiv.org/abs/1904.08492)).

    Its gradient weights each objective's gradient by $\partial s / \partial L_i = s / (m L_i)$,
    so an objective with a small loss gets a large weight. The losses must be non-negative; a
    zero loss makes $s = 0$, where the derivative with respect to that loss is unbounded (the
    gradient is then not finite).

    Raises:
        ValueError: If a loss is negative.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import GeometricMean
        >>> GeometricMean()(torch.tensor([1.0, 2.0, 4.0]))
        tensor(2.)
    """

    def _scalarize(self, losses: Tensor) -> Tensor:
        if (losses < 0).any():
            raise ValueError(
                f"GeometricMean needs non-negative losses, got {losses.detach().cpu().tolist()}."
            )
        return losses.log().mean().exp()
