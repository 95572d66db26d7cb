from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_weights,
    one_of,
    optional,
    preference_weights,
)
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2305.19000"
ScaleMode = Literal["min", "median", "rmse"]
SCALE_MODES: tuple[str, ...] = ("min", "median", "rmse")


@register(paper=_PAPER, permutation_invariant=True)
class AlignedMTLWeighting(Weighting):
    r"""Aligned-MTL's weights $B u$, with $B$ the balance transformation of the
    Gramian (see `AlignedMTL`).

    Args:
        pref_vector: Preference weights $u$ (one per objective); uniform $1/m$ when
            ``None``.
        scale_mode: Which eigenvalue $\lambda_\star$ of $G$ sets the scale: ``"min"``
            (the smallest non-zero one, as in the paper), ``"median"`` (the lower median of the
            non-zero ones) or ``"rmse"`` (their mean, as in the authors' code).
    """

    pref_vector = Argument(optional(check_weights))
    scale_mode = Argument(one_of(SCALE_MODES))

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        scale_mode: ScaleMode = "min",
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        G = matrix.to(torch.float64)
        u = preference_weights(self.pref_vector, m, G, type(self).__name__)
        # B is unchanged by scaling G, and G / max G_ii has entries in [-1, 1]: its decomposition
        # in float64 cannot overflow or fail.
        largest = G.diagonal().max()
        G = G / torch.where(largest > 0, largest, 1.0)
        eigenvalues, vectors = torch.linalg.eigh((G + G.T) / 2)  # ascending
        kept = eigenvalues > eigenvalues[-1] * m * torch.finfo(matrix.dtype).eps
        rank = kept.sum()
        safe = torch.where(kept, eigenvalues, 1.0)
        inverse_roots = torch.where(kept, safe.rsqrt(), 0.0)
        if self.scale_mode == "min":
            scale = torch.where(kept, eigenvalues, torch.inf).min()
        elif self.scale_mode == "median":
            # The kept eigenvalues are the last `rank`; their lower median comes first of two.
            scale = eigenvalues[(m - rank + (rank - 1) // 2).clamp(min=0, max=m - 1)]
        else:
            scale = torch.where(kept, eigenvalues, 0.0).sum() / rank.clamp(min=1)
        balanced = scale.clamp(min=0).sqrt() * (vectors * inverse_roots) @ (vectors.T @ u)
        return torch.where(rank > 0, balanced, u)


@register(paper=_PAPER, permutation_invariant=True)
class AlignedMTL(GramianWeightedAggregator):
    r"""Aligned-MTL (Senushkin et al., *Independent Component Alignment for Multi-Task
    Learning*, CVPR 2023, [arXiv 2305.19000](https://arxiv.org/abs/2305.19000),
    Algorithm 1).

    The rows are replaced by orthogonal components of equal norm before being combined with
    the preferences $u$: with the eigendecomposition $G = J J^\top = V \Lambda V^\top$
    restricted to its $r$ non-zero eigenvalues,

    $$
    B = \sqrt{\lambda_\star}\; V \Lambda^{-1/2} V^\top,\qquad
    \mathcal A(J) = J^\top B u
        = \sqrt{\lambda_\star}\; Q P^\top u \quad (J = P\, \Lambda^{1/2} Q^\top),
    $$

    so that the aligned gradients $J^\top B$ have orthogonal directions and singular values
    all equal to $\sqrt{\lambda_\star}$, where $\lambda_\star$ is the smallest non-zero
    eigenvalue (``"min"``), their lower median (``"median"``) or their mean (``"rmse"``).
    Eigenvalues up to $m\,\varepsilon\,\lambda_{\max}$ count as zero, with $\varepsilon$ the
    machine epsilon of the Gramian's dtype, as in TorchJD 0.18: the entries of a Gramian computed
    in that dtype are only known to that relative precision, so smaller eigenvalues are rounding
    noise, which $\Lambda^{-1/2}$ would amplify. (Earlier TorchJD versions took the epsilon of
    torch's default dtype, float32 unless changed.) A zero Gramian gives the weights $u$. The
    eigendecomposition is computed in float64 on $G / \max_i G_{ii}$ (which leaves $B$
    unchanged), so it cannot overflow or fail on a finite Gramian, half precision included.

    The update is invariant to the order of the objectives (with uniform preferences). It is
    not linear under scaling of the rows, and it can conflict with some of them when $m > 2$:
    $g_i^\top \mathcal A(J) = \sqrt{\lambda_\star}\,(G^{1/2} u)_i$, and the square root of
    a Gramian can have negative entries. The method only needs the Gramian.

    Args:
        pref_vector: Preference weights $u$ (one per objective); uniform $1/m$ when
            ``None``.
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``: which eigenvalue sets the scale.

    Examples:
        >>> import torch
        >>> from jdoptim import AlignedMTL
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> AlignedMTL()(J)
        tensor([0.2133, 0.9673, 0.9673])
        >>> AlignedMTL().weighting(J @ J.T)
        tensor([0.5591, 0.4083])
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        scale_mode: ScaleMode = "min",
    ) -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode))
