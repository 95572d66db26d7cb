"""Reductions over a ``torch.distributed`` process group, so that every rank applies the same
Jacobian descent update.

Under data parallelism each rank computes the Jacobian of its own losses. Before aggregating,
`JDOptimizer` makes every rank hold the Jacobian of the global batch: the average of the local
Jacobians when every rank has the same objectives (task losses averaged over the local batch, as
``DistributedDataParallel`` averages gradients), or the local rows stacked in rank order when
every rank has its own objectives (one loss per sample). Aggregating the same matrix everywhere
then gives the same update everywhere, equal to one process stepping on the global batch.

Under sharding (``torch.distributed.fsdp.fully_shard``), each rank holds a shard of every
parameter, as a ``DTensor``. `Sharding` describes how, and reduces the small quantities the ranks
must agree on (the ``m × m`` Gramian, the finiteness of a step, the number of losses) over the
ranks of the device mesh.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from jdoptim.optimizer import JDOptimizer


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
        others: The local gradients of the other parameters: averaged over ranks, or summed
            with ``stack_rows`` (the gradient of the sum of every rank's objectives).
        finite: Whether everything local is finite; the result is the AND over ranks.
        stack_rows: Stack the local rows in rank order instead of averaging the matrices.
        group: The process group.

    Returns:
        The global matrix, the reduced gradients and the global finiteness flag.

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
    # With stacked rows every rank's objectives are its own, and the other parameters get the
    # gradient of their sum, as one process on the global batch would give them.
    divisors = [world] * len(averaged)
    if stack_rows:
        divisors[1 : 1 + len(others)] = [1] * len(others)
    reduced = [
        (piece / divisor).view_as(t).to(t.dtype)
        for piece, t, divisor in zip(pieces, averaged, divisors, strict=True)
    ]
    others = reduced[1 : 1 + len(others)]
    if matrix is not None and stack_rows:
        rows = [torch.empty_like(matrix) for _ in range(world)]
        dist.all_gather(rows, matrix.contiguous(), group=group)
        matrix = torch.cat(rows)
    elif matrix is not None:
        matrix = reduced[-1]
    return matrix, others, global_finite


@dataclass(frozen=True)
class Sharding:
    """How the parameters of an optimizer are sharded over the ranks of one device mesh.

    Every parameter is a ``DTensor`` on ``mesh`` whose placements are ``Shard`` (each rank of
    that mesh dimension holds a disjoint part) or ``Replicate`` (each rank holds a copy), as
    ``fully_shard`` makes them: ``(Shard(0),)``, or ``(Replicate(), Shard(0))`` when it also
    replicates (HSDP).

    Attributes:
        mesh: The device mesh of every parameter.
        replicas: How many ranks hold each shard (the product of the replicated dimensions).
    """

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    replicas: int

    @property
    def size(self) -> int:
        """The number of ranks of the mesh."""
        return self.mesh.size()

    @property
    def ranks(self) -> list[int]:
        """The global ranks of the mesh, in its row-major order (the order of their data)."""
        return self.mesh.mesh.flatten().tolist()

    def all_reduce(self, tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
        """Reduce ``tensor`` in place over every rank of the mesh (one collective per mesh
        dimension), and return it."""
        for dim in range(self.mesh.ndim):
            dist.all_reduce(tensor, op=op, group=self.mesh.get_group(dim))
        return tensor

    @property
    def device(self) -> torch.device:
        """The device of the mesh's collectives (the current one of its type)."""
        return torch.device(self.mesh.device_type)

    @property
    def index(self) -> int:
        """This rank's position in `ranks`."""
        return self.ranks.index(dist.get_rank())

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated along the first dimension, in the order of
        `ranks` (one collective per mesh dimension, after one that checks the shapes).

        Raises:
            ValueError: On every rank, if the ranks' tensors do not have the same shape.
        """
        shape = list(tensor.shape)
        bounds = torch.tensor([*shape, *(-s for s in shape)], dtype=torch.float64)
        bounds = self.all_reduce(bounds.to(tensor.device), dist.ReduceOp.MAX).tolist()
        if bounds[: len(shape)] != [-b for b in bounds[len(shape) :]]:
            raise ValueError(
                f"The ranks' per-sample factors of a layer have different shapes (this rank's: "
                f"{tuple(shape)}); every rank must compute its losses on batches of the same "
                "shape (pad sequences to the same length on every rank)."
            )
        tensor = tensor.contiguous()
        for dim in reversed(range(self.mesh.ndim)):
            group = self.mesh.get_group(dim)
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, tensor, group=group)
            tensor = torch.cat(parts)
        return tensor

    def all_true(self, flag: bool | Tensor, device: torch.device) -> bool:
        """Whether ``flag`` holds on every rank."""
        value = torch.as_tensor(flag, dtype=torch.float32, device=device).reshape(1)
        return bool(self.all_reduce(value, dist.ReduceOp.MIN) > 0)

    def check_same(self, value: int, what: str, device: torch.device) -> None:
        """Raise, on every rank, unless ``value`` is the same on every rank."""
        bounds = torch.tensor([value, -value], dtype=torch.float64, device=device)
        high, low = self.all_reduce(bounds, dist.ReduceOp.MAX).tolist()
        if high != -low:
            raise ValueError(
                f"The ranks have different {what} (from {int(-low)} to {int(high)}); every rank "
                "must compute the same number of losses from the same model."
            )


# Where DTensor lives: public since torch 2.5, private before.
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def _dtensor_module() -> Any:
    """The module of ``DTensor`` and its placements, or ``None`` while it is not imported (no
    tensor can be a ``DTensor`` before; importing it costs half a second, which jdoptim spares
    users who do not shard)."""
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if getattr(module, "DTensor", None) is not None:
            return module
    return None


def dtensor_class() -> type | None:
    """``DTensor``, or ``None`` while its module is not imported."""
    module = _dtensor_module()
    return None if module is None else module.DTensor


def sharding_of(params: Sequence[Tensor]) -> Sharding | None:
    """How ``params`` are sharded, or ``None`` when none of them is a ``DTensor``.

    Raises:
        ValueError: If only some are ``DTensor``s, if they live on different device meshes, or
            if a placement is neither ``Shard`` nor ``Replicate``, or differs between them.

    Examples:
        >>> import torch
        >>> from jdoptim.distributed import sharding_of
        >>> sharding_of(list(torch.nn.Linear(2, 2).parameters())) is None  # not sharded
        True
    """
    dtensor = dtensor_class()
    sharded = [] if dtensor is None else [p for p in params if isinstance(p, dtensor)]
    if not sharded:
        return None
    Replicate, Shard = _dtensor_module().Replicate, _dtensor_module().Shard

    if len(sharded) < len(params):
        plain = next(p for p in params if not isinstance(p, dtensor))
        raise ValueError(
            f"{len(sharded)} of the optimizer's {len(params)} parameters are sharded (DTensor), "
            f"but not all: a parameter of shape {tuple(plain.shape)} is a plain tensor. Apply "
            "fully_shard to the root module as well, so that it manages every parameter."
        )
    first = sharded[0]
    mesh, placements = first.device_mesh, tuple(first.placements)
    for p in sharded:
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(
                "The optimizer's parameters are sharded differently: placements "
                f"{placements} on {mesh} and {tuple(p.placements)} on {p.device_mesh}. "
                "Jacobian descent needs every parameter on the same device mesh with the same "
                "placements, as fully_shard gives them."
            )
    unknown = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
    if unknown:
        raise ValueError(
            f"Unsupported placements {placements} of the optimizer's parameters: Jacobian "
            "descent supports parameters sharded (Shard) or replicated (Replicate) over the mesh, "
            "as fully_shard places them."
        )
    replicas = prod(
        size for size, pl in zip(mesh.shape, placements, strict=True) if isinstance(pl, Replicate)
    )
    return Sharding(mesh, replicas)


def get_state_dict(
    model: nn.Module, optimizer: JDOptimizer, *, options: StateDictOptions | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's and the optimizer's state dicts for ``torch.distributed.checkpoint``, with
    jdoptim's entry.

    ``torch.distributed.checkpoint.state_dict.get_state_dict`` keeps only the inner optimizer's
    ``"state"`` and ``"param_groups"`` (keyed by parameter names, sharded like the parameters);
    this function adds the ``"jdoptim"`` entry of `JDOptimizer.state_dict` (the aggregator's
    configuration and state, the same on every rank), serialised with ``torch.save`` as
    ``bytes``: the structure of a method's state can change during training (a random
    generator's state appears at its first draw), and ``torch.distributed.checkpoint.load``
    only fills templates whose structure matches the file. Use it in place of torch's, with
    `set_state_dict` to load.

    Args:
        model: The model, sharded with ``fully_shard`` or not.
        optimizer: The `JDOptimizer` over its parameters.
        options: Passed to torch's ``get_state_dict``.

    Returns:
        The model's state dict and the optimizer's, ready for ``torch.distributed.checkpoint.save``
        (and as templates for ``torch.distributed.checkpoint.load``).

    Examples:
        In one process (under ``torchrun``, every rank runs the same lines and writes its
        shards; ``no_dist=True`` is then left out):

        >>> import tempfile
        >>> import torch
        >>> import torch.distributed.checkpoint as dcp
        >>> from jdoptim import JDOptimizer, Random
        >>> from jdoptim.distributed import get_state_dict, set_state_dict
        >>> def build():
        ...     model = torch.nn.Linear(3, 2)
        ...     return model, JDOptimizer(torch.optim.Adam(model.parameters()), Random(seed=1))
        >>> model, optimizer = build()
        >>> optimizer.step(model(torch.randn(4, 3)).pow(2).mean(dim=0))
        >>> model_state, optim_state = get_state_dict(model, optimizer)
        >>> sorted(optim_state)
        ['jdoptim', 'param_groups', 'state']
        >>> folder = tempfile.mkdtemp()
        >>> dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder,
        ...          no_dist=True)  # doctest: +ELLIPSIS
        Metadata(...)
        >>> resumed_model, resumed = build()
        >>> model_state, optim_state = get_state_dict(resumed_model, resumed)
        >>> state = {"model": model_state, "optim": optim_state}
        >>> dcp.load(state, checkpoint_id=folder, no_dist=True)
        >>> set_state_dict(resumed_model, resumed, model_state_dict=state["model"],
        ...                optim_state_dict=state["optim"])
        >>> torch.equal(resumed_model.weight, model.weight)
        True
        >>> resumed.state_dict()["jdoptim"]["aggregator"]
        {'name': 'random', 'seed': 1}
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict as torch_get_state_dict

    from jdoptim.optimizer import _STATE_KEY

    model_state, optim_state = torch_get_state_dict(model, optimizer, options=options)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict()[_STATE_KEY], buffer)
    optim_state[_STATE_KEY] = buffer.getvalue()
    return model_state, optim_state


def set_state_dict(
    model: nn.Module,
    optimizer: JDOptimizer,
    *,
    model_state_dict: dict[str, Any],
    optim_state_dict: dict[str, Any],
    options: StateDictOptions | None = None,
) -> None:
    """Load state dicts written by `get_state_dict` (and read by
    ``torch.distributed.checkpoint.load``) into the model and the optimizer.

    The ``"jdoptim"`` entry is read (with ``torch.load(..., weights_only=True)``), checked and
    loaded first, as `JDOptimizer.load_state_dict` does (a checkpoint of another aggregator
    raises before anything changes); then torch's
    ``set_state_dict`` loads the model and the inner optimizer. If that fails, the aggregator's
    state is put back; the model is wherever torch's loading left it.

    Args:
        model: The model.
        optimizer: The `JDOptimizer` over its parameters.
        model_state_dict: The model's state dict.
        optim_state_dict: The optimizer's, with or without the ``"jdoptim"`` entry.
        options: Passed to torch's ``set_state_dict``.
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict as torch_set_state_dict

    from jdoptim.optimizer import _STATE_KEY

    optim_state_dict = dict(optim_state_dict)
    extra = optim_state_dict.pop(_STATE_KEY, None)
    if isinstance(extra, bytes):
        extra = torch.load(io.BytesIO(extra), weights_only=True)
    previous = optimizer.state_dict()
    if extra is not None:
        optimizer.load_state_dict({**optimizer.optimizer.state_dict(), _STATE_KEY: extra})
    try:
        torch_set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state_dict,
            optim_state_dict=optim_state_dict,
            options=options,
        )
    except BaseException:
        optimizer.load_state_dict(previous)
        raise
