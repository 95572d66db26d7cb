"""A tiny multi-task model, its task losses and a short training run, shared by the tests of the
methods that weight task losses (GradNorm, IMTL, DB-MTL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import Aggregator

M = 3
"""Number of tasks."""


class TinyMultiTask(nn.Module):
    """A trunk 4-6-5 (tanh) and ``M`` linear heads, initialised from seed 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(M))

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def task_losses(model: nn.Module, step: int, scales: Sequence[float]) -> Tensor:
    """The ``M`` mean squared errors of batch ``step``, the targets of task ``i`` scaled by
    ``scales[i]`` (so that the tasks' losses differ in size)."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=generator)
    y = torch.randn(16, M, generator=generator) * torch.tensor(scales)
    return ((model(x) - y) ** 2).mean(dim=0)


def trained_in_mode(
    method: Callable[[], Aggregator],
    mode: str,
    lr: float,
    losses: Callable[[nn.Module, int], Tensor],
) -> list[Tensor]:
    """The parameters of a `TinyMultiTask` after 3 steps of SGD with ``method`` in ``mode``
    (jacobian or gramian, with one loss per task: ``batch_dim=None``)."""
    model = TinyMultiTask()
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        method(),
        mode=mode,
        modules=model,
        batch_dim=None,
    )
    for step in range(3):
        optimizer.zero_grad()
        optimizer.step(losses(model, step))
    assert optimizer.resolved_mode == mode
    return [p.detach() for p in model.parameters()]
