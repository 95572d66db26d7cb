from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    WeightedAggregator,
    Weighting,
    check_non_negative_int,
    check_positive,
    solve_dtype,
)
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2402.02009"

STABILISER = 1e-7
"""Added inside the square root of the AdaGrad accumulator and to the baseline excess risks, as
in the paper's code."""


@register(paper=_PAPER, stateful=True)
class ExcessMTLWeighting(Weighting):
    r"""ExcessMTL's weights, updated at each call from the Jacobian (see `ExcessMTL`).

    Args:
        robust_step_size: Step size $\eta > 0$ of the exponentiated-gradient update.
        n_warmup_steps: Number of first calls that return uniform weights while collecting the
            baseline excess risks.
    """

    needs_jacobian = True
    robust_step_size = Argument(check_positive)
    n_warmup_steps = Argument(check_non_negative_int)

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 1) -> None:
        super().__init__()
        self.robust_step_size = robust_step_size
        self.n_warmup_steps = n_warmup_steps
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated squared gradients, the baseline and the weights."""
        self._n_steps = 0
        self._sq_grad_sum: Tensor | None = None
        self._warmup_sum: Tensor | None = None
        self._baseline: Tensor | None = None
        self._log_weights: Tensor | None = None

    def get_extra_state(self) -> Any:
        return {
            "n_steps": torch.tensor(self._n_steps),
            "sq_grad_sum": self._sq_grad_sum,
            "warmup_sum": self._warmup_sum,
            "baseline": self._baseline,
            "log_weights": self._log_weights,
        }

    def set_extra_state(self, state: Any) -> None:
        self._n_steps = int(state["n_steps"])
        self._sq_grad_sum = state["sq_grad_sum"]
        self._warmup_sum = state["warmup_sum"]
        self._baseline = state["baseline"]
        self._log_weights = state["log_weights"]

    def _weights(self, matrix: Tensor) -> Tensor:
        J = matrix.to(solve_dtype(matrix.dtype))
        if self._sq_grad_sum is None or self._sq_grad_sum.shape != J.shape:
            self.reset()
            self._sq_grad_sum = torch.zeros_like(J)
            self._warmup_sum = J.new_zeros(J.shape[0])
            self._log_weights = J.new_zeros(J.shape[0])
        else:
            self._sq_grad_sum = self._sq_grad_sum.to(J)
            self._warmup_sum = self._warmup_sum.to(J)
            self._log_weights = self._log_weights.to(J)
            if self._baseline is not None:
                self._baseline = self._baseline.to(J)
        squares = J * J
        self._sq_grad_sum = self._sq_grad_sum + squares
        # Excess risk estimate g_iᵀ H_i⁻¹ g_i with the AdaGrad diagonal H_i (Eqs. 6-7).
        excess = (squares / (self._sq_grad_sum + STABILISER).sqrt()).sum(dim=1)
        self._n_steps += 1
        if self._n_steps <= self.n_warmup_steps:
            self._warmup_sum = self._warmup_sum + excess
            return self._log_weights.softmax(dim=0)
        if self._baseline is None:
            self._baseline = (
                self._warmup_sum / self.n_warmup_steps if self.n_warmup_steps > 0 else excess
            )
        # Exponentiated-gradient step on the normalised excess risks (Eq. 9), in log space.
        ratio = excess / (self._baseline + STABILISER)
        self._log_weights = self._log_weights + self.robust_step_size * ratio
        self._log_weights = self._log_weights - self._log_weights.max()
        return self._log_weights.softmax(dim=0)


@register(paper=_PAPER, stateful=True)
class ExcessMTL(WeightedAggregator):
    r"""ExcessMTL (He et al., *Robust Multi-Task Learning with Excess Risks*, ICML 2024,
    [arXiv 2402.02009](https://arxiv.org/abs/2402.02009)).

    The update is $\mathcal A(J) = J^\top w$ with weights on the simplex, moved at each call
    towards the objectives furthest from convergence. The excess risk of objective $i$ is
    estimated by a second-order expansion with the AdaGrad diagonal Hessian (Eqs. 6-7),

    $$
    E_i = g_i^\top H_i^{-1} g_i,\qquad
    H_i = \operatorname{diag}\Big(\sqrt{\textstyle\sum_{s \le t} g_{i,s}^2 + 10^{-7}}\Big),
    $$

    normalised by a baseline $E_i^0$ (the mean of the estimates over the ``n_warmup_steps``
    first calls, Appendix C.1), and the weights take an exponentiated-gradient step (Eq. 9):

    $$
    w_i \leftarrow \frac{w_i \exp\!\big(\eta\, E_i / (E_i^0 + 10^{-7})\big)}
    {\sum_j w_j \exp\!\big(\eta\, E_j / (E_j^0 + 10^{-7})\big)},
    \qquad w^{(0)} = \mathbf 1/m.
    $$

    During the warm-up calls the weights stay uniform. The update is computed in log space, so a
    very large ratio saturates the weights instead of overflowing (TorchJD 0.18 does the same).
    The arguments are TorchJD's. With ``n_warmup_steps=1`` (the default, as in TorchJD's
    current code; its 0.17 documentation shows 0) the first call sets the baseline and returns
    $\mathbf 1/m$, as the paper's code does (which keeps weights summing to $m$, hence updates
    $m$ times larger). With ``n_warmup_steps=0`` the first call's estimate is its own baseline,
    so the first update is uniform too; TorchJD instead exponentiates the raw, scale-dependent
    estimate at that call.

    The method is stateful: it accumulates the squared gradients (an ``[m, n]`` tensor, as large
    as the Jacobian), the baseline and the weights, all in ``state_dict()``. A Jacobian of
    another shape restarts it; `reset` clears it.

    Args:
        robust_step_size: Step size $\eta > 0$ of the exponentiated-gradient update.
        n_warmup_steps: Number of first calls that return uniform weights while collecting the
            baseline excess risks.

    Examples:
        >>> import torch
        >>> from jdoptim import ExcessMTL
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> aggregator = ExcessMTL()
        >>> aggregator(J)  # warm-up: the mean of the rows
        tensor([1., 1., 1.], dtype=torch.float64)
        >>> aggregator(torch.tensor([[-2.0, 1.0, 0.5], [6.0, 1.0, 1.0]], dtype=torch.float64))
        tensor([2.7951, 1.0000, 0.7997], dtype=torch.float64)
    """

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 1) -> None:
        super().__init__(ExcessMTLWeighting(robust_step_size, n_warmup_steps))
