"""How the columns of a Jacobian split into parameters, layers and parameter groups.

The Jacobian ``[m, n]`` that an aggregator receives has the columns of the shared parameters
side by side, in order. Methods that treat parts of the model separately (GradVac per layer,
GradNorm at one layer) need to know which columns belong together: `Columns` says it, and
`jdoptim.JDOptimizer` builds it for them from its parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from jdoptim.linalg._gramian import in_range, row_magnitudes, solve_dtype

Granularity = Literal["all", "layer", "parameter", "group"]
GRANULARITIES: tuple[str, ...] = ("all", "layer", "parameter", "group")

Block = tuple[tuple[int, int], ...]
"""The columns of one block, as ``(start, stop)`` ranges."""


@dataclass(frozen=True)
class Columns:
    """The layout of a Jacobian's columns: one run of columns per parameter, in order.

    Attributes:
        sizes: The number of columns (entries) of each parameter, in column order.
        layers: The layer of each parameter (any label, such as the qualified name of the
            module that holds it), or ``None`` when the layers are not known.
        groups: The index of the optimizer's parameter group of each parameter, or ``None``
            when not known.

    Examples:
        >>> import torch
        >>> from jdoptim.aggregation import Columns
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        >>> columns = Columns.of(list(model.parameters()), model)
        >>> columns
        Columns(sizes=(6, 2, 2, 1), layers=('0', '0', '1', '1'), groups=None)
        >>> columns.blocks("layer")
        [((0, 8),), ((8, 11),)]
    """

    sizes: tuple[int, ...]
    layers: tuple[str, ...] | None = None
    groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        sizes = tuple(self.sizes)
        if not sizes or any(
            isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in sizes
        ):
            raise ValueError(
                f"Invalid sizes value: {self.sizes!r}; expected a non-empty sequence of "
                "integers >= 1."
            )
        object.__setattr__(self, "sizes", sizes)
        for name in ("layers", "groups"):
            labels = getattr(self, name)
            if labels is None:
                continue
            labels = tuple(labels)
            if len(labels) != len(sizes):
                raise ValueError(
                    f"Invalid {name} value: {labels!r}; expected one entry per parameter "
                    f"({len(sizes)})."
                )
            object.__setattr__(self, name, labels)

    @classmethod
    def of(
        cls,
        params: Sequence[Tensor],
        model: nn.Module | Iterable[nn.Module] | None = None,
        groups: Sequence[Iterable[Tensor]] | None = None,
    ) -> Columns:
        """The layout of the Jacobian of ``params`` (in this order).

        Args:
            params: The parameters whose columns the Jacobian has, in order.
            model: The model (or modules) holding them: a parameter's layer is the module that
                registers it (its qualified name). ``None`` leaves the layers unknown.
            groups: The parameter groups (each an iterable of parameters, such as an
                optimizer's ``[g["params"] for g in optimizer.param_groups]``).

        Raises:
            ValueError: If ``model`` is given and does not hold one of ``params``, or
                ``groups`` is given and no group holds one of them.
        """
        layers = None
        if model is not None:
            owners = layer_names(model)
            missing = [tuple(p.shape) for p in params if id(p) not in owners]
            if missing:
                raise ValueError(
                    f"The model holds no parameter of shape {missing[0]}, so its layer is "
                    "unknown; pass the model that holds every parameter."
                )
            layers = tuple(owners[id(p)] for p in params)
        indices = None
        if groups is not None:
            group_of = {id(p): i for i, group in enumerate(groups) for p in group}
            if any(id(p) not in group_of for p in params):
                raise ValueError("A parameter is in none of the groups.")
            indices = tuple(group_of[id(p)] for p in params)
        return cls(tuple(p.numel() for p in params), layers, indices)

    @property
    def n(self) -> int:
        """The number of columns."""
        return sum(self.sizes)

    def blocks(self, granularity: Granularity) -> list[Block]:
        """The blocks of columns at ``granularity``, in the order of their first column.

        ``"all"``: one block; ``"parameter"``: one block per parameter; ``"layer"``: the
        parameters of one layer; ``"group"``: those of one parameter group. A block may gather
        columns that are not adjacent.

        Raises:
            ValueError: If the layers (or groups) are asked for and not known.
        """
        if granularity == "all":
            return [((0, self.n),)]
        if granularity == "parameter":
            labels: Sequence[object] = range(len(self.sizes))
        elif granularity in ("layer", "group"):
            known = self.layers if granularity == "layer" else self.groups
            if known is None:
                raise ValueError(
                    f"The {granularity}s of the Jacobian's columns are not known: build the "
                    "JDOptimizer with shared_params=<module> or modules=<model>, or pass "
                    f"Columns.of(params, model, groups) as columns=."
                    if granularity == "layer"
                    else "The parameter groups of the Jacobian's columns are not known: pass "
                    "Columns.of(params, groups=...) as columns=."
                )
            labels = known
        else:
            raise ValueError(
                f"Invalid granularity value: {granularity!r}; expected one of "
                + ", ".join(map(repr, GRANULARITIES))
            )
        ranges: dict[object, list[tuple[int, int]]] = {}
        start = 0
        for label, size in zip(labels, self.sizes, strict=True):
            runs = ranges.setdefault(label, [])
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + size)  # adjacent: one range
            else:
                runs.append((start, start + size))
            start += size
        return [tuple(runs) for runs in ranges.values()]


def layer_names(model: nn.Module | Iterable[nn.Module]) -> dict[int, str]:
    """The qualified name of the module that registers each parameter of ``model`` (or of
    several modules), by parameter id; a parameter registered twice (tied weights) belongs to
    the first module that registers it."""
    roots = [model] if isinstance(model, nn.Module) else list(model)
    names: dict[int, str] = {}
    for index, root in enumerate(roots):
        for name, module in root.named_modules():
            if len(roots) > 1:
                name = f"{index}.{name}" if name else str(index)
            for param in module.parameters(recurse=False):
                names.setdefault(id(param), name)
    return names


def block_columns(matrix: Tensor, block: Block) -> Tensor:
    """The columns of ``matrix`` in ``block`` (a view when they are adjacent)."""
    if len(block) == 1:
        start, stop = block[0]
        return matrix[:, start:stop]
    return torch.cat([matrix[:, start:stop] for start, stop in block], dim=1)


def block_gramians(matrix: Tensor, blocks: Sequence[Block]) -> Tensor:
    """The Gramians ``J_k J_kᵀ`` of the blocks of columns, shape ``[K, m, m]``.

    They are formed in `jdoptim.linalg.solve_dtype` of ``matrix``'s dtype, or in float64 when
    that would overflow or underflow for some block (see `jdoptim.linalg.gramian`)."""
    dtype = solve_dtype(matrix.dtype)
    if dtype != torch.float64 and matrix.numel() and not _blocks_in_range(matrix, blocks, dtype):
        dtype = torch.float64
    work = matrix.to(dtype)
    gramians = work.new_zeros(len(blocks), matrix.shape[0], matrix.shape[0])
    for k, block in enumerate(blocks):
        for start, stop in block:
            part = work[:, start:stop]
            gramians[k].addmm_(part, part.T)
    return gramians


def _blocks_in_range(matrix: Tensor, blocks: Sequence[Block], dtype: torch.dtype) -> bool:
    """Whether every block's Gramian stays within ``dtype``'s range (one pass over
    ``matrix``)."""
    checks = []
    for block in blocks:
        ranges = [(start, stop) for start, stop in block if stop > start]
        if ranges:
            parts = [row_magnitudes(matrix[:, start:stop]) for start, stop in ranges]
            n = sum(stop - start for start, stop in ranges)
            checks.append(in_range(torch.stack(parts).amax(dim=0), n, dtype))
    return not checks or bool(torch.stack(checks).all())


def combine_blocks(matrix: Tensor, blocks: Sequence[Block], weights: Tensor) -> Tensor:
    """The update whose columns in block ``k`` are ``J_kᵀ w_k``, for weights ``[K, m]``, formed
    in the wider of the dtypes of ``matrix`` and ``weights`` and returned in ``matrix``'s."""
    work = torch.promote_types(matrix.dtype, weights.dtype)
    source = matrix.to(work)
    update = source.new_empty(matrix.shape[1])
    for block, w in zip(blocks, weights.to(work), strict=True):
        for start, stop in block:
            torch.mv(source[:, start:stop].T, w, out=update[start:stop])
    return update.to(matrix.dtype)
