from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Aggregator,
    Argument,
    all_finite,
    check_fraction,
    check_non_negative,
    solve_dtype,
)
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2308.12029"


def row_norms(matrix: Tensor) -> Tensor:
    """The Euclidean norms of the rows, without overflow or underflow of their squares."""
    scale = matrix.abs().amax(dim=1)
    safe = torch.where(scale > 0, scale, 1.0)
    return scale * torch.linalg.vector_norm(matrix / safe[:, None], dim=1)


@register(paper=_PAPER, stateful=True, permutation_invariant=True)
class DBMTL(Aggregator):
    r"""Dual-Balancing Multi-Task Learning (Lin et al., *Dual-Balancing for Multi-Task
    Learning*, [arXiv 2308.12029](https://arxiv.org/abs/2308.12029)).

    Two balances. The *loss scales* are balanced by a logarithm: each task descends
    $\log(L_i + \epsilon)$, whose gradient is $g_i / (L_i + \epsilon)$. The *gradient
    magnitudes* are balanced on the shared parameters: with $\hat g_i$ an exponential moving
    average of those gradients,

    $$
    \hat g_i \leftarrow \beta_t\, \hat g_i + (1 - \beta_t)\, \frac{g_i}{L_i + \epsilon},
    \qquad \beta_t = \beta / t^{\sigma},\qquad \hat g_i^{(0)} = 0,
    $$

    the update rescales every average to the largest norm:

    $$
    \mathcal A(J) = \sum_i \frac{\max_j \lVert \hat g_j \rVert}{\lVert \hat g_i \rVert}\, \hat g_i.
    $$

    With ``shared_params`` in `jdoptim.JDOptimizer`, the task heads descend the log losses too:
    they receive the gradient of $\sum_i \log(L_i + \epsilon)$ (`head_weights` are
    $1/(L_i + \epsilon)$). Since those weights depend on each call's losses, summing the heads'
    gradients of micro-batches (``accumulation="sum"``) would not give the whole batch's, and the
    optimizer refuses it.

    As in the paper's code (LibMTL's ``DB_MTL``), $\epsilon = 10^{-8}$, $\beta = 0.9$ and
    $\sigma = 0$ by default, and the averages start at zero without bias correction. LibMTL
    divides by $\lVert \hat g_i \rVert + 10^{-8}$, which shrinks gradients of norms near or
    below $10^{-8}$; here an average of norm 0 contributes nothing and every other one is
    rescaled exactly, at any scale. The method needs the values of the losses, which
    `jdoptim.JDOptimizer` passes (a direct call is ``DBMTL()(J, losses=losses)``); $L_i +
    \epsilon$ must be positive.

    State: the averages $\hat g$ (an ``[m, n]`` tensor, as large as the Jacobian) and the
    number of calls, in ``state_dict()``; a Jacobian of another shape restarts them; `reset`
    clears them. The last scales $\max_j \lVert \hat g_j \rVert / \lVert \hat g_i \rVert$
    are in the diagnostics' ``method_state["scales"]``.

    Args:
        beta: The rate $\beta \in [0, 1]$ of the moving average (the weight of the past).
        beta_sigma: The decay $\sigma \ge 0$ of that rate over calls.
        eps: The $\epsilon \ge 0$ added to the losses inside the logarithm.

    Examples:
        >>> import torch
        >>> from jdoptim import DBMTL
        >>> J = torch.tensor([[2.0, 0.0], [0.0, 30.0]], dtype=torch.float64)
        >>> aggregator = DBMTL(beta=0.5, eps=0.0)
        >>> aggregator(J, losses=torch.tensor([1.0, 10.0]))  # averages (1, 0) and (0, 1.5)
        tensor([1.5000, 1.5000], dtype=torch.float64)
    """

    needs_losses = True
    column_state = True
    loss_dependent_head_weights = True
    beta = Argument(check_fraction)
    beta_sigma = Argument(check_non_negative)
    eps = Argument(check_non_negative)

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.eps = eps
        self.reset()

    def reset(self) -> None:
        """Forget the moving averages."""
        self._average: Tensor | None = None
        self._calls = 0
        self._scales: Tensor | None = None

    @property
    def average(self) -> Tensor | None:
        r"""The moving averages $\hat g$, ``[m, n]`` (``None`` before the first call)."""
        return self._average

    def head_weights(self, losses: Tensor) -> Tensor | None:
        # Unchecked: non-finite losses give non-finite heads' gradients, which the optimizer's
        # non-finite policy handles; a negative loss is refused by the aggregation.
        return 1.0 / (losses + self.eps)

    def report(self) -> dict[str, Tensor]:
        return {} if self._scales is None else {"scales": self._scales}

    def get_extra_state(self) -> Any:
        return {
            "average": self._average,
            "calls": torch.tensor(self._calls),
            "scales": self._scales,
        }

    def set_extra_state(self, state: Any) -> None:
        self._average = None if state["average"] is None else state["average"].clone()
        self._calls = int(state["calls"])
        self._scales = state["scales"]

    def _shifted(self, losses: Tensor) -> Tensor:
        shifted = losses + self.eps
        if not bool((shifted > 0).all()):
            raise ValueError(
                "DBMTL takes the logarithm of the losses plus eps, which must be positive; got "
                f"losses {losses.cpu().tolist()} with eps={self.eps}."
            )
        return shifted

    def _aggregate(self, matrix: Tensor, losses: Tensor) -> Tensor:  # type: ignore[override]
        if not bool(all_finite(matrix) & all_finite(losses)):
            return matrix.new_full(matrix.shape[1:], torch.nan)  # and no state changes
        dtype = solve_dtype(matrix.dtype)
        shifted = self._shifted(losses.to(dtype=dtype, device=matrix.device))
        log_gradients = matrix.to(dtype) / shifted[:, None]  # the gradients of log(L_i + eps)
        if self._average is None or self._average.shape != matrix.shape:
            self.reset()
            average = torch.zeros_like(log_gradients)
        else:
            average = self._average.to(log_gradients)
        self._calls += 1
        rate = self.beta / self._calls**self.beta_sigma
        average = log_gradients + rate * (average - log_gradients)
        norms = row_norms(average)
        largest = norms.max()
        scales = torch.where(norms > 0, largest / torch.where(norms > 0, norms, 1.0), 0.0)
        self._average = average
        self._scales = scales
        # Σ_i (max_j |ĝ_j| / |ĝ_i|) ĝ_i = max_j |ĝ_j| Σ_i ĝ_i / |ĝ_i|: unit rows cannot overflow
        # (a zero row stays zero).
        units = average / torch.where(norms > 0, norms, 1.0)[:, None]
        return (largest * units.sum(dim=0)).to(matrix.dtype)
