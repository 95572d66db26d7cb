from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.linalg._constraints import correlation_spectrum, tolerances
from jdoptim.registry import register

_PAPER = "https://openreview.net/forum?id=IMeaOyxa0cW"


def imtlg_direction(G: Tensor, dtype: torch.dtype) -> Tensor:
    r"""$v = G^{+} d$, $d_i = \sqrt{G_{ii}}$, in float64, exact for rows of any scales.

    The numerical rank is decided on the correlation matrix $C = D^{-1} G D^{-1} \approx
    V \Lambda V^\top$ (`correlation_spectrum`, whose cut-off is relative to the rounding level
    of ``dtype`` and independent of the rows' norms), so that a row $10^{18}$ times smaller than
    the others still counts. With $D V = Q R$ (rows sorted by decreasing norm, which keeps
    Householder QR accurate on graded rows), $G \approx Q R \Lambda R^\top Q^\top$ and
    $v = Q R^{-\top} \Lambda^{-1} R^{-1} Q^\top d$: triangular solves, no product of
    ill-conditioned factors.
    """
    norms, eigenvalues, eigenvectors = correlation_spectrum(G, dtype)
    order = norms.argsort(descending=True)
    q, r = torch.linalg.qr((norms[:, None] * eigenvectors)[order])
    coordinates = torch.linalg.solve_triangular(r, (q.T @ norms[order])[:, None], upper=True)
    coordinates = coordinates / eigenvalues[:, None]
    coordinates = torch.linalg.solve_triangular(r.T, coordinates, upper=False)
    return torch.empty_like(norms).index_put_((order,), (q @ coordinates).squeeze(1))


@register(paper=_PAPER, permutation_invariant=True)
class IMTLGWeighting(Weighting):
    r"""IMTL-G weights $w = v / \mathbf 1^\top v$, $v = G^{+} d$,
    $d_i = \lVert g_i \rVert$ (see `IMTLG`)."""

    def __init__(self) -> None:
        super().__init__()

    def _weights(self, matrix: Tensor) -> Tensor:
        G = matrix.to(torch.float64)
        v = imtlg_direction(G, matrix.dtype)
        total = v.sum()
        vanishes = total.abs() <= G.shape[0] * tolerances(matrix.dtype).dependence * v.abs().sum()
        return torch.where(vanishes, 0.0, v / torch.where(vanishes, 1.0, total))


@register(paper=_PAPER, permutation_invariant=True)
class IMTLG(GramianWeightedAggregator):
    r"""IMTL-G (Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021,
    [openreview.net/forum?id=IMeaOyxa0cW](https://openreview.net/forum?id=IMeaOyxa0cW)): the
    combination $d = J^\top w$, $\mathbf 1^\top w = 1$, whose projections onto every
    unit gradient $g_i / \lVert g_i \rVert$ are equal. That gives
    $G w \propto (\lVert g_i \rVert)_i$, hence

    $$
    w = \frac{G^{+} d}{\mathbf 1^\top G^{+} d},\qquad d_i = \lVert g_i \rVert,
    $$

    with the pseudo-inverse for linearly dependent rows (the generalisation of
    [arXiv 2406.16232](https://arxiv.org/abs/2406.16232), as in TorchJD), and $w = 0$ when
    $\mathbf 1^\top G^{+} d$ vanishes.

    Whether rows are linearly dependent is decided on their directions (the correlation matrix
    $D^{-1} G D^{-1}$), relative to the rounding level of the Gramian's dtype, and $G^{+} d$ is
    computed in float64 without forming ill-conditioned products (`imtlg_direction`), so the
    weights do not depend on the scale of the rows: a row $10^{18}$ times smaller than the others
    gets the same projection as they do, as the method intends. TorchJD's ``pinv(G)``, whose
    cut-off is relative to the largest eigenvalue of $G$, treats such a row as dependent, and its
    absolute test $|\mathbf 1^\top v| < 10^{-12}$ zeroes the weights of every Gramian with row
    norms above about $10^{13}$; here the test is relative to the terms of the sum. Half-precision
    Gramians are solved in float64 too.

    Examples:
        >>> import torch
        >>> from jdoptim import IMTLG
        >>> IMTLG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64))
        tensor([0.0767, 1.0000, 1.0000], dtype=torch.float64)
    """

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
