from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.registry import register


@register(paper="https://openreview.net/forum?id=IMeaOyxa0cW", permutation_invariant=True)
class IMTLGWeighting(Weighting):
    r"""IMTL-G weights $w = v / \mathbf 1^\top v$, $v = G^{+} d$,
    $d_i = \lVert g_i \rVert$ (see `IMTLG`)."""

    def __init__(self) -> None:
        super().__init__()

    def _weights(self, matrix: Tensor) -> Tensor:
        norms = matrix.diagonal().clamp(min=0).sqrt()
        v = torch.linalg.pinv(matrix, hermitian=True) @ norms
        total = v.sum()
        return torch.where(total.abs() < 1e-12, torch.zeros_like(v), v / total)


@register(paper="https://openreview.net/forum?id=IMeaOyxa0cW", permutation_invariant=True)
class IMTLG(GramianWeightedAggregator):
    r"""IMTL-G (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021): the
    combination $d = J^\top w$, $\mathbf 1^\top w = 1$, whose projections onto every
    unit gradient $g_i / \lVert g_i \rVert$ are equal. That gives
    $G w \propto (\lVert g_i \rVert)_i$, hence

    $$
    w = \frac{G^{+} d}{\mathbf 1^\top G^{+} d},\qquad d_i = \lVert g_i \rVert,
    $$

    with the pseudo-inverse for singular Gramians, and $w = 0$ when
    $\mathbf 1^\top G^{+} d$ vanishes. Paper: ICLR 2021,
    [openreview.net/forum?id=IMeaOyxa0cW](https://openreview.net/forum?id=IMeaOyxa0cW).

    Examples:
        >>> import torch
        >>> from jdoptim import IMTLG
        >>> IMTLG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64))
        tensor([0.0767, 1.0000, 1.0000], dtype=torch.float64)
    """

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
