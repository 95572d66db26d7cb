"""Plain functions under `JDOptimizer`: loss vectors, Jacobians, and Jacobian to update.

Users can call them directly to build their own Jacobian descent loop:

Examples:
    >>> import torch
    >>> from jdoptim import UPGrad
    >>> from jdoptim.functional import aggregate, jacobian
    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> losses = torch.stack([w[0] ** 2, (w[1] - w[0]) ** 2])
    >>> (J,) = jacobian(losses, [w])
    >>> J
    tensor([[ 2.,  0.],
            [-2.,  2.]])
    >>> aggregate([J], UPGrad())
    [tensor([0.5000, 1.5000])]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim._split import jacobian_matrix, split
from jdoptim.aggregation import Aggregator


def as_loss_vector(losses: Tensor | Sequence[Tensor]) -> Tensor:
    """Flatten losses into a vector of ``m ≥ 1`` objectives.

    Args:
        losses: A tensor of any shape with at least one dimension (for example ``[m]`` or
            ``[batch, tasks]``), or a sequence of one-element tensors.

    Returns:
        A 1-D tensor of the ``m`` losses, still attached to the autograd graph.

    Raises:
        TypeError: If ``losses`` is neither a tensor nor a sequence of tensors.
        ValueError: If it is 0-d, empty, or holds tensors with more than one element.
    """
    if isinstance(losses, Tensor):
        if losses.ndim == 0:
            raise ValueError(
                f"losses is a 0-d tensor ({losses!r}); Jacobian descent needs a vector of "
                "losses: pass losses.unsqueeze(0) for a single objective, or a vector of several."
            )
        vector = losses.reshape(-1)
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        if not all(isinstance(loss, Tensor) for loss in losses):
            kinds = sorted({type(loss).__name__ for loss in losses})
            raise TypeError(f"losses must be tensors, got a sequence of {', '.join(kinds)}.")
        sizes = [loss.numel() for loss in losses]
        if any(size != 1 for size in sizes):
            raise ValueError(
                f"A sequence of losses must hold one-element tensors, got numels {sizes}."
            )
        vector = torch.stack([loss.reshape(()) for loss in losses]) if losses else None
    else:
        raise TypeError(
            f"losses must be a tensor or a sequence of tensors, got {type(losses).__name__}."
        )
    if vector is None or vector.numel() == 0:
        raise ValueError("losses is empty; Jacobian descent needs at least one loss.")
    if not vector.is_floating_point():
        raise TypeError(f"losses must have a floating dtype, got {vector.dtype}.")
    return vector


def jacobian(
    outputs: Tensor,
    inputs: Sequence[Tensor],
    *,
    chunk_size: int | None = None,
    retain_graph: bool = False,
    batched: bool = True,
) -> list[Tensor | None]:
    """Jacobian of a vector of outputs with respect to several tensors.

    With ``batched=True`` the ``m`` vector-Jacobian products run as one batched backward pass
    (``torch.autograd.grad(..., is_grads_batched=True)``, vectorised by vmap), in chunks of
    ``chunk_size`` rows to bound memory; with ``batched=False`` they run one by one, for graphs
    that vmap cannot batch.

    Args:
        outputs: The 1-D vector of ``m`` outputs.
        inputs: Tensors that require grad.
        chunk_size: Rows per backward pass; ``None`` for all ``m`` at once.
        retain_graph: Keep the graph for a later backward pass.
        batched: Use the batched backward pass.

    Returns:
        For each input, its Jacobian of shape ``[m, *input.shape]``, or ``None`` if no output
        depends on it.
    """
    check_chunk_size(chunk_size)
    m = outputs.shape[0]
    step = 1 if not batched else (m if chunk_size is None else chunk_size)
    identity = torch.eye(m, dtype=outputs.dtype, device=outputs.device)
    chunks: list[Sequence[Tensor | None]] = []
    for start in range(0, m, step):
        keep = retain_graph or start + step < m
        rows = identity[start : start + step]
        if batched:
            grads = torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=rows,
                retain_graph=keep,
                allow_unused=True,
                is_grads_batched=True,
            )
        else:
            grads = torch.autograd.grad(
                outputs, inputs, grad_outputs=rows[0], retain_graph=keep, allow_unused=True
            )
            grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
        chunks.append(grads)
    return [
        None if per_chunk[0] is None else _concatenate(per_chunk)
        for per_chunk in zip(*chunks, strict=True)
    ]


def check_chunk_size(chunk_size: int | None) -> int | None:
    """Raise unless ``chunk_size`` is ``None`` or an integer ≥ 1; return it."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"Invalid chunk_size value: {chunk_size!r}; expected an integer >= 1.")
    return chunk_size


def _concatenate(pieces: Sequence[Tensor | None]) -> Tensor:
    # A single chunk is returned as it is: concatenating it would copy the whole Jacobian.
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces))  # type: ignore[arg-type]


