from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_non_negative,
    check_positive_int,
)
from jdoptim.linalg._constraints import gramian_factor, tolerances
from jdoptim.linalg._fair import RESIDUAL_TOL, fair_weights
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2202.01017"


@register(paper=_PAPER, non_conflicting=True, stateful=True)
class NashMTLWeighting(Weighting):
    r"""Nash-MTL's weights: the solution $\alpha > 0$ of $G\alpha = 1/\alpha$, scaled down so
    that $\lVert J^\top \alpha \rVert \le$ ``max_norm`` (see `NashMTL`).

    Args:
        max_norm: Largest norm of the update $J^\top \alpha$; 0 disables the clipping.
        update_weights_every: The weights are recomputed at one call in this many and reused
            (with the current clipping) in between.
        optim_niter: Largest number of Newton steps per solve.
    """

    max_norm = Argument(check_non_negative)
    update_weights_every = Argument(check_positive_int)
    optim_niter = Argument(check_positive_int)

    def __init__(
        self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
    ) -> None:
        super().__init__()
        self.max_norm = max_norm
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self._step = 0
        self._alpha: Tensor | None = None

    def reset(self) -> None:
        """Forget the step counter and the last weights (and the number of objectives)."""
        self._step = 0
        self._alpha = None

    def get_extra_state(self) -> Any:
        return {"step": torch.tensor(self._step), "alpha": self._alpha}

    def set_extra_state(self, state: Any) -> None:
        self._step = int(state["step"])
        self._alpha = state["alpha"]

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        if self._alpha is not None and self._alpha.shape[0] != m:
            raise ValueError(
                f"NashMTL was called with {self._alpha.shape[0]} objectives before and now gets "
                f"{m}; call reset() to start over with a different number of objectives."
            )
        # Newton's method branches on values at every step: one transfer to the CPU costs less
        # than a host synchronisation per step.
        G = matrix.to(device="cpu", dtype=torch.float64)
        L = gramian_factor(G, matrix.dtype)
        if self._alpha is None or self._step % self.update_weights_every == 0:
            alpha, converged = fair_weights(
                L, 1.0, self.optim_niter, tolerances(matrix.dtype), start=self._alpha
            )
            if not converged:
                warnings.warn(
                    f"Nash-MTL's Newton solver did not reach a relative residual of "
                    f"{RESIDUAL_TOL} within optim_niter={self.optim_niter} steps; the last "
                    "iterate is used, as the paper's algorithm does after its fixed number of "
                    "iterations. Increase optim_niter to solve the bargaining system exactly.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._alpha = alpha
        self._step += 1
        alpha = self._alpha
        if self.max_norm > 0.0:
            norm = float((alpha @ L).norm())
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha.to(device=matrix.device, dtype=matrix.dtype)


@register(paper=_PAPER, non_conflicting=True, stateful=True)
class NashMTL(GramianWeightedAggregator):
    r"""Nash-MTL (Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022,
    [arXiv 2202.01017](https://arxiv.org/abs/2202.01017)).

    The update is the Nash bargaining solution of a game whose players are the objectives and
    whose utilities are the improvement rates $g_i^\top d$, over a ball of directions. Up to its
    length it is $d = J^\top \alpha$ where $\alpha > 0$ solves (Algorithm 1)

    $$
    G \alpha = 1 / \alpha \quad(\text{elementwise}),\qquad G = J J^\top,
    $$

    so that $g_i^\top d = 1/\alpha_i > 0$ for every objective, and $\lVert d \rVert = \sqrt m$.
    If $\lVert d \rVert$ exceeds ``max_norm``, $\alpha$ is scaled down to reach it (the paper's
    gradient clipping; TorchJD's default 1). The weights are recomputed at one call in
    ``update_weights_every`` and reused in between.

    The system is solved in torch by Newton's method on the strictly convex potential
    $\tfrac12 \alpha^\top G \alpha - \sum_i \log \alpha_i$ (`solve_fair_system` with
    $\alpha = 1$), warm-started from the previous weights when they are the better start, as
    the paper's sequential convex procedure is; it stops once every equation holds to a relative
    `RESIDUAL_TOL` of its terms. If it has not got there after ``optim_niter`` steps (the
    paper's fixed iteration budget), a `RuntimeWarning` is issued and the last iterate is used.
    The paper's code and TorchJD run at most ``optim_niter`` cvxpy/ECOS solves of a linearised
    problem and, when ECOS fails, silently keep the previous weights (initially all ones); this
    implementation never does.

    A bargaining solution exists iff some direction improves every objective, i.e. $0$ is not in
    the convex hull of the rows (decided by an exact active-set method, see
    `common_ascent_multipliers`). Otherwise no agreement beats the disagreement point, and the
    update is that point: $0$.

    The method is stateful (step counter and last weights, in ``state_dict()``). The number of
    objectives is fixed by the first call; calling with another number raises a `ValueError`
    until `reset`.

    Args:
        max_norm: Largest norm of the update; 0 disables the clipping.
        update_weights_every: The weights are recomputed at one call in this many.
        optim_niter: Largest number of Newton steps per solve.

    Examples:
        >>> import torch
        >>> from jdoptim import NashMTL
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> NashMTL()(J)
        tensor([0.0542, 0.7061, 0.7061], dtype=torch.float64)
        >>> NashMTL(max_norm=0.0).weighting(J @ J.T)
        tensor([0.5915, 0.4071], dtype=torch.float64)
    """

    def __init__(
        self, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
    ) -> None:
        super().__init__(NashMTLWeighting(max_norm, update_weights_every, optim_niter))
