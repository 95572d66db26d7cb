from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_weights,
    optional,
    preference_weights,
    solve_dtype,
)
from jdoptim.aggregation._modo import CrossBatchWeighting
from jdoptim.linalg._simplex import project_onto_simplex
from jdoptim.registry import register


def _check_momentum(value: Any, name: str) -> float:
    value = check_non_negative(value, name)
    if value >= 1:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a number in [0, 1).")
    return value


@register(paper="https://arxiv.org/abs/2305.18409", stateful=True)
class SDMGradWeighting(CrossBatchWeighting):
    r"""Stochastic direction-oriented multi-objective gradient descent (Xiao et al.,
    *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms*,
    NeurIPS 2023, [arXiv 2305.18409](https://arxiv.org/abs/2305.18409), Algorithm 1).

    The weights minimise $\frac12 \lVert J^\top (w + \lambda \tilde w) \rVert^2$ over the
    simplex, which keeps the update close to the preferred direction $J^\top \tilde w$; the
    gradient of that objective, $J J^\top (w + \lambda \tilde w)$, is estimated without bias
    from two independent batches, $A = J_1 J_2^\top$. A few steps of projected SGD with
    momentum, warm-started from the previous call's $w$, approximate the minimiser:

    $$
    v \leftarrow \mu v + \hat A (w + \lambda \tilde w),\qquad
    w \leftarrow \Pi_\Delta(w - \eta\, v),\qquad
    \text{weights} = \frac{w + \lambda \tilde w}{1 + \lambda},
    $$

    with $v = 0$ at the start of each call and $\hat A = A / s^2$,
    $s = \frac1m \sum_i \sqrt{\max(A_{ii}, 0)}$, so that the step size $\eta$ does not
    depend on the gradients' scale (as in the authors' code). TorchJD divides by
    $s^2 + 10^{-8}$, which makes the method scale-dependent for gradients of norm below
    about $10^{-4}$; here $\hat A = A$ when $s = 0$.

    How to feed it: as `MoDoWeighting`, with the cross-batch matrix $A = J_1 J_2^\top$ of the
    Jacobians of the same $m$ losses on two independent mini-batches, and the update from a third
    (see the example there). Given the Gramian of a single batch instead, it still runs, but the
    weights and the update then use the same sample and the unbiasedness guarantee is lost.

    State: $w$ (a vector of $m$ weights) persists across calls and travels in
    ``state_dict()``; ``reset()`` goes back to uniform weights, and so does a change of $m$.

    Args:
        lr: Step size $\eta > 0$ of the inner projected SGD.
        momentum: Momentum $\mu \in [0, 1)$ of the inner SGD.
        n_iter: Number of inner steps per call.
        lambda_: Pull $\lambda \ge 0$ towards the preferred direction.
        pref_vector: The preferences $\tilde w$ (one per objective); uniform $1/m$ (the
            mean gradient) when ``None``.

    Examples:
        >>> import torch
        >>> from jdoptim import SDMGradWeighting
        >>> J1 = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> J2 = torch.tensor([[-3.0, 1.0, 0.0], [5.0, 0.0, 1.0]])
        >>> SDMGradWeighting()(J1 @ J2.T)
        tensor([0.1154, 0.8846])
    """

    lr = Argument(check_positive)
    momentum = Argument(_check_momentum)
    n_iter = Argument(check_positive_int)
    lambda_ = Argument(check_non_negative)
    pref_vector = Argument(optional(check_weights))

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.momentum = momentum
        self.n_iter = n_iter
        self.lambda_ = lambda_
        self.pref_vector = pref_vector

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        matrix = matrix.to(solve_dtype(matrix.dtype))
        preferred = preference_weights(self.pref_vector, m, matrix, type(self).__name__)
        scale = matrix.diagonal().clamp(min=0).sqrt().mean()
        normalised = matrix / (scale**2).where(scale > 0, 1.0)
        w = self._previous(matrix)
        velocity = matrix.new_zeros(m)
        for _ in range(self.n_iter):
            velocity = self.momentum * velocity + normalised @ (w + self.lambda_ * preferred)
            w = project_onto_simplex(w - self.lr * velocity)
        self._state = w
        return (w + self.lambda_ * preferred) / (1 + self.lambda_)
