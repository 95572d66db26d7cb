from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator
from jdoptim.aggregation._upgrad import DualConeWeighting
from jdoptim.linalg import project_weights
from jdoptim.linalg._dual_cone import Solver
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2406.16232"


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True)
class DualProjWeighting(DualConeWeighting):
    r"""DualProj's weights: $w = \arg\min_{v \ge u} v^\top G v$ (see `DualProj`).

    Its arguments are those of `DualProj`.
    """

    def _weights(self, matrix: Tensor) -> Tensor:
        u, G = self._prepared(matrix)
        return project_weights(u, G, self.solver)


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True)
class DualProj(GramianWeightedAggregator):
    r"""Projection of the (preference-weighted) mean gradient onto the dual cone of the rows
    ([arXiv 2406.16232](https://arxiv.org/abs/2406.16232), after the projection used by
    GEM, [arXiv 1706.08840](https://arxiv.org/abs/1706.08840)):

    $$
    \mathcal A(J) = \pi_J(J^\top u) = J^\top v,\qquad
    v = \arg\min_{v \ge u} v^\top J J^\top v.
    $$

    Args:
        pref_vector: Preference weights $u$ (one per objective); uniform $1/m$
            when ``None``.
        norm_eps: The Gramian is divided by its trace; up to this trace it is treated as zero.
            TorchJD uses 1e-4, which turns small gradients (trace < 1e-4) into their mean;
            the default 0 keeps the projection exact at every scale.
        reg_eps: ``reg_eps·I`` is added to the normalised Gramian before solving. TorchJD
            uses 1e-4, which quadprog needs for singular Gramians but which lets the update
            conflict slightly with objectives whose gradients are small; the default active-set
            solver needs none, and with 0 the update is exactly non-conflicting.
        solver: Dual-cone projection solver: ``"active_set"`` (the default: all projections
            at once, in torch on the Gramian's device, each certified in float64, with an exact
            method for rank-deficient Gramians and whatever the iterations leave; it never
            raises, and half-precision Gramians are solved in float32 or better) or
            ``"quadprog"`` (the reference, one quadratic program at a time on the CPU; it needs
            a positive-definite Gramian).

    Examples:
        >>> import torch
        >>> from jdoptim import DualProj
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> DualProj()(J)  # exactly J^T (11/18, 1/2)
        tensor([0.5556, 1.1111, 1.1111], dtype=torch.float64)
        >>> DualProj(norm_eps=1e-4, reg_eps=1e-4)(J)  # TorchJD's defaults
        tensor([0.5563, 1.1109, 1.1109], dtype=torch.float64)
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 0.0,
        solver: Solver = "active_set",
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, norm_eps, reg_eps, solver))
