"""Reductions over a ``torch.distributed`` process group, so that every rank applies the same
Jacobian descent update.

Under data parallelism each rank computes the Jacobian of its own losses. Before aggregating,
`JDOptimizer` makes every rank hold the Jacobian of the global batch: the average of the local
Jacobians when every rank has the same objectives (task losses averaged over the local batch, as
``DistributedDataParallel`` averages gradients), or the local rows stacked in rank order when
every rank has its own objectives (one loss per sample). Aggregating the same matrix everywhere
then gives the same update everywhere, equal to one process stepping on the global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup


def default_process_group() -> ProcessGroup | None:
    """The default process group when ``torch.distributed`` is initialised with several ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.group.WORLD if dist.get_world_size() > 1 else None


def disable_ddp_sync(module: nn.Module) -> None:
    """Turn off the gradient all-reduce of a ``DistributedDataParallel`` module.

    `JDOptimizer` computes gradients with ``torch.autograd.grad``, which runs none of DDP's
    hooks, and reduces the Jacobian itself: DDP's all-reduce never runs. Turning its
    synchronisation off skips the bookkeeping DDP does at each forward pass for a backward pass
    that never comes. Modules that are not DDP wrappers are left alone.
    """
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module.require_backward_grad_sync = False


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def synchronise(
    matrix: Tensor | None,
    others: list[Tensor],
    finite: bool,
    stack_rows: bool,
    group: ProcessGroup,
) -> tuple[Tensor | None, list[Tensor], bool]:
    """Make every rank hold the global Jacobian, gradients and finiteness flag.

    Args:
        matrix: The local Jacobian ``[m, n]`` of the aggregated parameters, if any.
        others: The local gradients of the other parameters, averaged over ranks.
        finite: Whether everything local is finite; the result is the AND over ranks.
        stack_rows: Stack the local rows in rank order instead of averaging the matrices.
        group: The process group.

    Returns:
        The global matrix, the averaged gradients and the global finiteness flag.

    Raises:
        ValueError: On every rank, if the ranks' matrices do not have the same shape.
    """
    world = dist.get_world_size(group)
    reference = matrix if matrix is not None else (others[0] if others else torch.zeros(0))
    shape = torch.tensor(
        [-1, -1] if matrix is None else list(matrix.shape), device=reference.device
    )
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise ValueError(
            "The ranks have Jacobians of different shapes "
            f"{[tuple(s.tolist()) for s in shapes]}; every rank must compute the same number of "
            "losses with the same parameters."
        )
    flag = torch.tensor([1.0 if finite else 0.0], dtype=reference.dtype, device=reference.device)
    averaged = [flag, *others]
    if matrix is not None and not stack_rows:
        averaged.append(matrix)
    buffer = _flat([t.to(reference.dtype) for t in averaged])
    dist.all_reduce(buffer, group=group)
    pieces = torch.split(buffer, [t.numel() for t in averaged])
    global_finite = bool(pieces[0] == world)
    reduced = [
        (piece / world).view_as(t).to(t.dtype) for piece, t in zip(pieces, averaged, strict=True)
    ]
    others = reduced[1 : 1 + len(others)]
    if matrix is not None and stack_rows:
        rows = [torch.empty_like(matrix) for _ in range(world)]
        dist.all_gather(rows, matrix.contiguous(), group=group)
        matrix = torch.cat(rows)
    elif matrix is not None:
        matrix = reduced[-1]
    return matrix, others, global_finite
