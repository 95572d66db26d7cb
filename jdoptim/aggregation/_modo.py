from __future__ import annotations

from typing import Any

from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    Weighting,
    check_non_negative,
    check_positive,
    solve_dtype,
)
from jdoptim.linalg._simplex import project_onto_simplex
from jdoptim.registry import register


class CrossBatchWeighting(Weighting):
    """A stateful weighting of a square ``[m, m]`` matrix whose state is a vector of ``m``
    weights, re-initialised to ``1/m`` when ``m`` changes, and saved in ``state_dict()``."""

    def __init__(self) -> None:
        super().__init__()
        self._state: Tensor | None = None

    def reset(self) -> None:
        """Forget the weights carried over from the previous calls."""
        self._state = None

    def _previous(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        if self._state is None or self._state.shape[0] != m:
            return matrix.new_full((m,), 1.0 / m)
        return self._state.to(dtype=matrix.dtype, device=matrix.device)

    def get_extra_state(self) -> Any:
        return self._state

    def set_extra_state(self, state: Any) -> None:
        self._state = None if state is None else state.clone()


@register(paper="https://arxiv.org/abs/2305.20057", stateful=True)
class MoDoWeighting(CrossBatchWeighting):
    r"""Multi-objective gradient with double sampling (Chen et al., *Three-Way Trade-Off
    in Multi-Objective Learning: Optimization, Generalization and Conflict-Avoidance*, NeurIPS
    2023, [arXiv 2305.20057](https://arxiv.org/abs/2305.20057), Equation 2.9a).

    One projected gradient step on MGDA's objective $\frac12 \lVert J^\top \lambda \rVert^2$
    (plus $\frac\rho2 \lVert \lambda \rVert^2$), its gradient estimated without bias from two
    independent batches:

    $$
    \lambda_{t+1} = \Pi_{\Delta}\bigl(\lambda_t - \gamma\,(J_1 J_2^\top \lambda_t
        + \rho\, \lambda_t)\bigr),
    $$

    with $\Pi_\Delta$ the Euclidean projection onto the simplex and $\lambda_0$ uniform.
    The new weights $\lambda_{t+1}$ are returned and kept for the next call.

    How to feed it: the input is **not** the Gramian of one batch but the cross-batch matrix
    $A = J_1 J_2^\top$ (shape ``[m, m]``, not symmetric in general) of the Jacobians of the
    same $m$ losses on two independent mini-batches; the parameters are then updated with a
    third independent batch (or, as in the authors' code, the sum of the first two):

    ```python
    from jdoptim.functional import jacobian, stack_jacobians

    params = [p for p in model.parameters() if p.requires_grad]
    for (x1, y1), (x2, y2), (x3, y3) in batches:  # three independent draws
        J1 = stack_jacobians(jacobian(losses(model(x1), y1), params))  # [m, n]
        J2 = stack_jacobians(jacobian(losses(model(x2), y2), params))  # [m, n]
        weights = weighting(J1 @ J2.T)  # [m], no gradient
        optimizer.zero_grad()
        (weights @ losses(model(x3), y3)).backward()  # the update J3ᵀ weights
        optimizer.step()
    ```

    (every parameter in ``params`` must be used by every batch's losses, so that
    `jdoptim.functional.jacobian` returns no ``None``). Given the Gramian
    $J J^\top$ of a single batch instead, for example inside a `GramianWeightedAggregator`
    or a `JDOptimizer`, it still runs, but then the weights and the update use the same
    sample and the method's unbiasedness guarantee is lost.

    State: $\lambda_t$ (a vector of $m$ weights) persists across calls and travels in
    ``state_dict()``; ``reset()`` goes back to uniform weights, and so does a change of $m$.
    Some TorchJD versions take a softmax instead of the projection; this follows the paper and
    the authors' code.

    Args:
        gamma: Step size $\gamma > 0$ of the weights.
        rho: Regularisation $\rho \ge 0$.

    Examples:
        >>> import torch
        >>> from jdoptim import MoDoWeighting
        >>> J1 = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> J2 = torch.tensor([[-3.0, 1.0, 0.0], [5.0, 0.0, 1.0]])
        >>> weighting = MoDoWeighting(gamma=0.01)
        >>> weighting(J1 @ J2.T)
        tensor([0.5500, 0.4500])
        >>> weighting(J1 @ J2.T)
        tensor([0.5800, 0.4200])
    """

    gamma = Argument(check_positive)
    rho = Argument(check_non_negative)

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma
        self.rho = rho

    def _weights(self, matrix: Tensor) -> Tensor:
        matrix = matrix.to(solve_dtype(matrix.dtype))
        previous = self._previous(matrix)
        step = matrix @ previous + self.rho * previous
        self._state = project_onto_simplex(previous - self.gamma * step)
        return self._state.clone()
