from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Aggregator,
    Argument,
    all_finite,
    check_fraction,
    check_non_negative,
    one_of,
    solve_dtype,
)
from jdoptim.aggregation._dbmtl import row_norms
from jdoptim.linalg import project_onto_simplex
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2210.12624"
WeightUpdate = Literal["projection", "softmax"]
WEIGHT_UPDATES: tuple[str, ...] = ("projection", "softmax")
Normalization = Literal["none", "loss"]
NORMALIZATIONS: tuple[str, ...] = ("none", "loss")


@register(paper=_PAPER, stateful=True, permutation_invariant=True)
class MoCo(Aggregator):
    r"""Multi-objective gradient with Correction (Fernando et al., *Mitigating Gradient Bias
    in Multi-objective Learning: A Provably Convergent Approach*, ICLR 2023,
    [arXiv 2210.12624](https://arxiv.org/abs/2210.12624)).

    MGDA's weights computed from one mini-batch are biased; MoCo tracks each objective's
    gradient with a moving average $y_i$ and moves the weights $\lambda$ by one projected
    gradient step per call instead of solving for them (its Algorithm 1): at call $t$,

    $$
    y_i \leftarrow y_i - \beta_t\, (y_i - g_i),\qquad
    \lambda \leftarrow \Pi_{\Delta_m}\big(\lambda - \gamma_t\, (Y Y^\top + \rho I)\, \lambda\big),
    \qquad \mathcal A(J) = Y^\top \lambda,
    $$

    with $Y$ the matrix of rows $y_i$ (after their update), $\beta_t = \beta / t^{\sigma_\beta}$,
    $\gamma_t = \gamma / t^{\sigma_\gamma}$, $y^{(0)} = 0$, $\lambda^{(0)} = \mathbf 1/m$ and
    $\Pi_{\Delta_m}$ the Euclidean projection onto the probability simplex. The weights are
    trained inside the aggregator with the step sizes $\gamma_t$; no second optimizer is needed
    in the training loop.

    The defaults are those of LibMTL's ``MoCo`` (built from the authors' code): $\beta = 0.5$,
    $\sigma_\beta = 0.5$, $\gamma = 0.1$, $\sigma_\gamma = 0.5$, $\rho = 0$. Where LibMTL departs
    from the paper, the departure is an option: ``weight_update="softmax"`` replaces the
    projection by $\lambda \leftarrow \operatorname{softmax}(\lambda - \gamma_t (Y Y^\top +
    \rho I) \lambda)$, and ``normalization="loss"`` rescales each gradient to the norm of its
    loss, $g_i \leftarrow L_i\, g_i / \lVert g_i \rVert$ (a zero gradient stays zero), before
    it is tracked; both together reproduce LibMTL. The paper's projection of $y_i$ onto a ball
    of radius $L_i$ (its bounded-gradient assumption) is omitted, as in the authors' code. The
    step on $\lambda$ is in the units of $\lVert g \rVert^2$, so $\gamma$ depends on the scale of
    the gradients, as in the paper.

    State: the tracked gradients $Y$ (an ``[m, n]`` tensor, as large as the Jacobian), the
    weights $\lambda$ and the number of calls, in ``state_dict()``; a Jacobian of another shape
    restarts them; `reset` clears them. The weights $\lambda$ of the last call are in
    ``weights`` and in the diagnostics' ``method_state["lambda"]``.

    Args:
        beta: The rate $\beta \in [0, 1]$ of the tracking of the gradients.
        beta_sigma: The decay $\sigma_\beta \ge 0$ of that rate over calls.
        gamma: The step size $\gamma \ge 0$ of the weights.
        gamma_sigma: The decay $\sigma_\gamma \ge 0$ of that step size over calls.
        rho: The $\ell_2$ regularisation $\rho \ge 0$ of the weights' step.
        weight_update: ``"projection"`` (the paper) or ``"softmax"`` (LibMTL).
        normalization: ``"none"`` (the paper) or ``"loss"`` (LibMTL: each gradient rescaled to
            the norm of its loss; the method then needs the values of the losses, which
            `jdoptim.JDOptimizer` passes).

    Examples:
        >>> import torch
        >>> from jdoptim import MoCo
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> aggregator = MoCo(beta=1.0, gamma=0.1)
        >>> aggregator(J)  # y = J; λ = Π(0.5 - 0.1 G λ) = (0.575, 0.425)
        tensor([0.5750, 0.8500], dtype=torch.float64)
        >>> aggregator.weights
        tensor([0.5750, 0.4250], dtype=torch.float64)
    """

    column_state = True
    beta = Argument(check_fraction)
    beta_sigma = Argument(check_non_negative)
    gamma = Argument(check_non_negative)
    gamma_sigma = Argument(check_non_negative)
    rho = Argument(check_non_negative)
    weight_update = Argument(one_of(WEIGHT_UPDATES))
    normalization = Argument(one_of(NORMALIZATIONS))

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        weight_update: WeightUpdate = "projection",
        normalization: Normalization = "none",
    ) -> None:
        super().__init__()
        self.beta = beta
        self.beta_sigma = beta_sigma
        self.gamma = gamma
        self.gamma_sigma = gamma_sigma
        self.rho = rho
        self.weight_update = weight_update
        self.normalization = normalization
        self.reset()

    @property  # type: ignore[override]
    def needs_losses(self) -> bool:  # type: ignore[override]
        """Whether the gradients are rescaled to the losses (``normalization="loss"``)."""
        return self.normalization == "loss"

    def reset(self) -> None:
        """Forget the tracked gradients and return to uniform weights."""
        self._tracked: Tensor | None = None
        self._weights: Tensor | None = None
        self._calls = 0

    @property
    def tracked(self) -> Tensor | None:
        """The tracked gradients $Y$, ``[m, n]`` (``None`` before the first call)."""
        return self._tracked

    @property
    def weights(self) -> Tensor | None:
        r"""The weights $\lambda$ of the last call, ``[m]`` (``None`` before the first call)."""
        return self._weights

    def report(self) -> dict[str, Tensor]:
        return {} if self._weights is None else {"lambda": self._weights}

    def get_extra_state(self) -> Any:
        return {
            "tracked": self._tracked,
            "weights": self._weights,
            "calls": torch.tensor(self._calls),
        }

    def set_extra_state(self, state: Any) -> None:
        self._tracked = None if state["tracked"] is None else state["tracked"].clone()
        self._weights = None if state["weights"] is None else state["weights"].clone()
        self._calls = int(state["calls"])

    def _aggregate(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        finite = all_finite(matrix) if losses is None else all_finite(matrix) & all_finite(losses)
        if not bool(finite):
            return matrix.new_full(matrix.shape[1:], torch.nan)  # and no state changes
        m = matrix.shape[0]
        dtype = solve_dtype(matrix.dtype)
        gradients = matrix.to(dtype)
        if losses is not None:
            norms = row_norms(gradients)
            factors = losses.to(dtype=torch.float64, device=matrix.device) / norms.double()
            factors = torch.where(norms > 0, factors, 0.0)
            gradients = (gradients.double() * factors[:, None]).to(dtype)
        if self._tracked is None or self._tracked.shape != matrix.shape:
            self.reset()
            tracked = torch.zeros_like(gradients)
            weights = gradients.new_full((m,), 1.0 / m, dtype=torch.float64)
        else:
            tracked = self._tracked.to(gradients)
            weights = self._weights.to(dtype=torch.float64, device=gradients.device)  # type: ignore[union-attr]
        self._calls += 1
        tracked = tracked - self.beta / self._calls**self.beta_sigma * (tracked - gradients)
        # Y Yᵀ in float64, from the rows scaled to at most 1: it cannot overflow.
        scale = tracked.abs().max()
        scale = torch.where(scale > 0, scale, 1.0)
        unit = tracked / scale
        gramian = (unit @ unit.T).double() * scale.double() ** 2
        step = self.gamma / self._calls**self.gamma_sigma
        moved = weights - step * (gramian @ weights + self.rho * weights)
        if self.weight_update == "softmax":
            weights = torch.softmax(moved, dim=0)
        else:
            weights = project_onto_simplex(moved)
        self._tracked = tracked
        self._weights = weights.to(dtype)
        return (weights.to(dtype) @ tracked).to(matrix.dtype)
