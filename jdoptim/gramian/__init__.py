"""Gramian mode: the Gramian of many losses, and their weighted gradient, without the Jacobian.

Instance-wise risk minimisation (one loss per sample) and instance-wise multi-task learning
(one loss per sample and task) have as many objectives as samples, where storing the Jacobian
costs ``m`` times the model's size. `GramianEngine` hooks the model's layers and builds the
``m × m`` Gramian from what one backward pass to the layers' outputs already holds, then writes
the weighted gradient ``Σ_k w_k ∇L_k`` into ``.grad`` from the same quantities.

Examples:
    >>> import torch
    >>> from torch import nn
    >>> from jdoptim import UPGradWeighting
    >>> from jdoptim.gramian import GramianEngine
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> engine = GramianEngine(model)
    >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    >>> losses = nn.functional.cross_entropy(model(x), y, reduction="none")  # [6]
    >>> G = engine.gramian(losses)  # [6, 6], without the Jacobian
    >>> engine.backward(UPGradWeighting()(G))  # Σ_k w_k ∇L_k into every .grad
    >>> [p.grad.shape for p in model.parameters()]
    [torch.Size([8, 3]), torch.Size([8]), torch.Size([2, 8]), torch.Size([2])]
"""

from jdoptim.gramian._engine import (
    GramianEngine,
    find_problems,
    gramian_backward,
    is_supported,
)

__all__ = ["GramianEngine", "find_problems", "gramian_backward", "is_supported"]
