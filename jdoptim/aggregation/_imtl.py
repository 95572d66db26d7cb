from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_positive,
)
from jdoptim.aggregation._imtlg import imtlg_weights
from jdoptim.registry import register

_PAPER = "https://openreview.net/forum?id=IMeaOyxa0cW"


@register(paper=_PAPER, stateful=True, permutation_invariant=True)
class IMTLWeighting(Weighting):
    r"""IMTL's weights on the unscaled gradients, $w_i = e^{s_i} \alpha_i$, with $\alpha$ the
    IMTL-G weights of the scaled gradients $e^{s_i} g_i$; each call then takes IMTL-L's step
    on the scales $s$ (see `IMTL`).

    Args:
        lr: The step size of the gradient step on the scales.
    """

    needs_losses = True
    lr = Argument(check_positive)

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self._log_scales: Tensor | None = None

    @property
    def log_scales(self) -> Tensor | None:
        """The scales $s$ of the next call, ``[m]`` (``None`` before the first call: 0)."""
        return self._log_scales

    def reset(self) -> None:
        """Set the scales back to 0."""
        self._log_scales = None

    def head_weights(self, losses: Tensor) -> Tensor | None:
        return None if self._log_scales is None else self._log_scales.exp()

    def report(self) -> dict[str, Tensor]:
        return {} if self._log_scales is None else {"loss_scales": self._log_scales.exp()}

    def get_extra_state(self) -> Any:
        return self._log_scales

    def set_extra_state(self, state: Any) -> None:
        self._log_scales = None if state is None else state.clone()

    def _weights(self, matrix: Tensor, losses: Tensor) -> Tensor:  # type: ignore[override]
        m = matrix.shape[0]
        G = matrix.to(torch.float64)
        if self._log_scales is None or self._log_scales.shape[0] != m:
            log_scales = G.new_zeros(m)
        else:
            log_scales = self._log_scales.to(G)
        scales = log_scales.exp()
        alpha = imtlg_weights(G * scales[:, None] * scales[None, :], matrix.dtype)
        losses = losses.to(G)
        # IMTL-L: one gradient step on Σ_i (e^{s_i} L_i - s_i), whose gradient is e^{s_i} L_i - 1.
        self._log_scales = log_scales - self.lr * (scales * losses - 1.0)
        return alpha * scales


@register(paper=_PAPER, stateful=True, permutation_invariant=True)
class IMTL(GramianWeightedAggregator):
    r"""Impartial Multi-Task Learning, the whole method (Liu et al., *Towards Impartial
    Multi-task Learning*, ICLR 2021,
    [openreview.net/forum?id=IMeaOyxa0cW](https://openreview.net/forum?id=IMeaOyxa0cW)): IMTL-L
    balances the losses' scales, IMTL-G the gradients of the scaled losses.

    Each loss has a scale $s_i$ and is replaced by $e^{s_i} L_i - s_i$ (IMTL-L; see
    `jdoptim.scalarization.IMTLL` for that half alone). The shared parameters are updated by
    IMTL-G (see `IMTLG`) on the gradients of the scaled losses, $e^{s_i} g_i$:

    $$
    \mathcal A(J) = \sum_i \alpha_i\, e^{s_i} g_i,\qquad
    \alpha = \text{IMTL-G weights of } \operatorname{diag}(e^{s}) J,
    $$

    the task heads (with ``shared_params`` in `jdoptim.JDOptimizer`) receive the gradient of
    $\sum_i e^{s_i} L_i$, and the scales take one gradient step on $\sum_i (e^{s_i} L_i -
    s_i)$: $s_i \leftarrow s_i - \eta\, (e^{s_i} L_i - 1)$, which drives every scaled loss
    $e^{s_i} L_i$ towards 1. The scales start at 0. The paper (and LibMTL's ``IMTL``, where
    they are parameters of the model) trains them with the network's optimizer; here they take
    plain gradient steps of size ``lr`` inside the aggregator, so no second optimizer is needed
    in the training loop, and their step does not follow the network's learning rate.

    The method needs the values of the losses, which `jdoptim.JDOptimizer` passes (a direct
    call is ``IMTL()(J, losses=losses)``), and only the Gramian besides, so it runs in gramian
    mode too. The scales are in ``state_dict()``; `reset` sets them back to 0. The scales
    $e^{s}$ of the next step are in the diagnostics' ``method_state["loss_scales"]``.

    Args:
        lr: The step size $\eta > 0$ of the scales' gradient step.

    Examples:
        >>> import torch
        >>> from jdoptim import IMTL
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> aggregator = IMTL(lr=0.5)
        >>> aggregator(J, losses=torch.tensor([2.0, 0.5]))  # s = 0: IMTL-G's update
        tensor([0.0767, 1.0000, 1.0000], dtype=torch.float64)
        >>> aggregator.weighting.log_scales  # s - 0.5 (L - 1)
        tensor([-0.5000,  0.2500], dtype=torch.float64)
    """

    weighting: IMTLWeighting

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(IMTLWeighting(lr))
