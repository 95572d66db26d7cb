from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Seeded, Weighting, solve_dtype
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2001.06782"


@register(paper=_PAPER, stateful=True, randomised=True)
class PCGradWeighting(Seeded, Weighting):
    r"""PCGrad's weights: $w = \mathbf 1^\top C$, where row $i$ of $C$ holds the
    coefficients of $g_i^{\mathrm{PC}} = \sum_k C_{ik} g_k$ (see `PCGrad`).

    Everything is computed from the Gramian: with $c_i$ the current row,
    $g_i^{\mathrm{PC}} \cdot g_j = (c_i G)_j$, and the projection of
    $g_i^{\mathrm{PC}}$ onto the normal plane of $g_j$ subtracts
    $(c_i G)_j / G_{jj}$ from $C_{ij}$.

    Args:
        seed: Seed of a generator owned by the weighting for the random orders (saved in
            ``state_dict()``); ``None`` draws from torch's global generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        matrix = matrix.to(solve_dtype(matrix.dtype))
        order = self._random.permutations_of_others(m, matrix)
        rows = torch.arange(m, device=matrix.device)
        coefficients = torch.eye(m, dtype=matrix.dtype, device=matrix.device)
        # products[i, j] = g_i^PC · g_j, kept up to date as coefficients change.
        products = matrix.clone()
        squared_norms = matrix.diagonal()
        rows_of_j = torch.empty_like(matrix)
        # Rows are independent: step k projects every g_i^PC against its k-th task at once.
        for k in range(m - 1):
            j = order[:, k]
            dot = products[rows, j]
            norm2 = squared_norms[j]
            conflicting = (dot < 0) & (norm2 > 0)
            step = torch.where(conflicting, -dot / torch.where(norm2 > 0, norm2, 1.0), 0.0)
            coefficients[rows, j] += step
            products.addcmul_(step[:, None], torch.index_select(matrix, 0, j, out=rows_of_j))
        return coefficients.sum(dim=0)


@register(paper=_PAPER, stateful=True, randomised=True)
class PCGrad(GramianWeightedAggregator):
    r"""Projecting conflicting gradients (Yu et al., *Gradient Surgery for Multi-Task
    Learning*, [arXiv 2001.06782](https://arxiv.org/abs/2001.06782), Algorithm 1).

    Each gradient is projected, in a random order of the other tasks, onto the normal plane of
    every gradient it conflicts with, and the projected gradients are summed:

    $$
    g_i^{\mathrm{PC}} \leftarrow g_i,\qquad
    g_i^{\mathrm{PC}} \leftarrow g_i^{\mathrm{PC}}
        - \frac{\min(g_i^{\mathrm{PC}} \cdot g_j,\, 0)}{\lVert g_j \rVert^2}\, g_j
    \ \text{ for } j \ne i \text{ in random order},\qquad
    \mathcal A(J) = \sum_{i=1}^m g_i^{\mathrm{PC}}.
    $$

    Each $g_i^{\mathrm{PC}}$ is a combination of the rows, so the method only needs the
    Gramian $G = J J^\top$ (it runs in gramian mode). A zero row is never projected against.

    For two objectives the update never conflicts with either; for $m > 2$ it can (a later
    projection may undo an earlier one). For a fixed order the update is linear under positive
    scaling of the rows, but a new order is drawn at each call.

    Args:
        seed: Seed of a generator owned by the aggregator for the random orders (saved in
            ``state_dict()``); ``None`` draws from torch's global generator.

    Examples:
        >>> import torch
        >>> from jdoptim import PCGrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> PCGrad()(J)
        tensor([0.5848, 3.8012, 3.8012])
        >>> PCGrad().weighting(J @ J.T)
        tensor([2.2222, 1.5789])
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(PCGradWeighting(seed))
