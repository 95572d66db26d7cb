from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.registry import register
from jdoptim.scalarization._bases import LearnedPerObjective


@register(name="scalarization.uw", paper="https://arxiv.org/abs/1705.07115", stateful=True)
class UW(LearnedPerObjective):
    r"""Uncertainty Weighting (Kendall, Gal and Cipolla, *Multi-Task Learning Using Uncertainty
    to Weigh Losses for Scene Geometry and Semantics*, Eq. 7,
    [arXiv 1705.07115](https://arxiv.org/abs/1705.07115)): each objective has a trainable
    log-variance $s_i = \log \sigma_i^2$, and

    $$ s(L) = \sum_{i=1}^m \left(\tfrac12 e^{-s_i} L_i + \tfrac12 s_i\right). $$

    The log-variances are learnt with the model: **add ``scalarizer.parameters()`` to the
    optimizer** (the inner optimizer of a `jdoptim.JDOptimizer`), otherwise they stay at their
    initial value $0$ (uniform weights). For a fixed loss the minimiser is $s_i = \log L_i$.
    They are stored in ``log_var`` and saved in ``state_dict()``; `reset` sets them back to 0.

    Args:
        m: The number of objectives. With ``None`` it is learnt at the first call, where the
            log-variances are created on the losses' device; they can still be handed to the
            optimizer before that call. When given, they are created on the CPU, to be moved
            with ``.to(device)``. Calling with another number of losses raises.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import UW
        >>> model = torch.nn.Linear(3, 2)
        >>> scalarizer = UW()
        >>> optimizer = torch.optim.SGD([*model.parameters(), *scalarizer.parameters()], lr=0.1)
        >>> losses = model(torch.randn(8, 3)).pow(2).mean(dim=0)
        >>> optimizer.zero_grad()
        >>> scalarizer(losses).backward()
        >>> optimizer.step()
        >>> scalarizer.log_var.shape
        torch.Size([2])
    """

    _parameter_name = "log_var"

    def _scalarize(self, losses: Tensor) -> Tensor:
        log_var = self._parameter(losses)
        return 0.5 * (torch.exp(-log_var) @ losses + log_var.sum())
