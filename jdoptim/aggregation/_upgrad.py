from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_non_negative,
    check_weights,
    one_of,
    optional,
    preference_weights,
)
from jdoptim.linalg import (
    SOLVERS,
    normalize_gramian,
    project_weights,
    regularize_gramian,
)
from jdoptim.linalg._dual_cone import Solver
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2406.16232"


class DualConeWeighting(Weighting):
    """Shared arguments of the weightings that project onto the dual cone of the rows."""

    pref_vector = Argument(optional(check_weights))
    norm_eps = Argument(check_non_negative)
    reg_eps = Argument(check_non_negative)
    solver = Argument(one_of(SOLVERS))

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 0.0,
        solver: Solver = "active_set",
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.solver = solver

    def _prepared(self, gramian: Tensor) -> tuple[Tensor, Tensor]:
        """Return the preference weights and the normalised, regularised Gramian."""
        u = preference_weights(self.pref_vector, gramian.shape[0], gramian, type(self).__name__)
        if self.norm_eps == 0.0 and self.reg_eps == 0.0:
            # The projections do not depend on the Gramian's scale: dividing it by its trace
            # in its own dtype would only flush the products of tiny rows to zero.
            return u, gramian
        G = gramian.to(torch.promote_types(gramian.dtype, torch.float64))
        return u, regularize_gramian(normalize_gramian(G, self.norm_eps), self.reg_eps)


@register(paper=_PAPER, non_conflicting=True, linear_under_scaling=True, permutation_invariant=True)
class UPGradWeighting(DualConeWeighting):
    r"""UPGrad's weights $w = \sum_i v^{(i)}$, where $v^{(i)}$ solves
    $\min_v v^\top G v$ subject to $v \ge u_i e_i$ (see `UPGrad`).

    Its arguments are those of `UPGrad`.
    """

    def _weights(self, matrix: Tensor) -> Tensor:
        u, G = self._prepared(matrix)
        return project_weights(torch.diag(u), G, self.solver).sum(dim=0)


@register(paper=_PAPER, non_conflicting=True, linear_under_scaling=True, permutation_invariant=True)
class UPGrad(GramianWeightedAggregator):
    r"""Unconflicting projection of gradients (Quinton & Rey, *Jacobian Descent for
    Multi-Objective Optimization*, [arXiv 2406.16232](https://arxiv.org/abs/2406.16232)).

    Each row, scaled by its preference, is projected onto the dual cone
    $\{x : Jx \ge 0\}$ of all rows, and the projections are summed:

    $$
    \mathcal A(J) = \sum_{i=1}^m \pi_{J}(u_i\, g_i),\qquad
    \pi_J(u_i g_i) = J^\top v^{(i)},\quad
    v^{(i)} = \arg\min_{v \ge u_i e_i} v^\top J J^\top v
    $$

    (Proposition 1 of the paper). The update never conflicts with any objective, and is
    linear under positive scaling of the rows.

    With a nonzero ``norm_eps`` or ``reg_eps``, the Gramian is divided by its trace (in float64)
    and ``reg_eps·I`` is added before solving; with the defaults the projections, which do not
    depend on the Gramian's scale, are solved on it as given. The
    defaults solve the projections exactly; ``norm_eps=1e-4, reg_eps=1e-4`` reproduce the
    paper's reference implementation (TorchJD) to its printed digits.

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
        >>> from jdoptim import UPGrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> UPGrad()(J)
        tensor([0.2924, 1.9006, 1.9006], dtype=torch.float64)
        >>> UPGrad().weighting(J @ J.T)  # exactly (10/9, 15/19)
        tensor([1.1111, 0.7895], dtype=torch.float64)
        >>> UPGrad(norm_eps=1e-4, reg_eps=1e-4)(J)  # TorchJD's defaults
        tensor([0.2929, 1.9004, 1.9004], dtype=torch.float64)
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 0.0,
        reg_eps: float = 0.0,
        solver: Solver = "active_set",
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, norm_eps, reg_eps, solver))