def stack_jacobians(jacobians: Sequence[Tensor]) -> Tensor:
    """Concatenate per-tensor Jacobians ``[m, *shape]`` into one matrix ``[m, n]``.

    Tensors of different dtypes are promoted to a common one.

    Raises:
        ValueError: If ``jacobians`` is empty.
    """
    if not jacobians:
        raise ValueError("jacobians is empty; pass the Jacobian of at least one tensor.")
    dtype = jacobians[0].dtype
    for jac in jacobians[1:]:
        dtype = torch.promote_types(dtype, jac.dtype)
    m = jacobians[0].shape[0]
    return torch.cat([jac.reshape(m, -1).to(dtype) for jac in jacobians], dim=1)


def split_update(update: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat update ``[n]`` into tensors shaped and typed like ``like``."""
    pieces = torch.split(update, [t.numel() for t in like])
    return [piece.view(t.shape).to(t.dtype) for piece, t in zip(pieces, like, strict=True)]


def accumulate_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Add each gradient into its parameter's ``.grad``, creating it if absent, as autograd does."""
    for param, grad in zip(params, grads, strict=True):
        if param.grad is None:
            param.grad = grad.to(param.dtype)
        else:
            param.grad.add_(grad)


def aggregate(jacobians: Sequence[Tensor], aggregator: Aggregator) -> list[Tensor]:
    """Aggregate per-tensor Jacobians into one update per tensor.

    Args:
        jacobians: Jacobians of shape ``[m, *shape]``, all with the same ``m``.
        aggregator: Maps the ``[m, n]`` matrix of all of them side by side to an update.

    Returns:
        The update for each tensor, with shape ``shape``.

    Raises:
        ValueError: If ``jacobians`` is empty.
    """
    matrix = stack_jacobians(jacobians)
    update = aggregator(matrix)
    return split_update(update, [jac[0] for jac in jacobians])


def jacobian_to_grad(
    params: Sequence[Tensor], jacobians: Sequence[Tensor], aggregator: Aggregator
) -> None:
    """Aggregate the parameters' Jacobians and add the update into their ``.grad``.

    Args:
        params: The parameters.
        jacobians: Their Jacobians, of shape ``[m, *param.shape]``, as `jacobian` returns them.
        aggregator: Maps the ``[m, n]`` matrix of all of them side by side to an update.
    """
    accumulate_grads(params, aggregate(jacobians, aggregator))


def multi_task_backward(
    losses: Tensor | Sequence[Tensor],
    shared_params: Sequence[Tensor],
    aggregator: Aggregator,
    task_params: Sequence[Tensor] = (),
    *,
    chunk_size: int | None = None,
    retain_graph: bool = False,
) -> None:
    """Jacobian descent on the shared parameters, ordinary gradients for the task parameters.

    The Jacobian of the losses with respect to ``shared_params`` is aggregated into their
    ``.grad``; each of ``task_params`` receives the gradient of the sum of the losses, so a
    task head gets its own task's gradient. The graph is cut where it enters the part that
    leads only to shared parameters: the heads are differentiated once, by one ordinary
    backward pass, and only the shared part is batched over the losses (TorchJD's ``features``
    argument is found from the graph). `jdoptim.JDOptimizer` with ``shared_params`` does the
    same inside an optimizer.

    Args:
        losses: The task losses (any shape, flattened to ``m``), or a sequence of scalars.
        shared_params: The parameters shared by the tasks (the trunk).
        aggregator: Maps the shared parameters' Jacobian ``[m, n]`` to an update ``[n]``.
        task_params: The task-specific parameters (the heads).
        chunk_size: Losses per batched backward pass, as in `jacobian`.
        retain_graph: Keep the autograd graph for another backward pass.

    Raises:
        ValueError: If ``chunk_size`` is not ``None`` or an integer ≥ 1.

    Examples:
        >>> import torch
        >>> from jdoptim import UPGrad
        >>> from jdoptim.functional import multi_task_backward
        >>> _ = torch.manual_seed(0)
        >>> trunk, heads = torch.nn.Linear(4, 3), [torch.nn.Linear(3, 1) for _ in range(2)]
        >>> features = trunk(torch.randn(8, 4))
        >>> losses = torch.stack([head(features).pow(2).mean() for head in heads])
        >>> head_params = [p for head in heads for p in head.parameters()]
        >>> multi_task_backward(losses, list(trunk.parameters()), UPGrad(), head_params)
        >>> trunk.weight.grad.shape, heads[1].bias.grad.shape
        (torch.Size([3, 4]), torch.Size([1]))
    """
    check_chunk_size(chunk_size)
    vector = as_loss_vector(losses)
    rows = torch.eye(vector.shape[0], dtype=vector.dtype, device=vector.device)
    options = {"chunk_size": chunk_size, "retain_graph": retain_graph}
    cut = split(vector, rows, shared_params, task_params, **options)
    if cut.boundary:
        matrix, reached = jacobian_matrix(
            cut.boundary, shared_params, cut.cotangents, batched=not cut.convolutions, **options
        )
        if matrix is not None:
            shared = [p for p, hit in zip(shared_params, reached, strict=True) if hit]
            accumulate_grads(shared, split_update(aggregator(matrix), shared))
    accumulate_grads(list(cut.own), list(cut.own.values()))
