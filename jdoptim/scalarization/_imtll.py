from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.registry import register
from jdoptim.scalarization._bases import LearnedPerObjective


@register(
    name="scalarization.imtll",
    paper="https://openreview.net/forum?id=IMeaOyxa0cW",
    stateful=True,
)
class IMTLL(LearnedPerObjective):
    r"""IMTL-L, the loss balance of Impartial Multi-Task Learning (Liu et al., *Towards Impartial
    Multi-task Learning*, ICLR 2021,
    [openreview IMeaOyxa0cW](https://openreview.net/forum?id=IMeaOyxa0cW)): each objective has a
    trainable scale parameter $s_i$, and

    $$ s(L) = \sum_{i=1}^m \left(e^{s_i} L_i - s_i\right). $$

    For fixed losses the minimiser is $s_i = -\log L_i$, where every scaled loss
    $e^{s_i} L_i$ equals 1: the losses are balanced. Up to the sign of $s$ and a factor 2 this is
    `UW`. The gradient-balancing half of the paper is the `jdoptim.IMTLG` aggregator.

    The scales are learnt with the model: **add ``scalarizer.parameters()`` to the optimizer**
    (the inner optimizer of a `jdoptim.JDOptimizer`). They are stored in ``log_scale`` and saved
    in ``state_dict()``; `reset` sets them back to 0.

    Args:
        m: The number of objectives. With ``None`` it is learnt at the first call, where the
            scales are created on the losses' device; they can still be handed to the
            optimizer before that call. When given, they are created on the CPU, to be moved
            with ``.to(device)``. Calling with another number of losses raises.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import IMTLL
        >>> scalarizer = IMTLL()
        >>> scalarizer(torch.tensor([1.0, 2.0]))  # at s = 0: the sum of the losses
        tensor(3., grad_fn=<SubBackward0>)
    """

    _parameter_name = "log_scale"

    def _scalarize(self, losses: Tensor) -> Tensor:
        log_scale = self._parameter(losses)
        return torch.exp(log_scale) @ losses - log_scale.sum()
