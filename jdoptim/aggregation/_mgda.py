from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    all_finite,
    check_non_negative,
    check_positive_int,
    one_of,
    solve_dtype,
)
from jdoptim.linalg import min_norm_frank_wolfe, min_norm_weights
from jdoptim.linalg._gramian import weighted_sum
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/1810.04650"
Solver = Literal["active_set", "frank_wolfe"]
SOLVERS: tuple[str, ...] = ("active_set", "frank_wolfe")
Normalization = Literal["none", "l2", "loss", "loss+"]
NORMALIZATIONS: tuple[str, ...] = ("none", "l2", "loss", "loss+")


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True)
class MGDAWeighting(Weighting):
    r"""Weights of the minimum-norm point of the convex hull of the rows (normalised by
    $\nu_i$): $w = D^{-1} \arg\min_{v \in \Delta_m} v^\top D^{-1} G D^{-1} v$ with
    $D = \operatorname{diag}(\nu)$ (see `MGDA`).

    Its arguments are those of `MGDA`.
    """

    solver = Argument(one_of(SOLVERS))
    epsilon = Argument(check_non_negative)
    max_iters = Argument(check_positive_int)
    normalization = Argument(one_of(NORMALIZATIONS))

    def __init__(
        self,
        solver: Solver = "active_set",
        epsilon: float = 0.001,
        max_iters: int = 100,
        normalization: Normalization = "none",
    ) -> None:
        super().__init__()
        self.solver = solver
        self.epsilon = epsilon
        self.max_iters = max_iters
        self.normalization = normalization

    @property  # type: ignore[override]
    def needs_losses(self) -> bool:  # type: ignore[override]
        """Whether the normalisation divides by the losses (``"loss"``, ``"loss+"``)."""
        return self.normalization in ("loss", "loss+")

    def _weights(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        if self.normalization == "none":
            return self._min_norm(matrix)
        # The normalisers, and the normalised Gramian, in float64: 1/ν of a tiny gradient in
        # float32 would overflow.
        G = matrix.to(torch.float64)
        norms = G.diagonal().clamp(min=0).sqrt()
        if losses is not None:
            losses = losses.to(torch.float64)
            if not bool((losses > 0).all()):
                raise ValueError(
                    f"MGDA(normalization={self.normalization!r}) divides each gradient by its "
                    f"loss, so the losses must be positive; got {losses.cpu().tolist()}."
                )
        if self.normalization == "l2":
            normalizers = norms
        elif self.normalization == "loss":
            normalizers = losses
        else:
            normalizers = norms * losses
        # A zero gradient stays zero: its direction is undefined, and 0 in the hull makes the
        # update 0, as without normalisation.
        inverse = torch.where(normalizers > 0, 1.0 / normalizers, 0.0)
        normalized = G * inverse[:, None] * inverse[None, :]
        weights = self._min_norm(normalized, matrix.dtype)
        return weights.to(torch.float64) * inverse

    def _min_norm(self, G: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = G.dtype if dtype is None else dtype
        if self.solver == "frank_wolfe":
            return min_norm_frank_wolfe(G.to(solve_dtype(G.dtype)), self.epsilon, self.max_iters)
        # Wolfe's algorithm branches on values at every step: one transfer to the CPU costs less
        # than a host synchronisation per step.
        return min_norm_weights(G, dtype).to(device=G.device, dtype=G.dtype)


@register(paper=_PAPER, non_conflicting=True, permutation_invariant=True)
class MGDA(GramianWeightedAggregator):
    r"""Multiple-gradient descent: the minimum-norm point of the convex hull of the rows,

    $$
    \mathcal A(J) = J^\top w^\star,\qquad
    w^\star = \arg\min_{w \in \Delta_m} \lVert J^\top w \rVert^2 = w^\top G w,
    $$

    after Désidéri's MGDA, as in Sener & Koltun, *Multi-Task Learning as Multi-Objective
    Optimization* ([arXiv 1810.04650](https://arxiv.org/abs/1810.04650)). By the optimality
    conditions, $g_i^\top \mathcal A(J) \ge \lVert \mathcal A(J) \rVert^2$ for every row: the
    update conflicts with no objective, and it is $0$ exactly when $0$ is in the convex hull of
    the rows.

    The default solver, ``"active_set"``, finds $w^\star$ exactly (up to rounding) from the
    Gramian, by Wolfe's nearest-point algorithm in float64 (`jdoptim.linalg.min_norm_weights`),
    also on zero, duplicated, tiny and linearly dependent rows. ``"frank_wolfe"`` runs the
    paper's Frank-Wolfe iteration (Algorithm 2), as TorchJD does, on the Gramian's device; it
    stops once its step is below ``epsilon`` or after ``max_iters`` steps, which can leave it far
    from $w^\star$ (then the update can conflict with some rows). ``epsilon`` and ``max_iters``
    are used by ``"frank_wolfe"`` only; ``MGDA(solver="frank_wolfe")`` gives TorchJD's numbers.

    **Gradient normalisation** (MGDA-UB's experiments, Section 3.3 of the paper and its code;
    LibMTL's ``mgda_gn``): with ``normalization`` other than ``"none"``, the rows are divided by
    normalisers $\nu_i$ before the min-norm problem,

    $$
    \mathcal A(J) = \sum_i v^\star_i \frac{g_i}{\nu_i},\qquad
    v^\star = \arg\min_{v \in \Delta_m} \lVert \textstyle\sum_i v_i g_i / \nu_i
    \rVert^2,
    $$

    with $\nu_i = \lVert g_i \rVert$ (``"l2"``), $L_i$ (``"loss"``, the value of loss $i$)
    or $L_i \lVert g_i \rVert$ (``"loss+"``); the weights of the rows are $v^\star_i /
    \nu_i$. The update is the min-norm point of the normalised rows, as in LibMTL, so it still
    conflicts with no row (the paper's code instead applies $v^\star$ to the unnormalised
    losses, which can conflict). A zero row stays zero (and makes the update zero, as without
    normalisation). ``"loss"`` and ``"loss+"`` need the values of the losses
    (`jdoptim.JDOptimizer` passes them; a direct call is ``MGDA(...)(J, losses=losses)``),
    which must be positive. The normalisers add the spread of the losses to that of the rows'
    norms: where the normalised rows' norms span more than about $10^{20}$, the min-norm point
    is found only to the solver's precision, and where the losses are extreme the update
    itself can fall outside the range of the Jacobian's dtype (it is divided by them).

    Args:
        solver: ``"active_set"`` (exact) or ``"frank_wolfe"`` (TorchJD's iteration).
        epsilon: Frank-Wolfe stops once its step size falls below this value.
        max_iters: Largest number of Frank-Wolfe iterations.
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"`` (see above).

    Examples:
        >>> import torch
        >>> from jdoptim import MGDA
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
        >>> MGDA()(J)  # (0.8, 0.4): its inner product with rows 1 and 2 is its squared norm
        tensor([0.8000, 0.4000], dtype=torch.float64)
        >>> MGDA().weighting(J @ J.T)
        tensor([0.8000, 0.2000, 0.0000], dtype=torch.float64)
        >>> MGDA(normalization="loss")(J, losses=torch.tensor([1.0, 4.0, 2.0]))  # rows / losses
        tensor([0.2000, 0.4000], dtype=torch.float64)
    """

    def __init__(
        self,
        solver: Solver = "active_set",
        epsilon: float = 0.001,
        max_iters: int = 100,
        normalization: Normalization = "none",
    ) -> None:
        super().__init__(MGDAWeighting(solver, epsilon, max_iters, normalization))

    weighting: MGDAWeighting

    def _aggregate(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        context = {"losses": losses} if self.weighting.needs_losses else {}
        gramian = self._weighting_input(matrix)
        weights = self.weighting(gramian, **context)
        if self.weighting.normalization == "none" or not _imprecise(weights, gramian.dtype):
            return weighted_sum(weights, matrix)
        # The weights v_i / ν_i of normalised rows can fall outside the range of the Gramian's
        # dtype (ν_i = L_i ‖g_i‖ spans its square): the update is then formed in float64.
        if not (bool(all_finite(gramian)) and (losses is None or bool(all_finite(losses)))):
            return weighted_sum(weights, matrix)
        return weighted_sum(self.weighting._weights(gramian, losses), matrix)


def _imprecise(weights: Tensor, dtype: torch.dtype) -> bool:
    """Whether some weights lost their precision in ``dtype``: subnormal, or overflowed."""
    if dtype == torch.float64:
        return False
    subnormal = (weights != 0) & (weights.abs() < torch.finfo(dtype).tiny)
    return bool((subnormal | ~torch.isfinite(weights)).any())
