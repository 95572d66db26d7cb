from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_non_negative,
    check_positive_int,
)
from jdoptim.linalg._constraints import (
    gramian_factor,
    tolerances,
)
from jdoptim.linalg._fair import RESIDUAL_TOL, fair_weights
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2402.15638"


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True,
          example_args=lambda m: {"alpha": 2.0})  # fmt: skip
class FairGradWeighting(Weighting):
    r"""FairGrad's weights: the solution $w > 0$ of $G w = w^{-1/\alpha}$ (see `FairGrad`).

    Args:
        alpha: Fairness parameter $\alpha \ge 0$.
        max_iters: Largest number of Newton steps of the solver.
    """

    alpha = Argument(check_non_negative)
    max_iters = Argument(check_positive_int)

    def __init__(self, alpha: float, max_iters: int = 200) -> None:
        super().__init__()
        self.alpha = alpha
        self.max_iters = max_iters

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        if self.alpha == 0.0:
            return torch.full_like(matrix[0], 1.0 / m)
        # Newton's method branches on values at every step: one transfer to the CPU costs less
        # than a host synchronisation per step.
        G = matrix.to(device="cpu", dtype=torch.float64)
        L = gramian_factor(G, matrix.dtype)
        w, converged = fair_weights(L, self.alpha, self.max_iters, tolerances(matrix.dtype))
        if not converged:
            raise RuntimeError(
                f"FairGrad's Newton solver did not reach a relative residual of {RESIDUAL_TOL} "
                f"within max_iters={self.max_iters} steps; increase max_iters."
            )
        return w.to(device=matrix.device, dtype=matrix.dtype)


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True,
          example_args=lambda m: {"alpha": 2.0})  # fmt: skip
class FairGrad(GramianWeightedAggregator):
    r"""FairGrad (Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024,
    [arXiv 2402.15638](https://arxiv.org/abs/2402.15638)).

    Each objective's improvement rate $u_i = g_i^\top d$ is a utility, and the update maximises
    the $\alpha$-fair utility $\sum_i u_i^{1-\alpha}/(1-\alpha)$ ($\sum_i \log u_i$ for
    $\alpha = 1$) over a ball. Its direction is $d = J^\top w$ where $w > 0$ solves
    (Algorithm 1)

    $$
    G w = w^{-1/\alpha} \quad(\text{elementwise}),\qquad G = J J^\top,
    $$

    so that $g_i^\top d = w_i^{-1/\alpha} > 0$: the update conflicts with no objective.
    $\alpha = 1$ is proportional fairness (Nash-MTL's system), $\alpha \to \infty$ tends to
    max-min fairness, and $\alpha = 0$ is taken to be the linear scalarisation with weights
    $1/m$, as in TorchJD (when $G\mathbf 1 > 0$, the solutions tend to $w = \mathbf 1$ as
    $\alpha \to 0$: the same direction, $m$ times longer).

    The system is solved in torch by Newton's method on the strictly convex potential whose
    gradient it is (see `solve_fair_system`), until every equation holds to a relative
    `RESIDUAL_TOL` of its terms; if that takes more than ``max_iters`` steps, a `RuntimeError`
    is raised. The paper's code and TorchJD use scipy's ``least_squares`` from
    $w = \mathbf 1/m$, which stops at its own tolerance (TorchJD's ``max_iters`` bounds its
    function evaluations, ``100 m`` by default). Directions of the Gramian below the rounding
    level of its dtype are removed first (`gramian_factor`).

    A solution exists iff some direction improves every objective, i.e. $0$ is not in the
    convex hull of the rows, which is decided by an exact active-set method (see
    `common_ascent_multipliers`). Otherwise no utility vector is positive, and the update
    is $0$.

    Args:
        alpha: Fairness parameter $\alpha \ge 0$. TorchJD also accepts negative values, for
            which the system no longer comes from a fairness criterion; they are rejected here.
        max_iters: Largest number of Newton steps.

    Examples:
        >>> import torch
        >>> from jdoptim import FairGrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> FairGrad(alpha=2.0)(J)
        tensor([0.0313, 0.7908, 0.7908], dtype=torch.float64)
        >>> FairGrad(alpha=2.0).weighting(J @ J.T)
        tensor([0.4714, 0.3195], dtype=torch.float64)
    """

    def __init__(self, alpha: float, max_iters: int = 200) -> None:
        super().__init__(FairGradWeighting(alpha, max_iters))
