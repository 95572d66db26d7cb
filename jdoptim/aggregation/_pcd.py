from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    as_weight_tensor,
    check_fraction,
    check_length,
    check_non_negative,
)
from jdoptim.linalg._constraints import (
    gramian_factor,
    project_onto_constraints,
    tolerances,
)
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2606.29521"


def _check_tau(value: Any, name: str) -> float | Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check_fraction(value, name)
    values = as_weight_tensor(value, name)
    if not ((values >= 0.0) & (values <= 1.0)).all():
        raise ValueError(f"Invalid {name} value: {values.tolist()}; expected values in [0, 1].")
    return values


def _check_beta(value: Any, name: str) -> float:
    value = check_non_negative(value, name)
    if not value < 1.0:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a number in [0, 1).")
    return value


@register(paper=_PAPER, stateful=True)
class PCDWeighting(Weighting):
    r"""Weights of Priority-Constrained Descent (see `PCD`); row 0 of the Gramian is the
    primary objective.

    Args:
        tau: Fraction $\tau \in [0, 1]$ of normalised first-order progress guaranteed to each
            secondary objective: one number, or one per secondary objective ($m - 1$ values).
        beta: Decay $\beta \in [0, 1)$ of the moving average of the squared gradient norms.
        eps: Constant $\epsilon \ge 0$ added to the moving average before its inverse square
            root.
    """

    tau = Argument(_check_tau)
    beta = Argument(_check_beta)
    eps = Argument(check_non_negative)

    def __init__(
        self,
        tau: float | Tensor | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.tau = tau
        self.beta = beta
        self.eps = eps
        self._sq_norm_average: Tensor | None = None
        self._n_steps = 0

    def reset(self) -> None:
        """Forget the moving average of the squared gradient norms."""
        self._sq_norm_average = None
        self._n_steps = 0

    def get_extra_state(self) -> Any:
        return {"sq_norm_average": self._sq_norm_average, "n_steps": torch.tensor(self._n_steps)}

    def set_extra_state(self, state: Any) -> None:
        self._sq_norm_average = state["sq_norm_average"]
        self._n_steps = int(state["n_steps"])

    def _taus(self, m: int) -> Tensor:
        if isinstance(self.tau, Tensor):
            check_length(self.tau, m - 1, type(self).__name__, "values of tau (one per secondary)")
            return self.tau.to(torch.float64).cpu()
        return torch.full((m - 1,), self.tau, dtype=torch.float64)

    def _scales(self, sq_norms: Tensor) -> Tensor:
        """Update the moving average with this call's squared norms; return the scales $s_i$."""
        m = sq_norms.shape[0]
        if self._sq_norm_average is None or self._sq_norm_average.shape[0] != m:
            self._sq_norm_average = torch.zeros(m, dtype=torch.float64)
            self._n_steps = 0
        self._n_steps += 1
        self._sq_norm_average = self.beta * self._sq_norm_average + (1.0 - self.beta) * sq_norms
        debiased = self._sq_norm_average / (1.0 - self.beta**self._n_steps)
        denominators = (debiased + self.eps).sqrt()
        # An average of zero means the gradient was always zero: its scale does not matter.
        return torch.where(denominators > 0.0, 1.0 / denominators, 0.0)

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        taus = self._taus(m)
        # The solver branches on values at every step: one transfer to the CPU costs less than a
        # host synchronisation per step.
        G = matrix.to(device="cpu", dtype=torch.float64)
        sq_norms = G.diagonal().clamp(min=0.0)
        scales = self._scales(sq_norms)
        weights = torch.zeros(m, dtype=torch.float64)
        if sq_norms[0] > 0.0:
            L = scales[:, None] * gramian_factor(G, matrix.dtype)  # rows: the g̃_i
            Gs = L @ L.T
            w = self._solve(L, taus, matrix.dtype)
            direction_sq_norm = w @ Gs @ w
            # Rounding scale of the squared norm of d~ = sum_i w_i s_i g_i, read from the Gramian.
            magnitude = (w.abs() @ Gs.diagonal().clamp(min=0.0).sqrt()) ** 2
            if direction_sq_norm > 10.0 * torch.finfo(matrix.dtype).eps * magnitude:
                weights = w * scales * (sq_norms[0] / direction_sq_norm).sqrt()
        return weights.to(device=matrix.device, dtype=matrix.dtype)

    @staticmethod
    def _solve(L: Tensor, taus: Tensor, dtype: torch.dtype) -> Tensor:
        """Weights $(1, \\mu_2, \\dots, \\mu_m)$ of $\\tilde d$, from the coordinates ``L`` of the
        normalised gradients."""
        m = L.shape[0]
        w = torch.zeros(m, dtype=L.dtype)
        w[0] = 1.0
        if m == 1:
            return w
        sq_norms = (L[1:] * L[1:]).sum(dim=1)
        products = L[1:] @ L[0]  # g̃_jᵀ g̃_1
        b = taus * sq_norms - products
        b_magnitude = taus * sq_norms + products.abs()
        mu, feasible = project_onto_constraints(L[1:], b, tolerances(dtype), b_magnitude)
        if not feasible:
            warnings.warn(
                "PCD's constraints cannot all hold at this step (some secondary gradients are "
                "opposed); as Algorithm 1 of the paper prescribes, they are dropped and the "
                "update follows the primary gradient.",
                RuntimeWarning,
                stacklevel=2,
            )
            return w
        w[1:] = mu
        return w


@register(paper=_PAPER, stateful=True)
class PCD(GramianWeightedAggregator):
    r"""Priority-Constrained Descent (Varam & AlHajri, *Not All Objectives Are Born Equal:
    Priority-Constrained Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026,
    [arXiv 2606.29521](https://arxiv.org/abs/2606.29521)).

    Row 0 is the primary objective $g_1$; the other rows are secondary objectives. The update
    follows the primary gradient as closely as possible while every secondary objective gets at
    least a fraction $\tau$ of the first-order progress a step along its own normalised gradient
    would give (Definition 4.1):

    $$
    \tilde d = \arg\min_d \tfrac12 \lVert d - \tilde g_1 \rVert^2
    \quad\text{s.t.}\quad \tilde g_j^\top d \ge \tau_j \lVert \tilde g_j \rVert^2,
    \quad j = 2, \dots, m,
    $$

    with normalised gradients $\tilde g_i = s_i g_i$, $s_i = 1/\sqrt{\hat v_i + \epsilon}$, where
    $\hat v_i$ is the bias-corrected moving average of $\lVert g_i \rVert^2$ over the calls, with
    decay $\beta$ (Definition 4.5). The update is $\tilde d$ rescaled to the norm of $g_1$
    (Algorithm 1): $\mathcal A(J) = \lVert g_1 \rVert\, \tilde d / \lVert \tilde d \rVert$.

    The problem is solved exactly from the Gramian by a dual active-set method (Goldfarb and
    Idnani, 1983), which also covers linearly dependent gradients (directions of the Gramian
    below the rounding level of its dtype are removed first, see `gramian_factor`); the paper's
    code enumerates the active sets instead, which gives the same minimiser in time exponential
    in $m$.

    Special cases, as in Algorithm 1: if $g_1 = 0$ the update is zero; if the constraints cannot
    hold together (possible from $m = 3$, e.g. two opposite secondary gradients), they are
    dropped for that call, the update is $g_1$ and a `RuntimeWarning` says so; if
    $\tilde d = 0$ up to rounding, the update is zero. A Gramian with non-finite entries gives
    NaN weights and leaves the moving average unchanged.

    The method is stateful (the moving average). It restarts when the number of rows changes;
    `reset` clears it.

    Args:
        tau: Fraction $\tau \in [0, 1]$ of normalised first-order progress guaranteed to each
            secondary objective: one number, or one per secondary objective ($m - 1$ values).
        beta: Decay $\beta \in [0, 1)$ of the moving average of the squared gradient norms.
        eps: Constant $\epsilon \ge 0$ added to the moving average before its inverse square
            root.

    Examples:
        >>> import torch
        >>> from jdoptim import PCD
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> PCD(tau=0.5)(J)
        tensor([2.0889, 2.6112, 2.6112], dtype=torch.float64)
    """

    def __init__(
        self,
        tau: float | Tensor | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))
