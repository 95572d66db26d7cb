"""What every path from losses to ``.grad`` takes and returns.

A path computes on the side and writes nothing: `Path.pieces` turns one call's `Losses` into
`Pieces` (what is left to aggregate), `Path.aggregate` turns pieces into an `Update` (what to add
into ``.grad``). `jdoptim.JDOptimizer` decides what happens between the two (queueing pieces,
reducing them across ranks, the non-finite policy) and writes the update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from jdoptim.diagnostics import StepDiagnostics


@dataclass(frozen=True)
class Losses:
    """One call's losses, as a path receives them.

    Attributes:
        tensor: The losses as given (their shape tells per-sample structure).
        vector: The same losses flattened to ``[m]``.
        params: The parameters that may receive a gradient (the optimizer's, requiring grad).
        retain_graph: Keep the autograd graph after the backward pass.
        scale: The ``GradScaler``'s scale of the losses (``1.0`` without scaling).
        accumulation: How these losses' pieces combine with other calls' and other ranks':
            ``"sum"`` (the same objectives) or ``"concat"`` (objectives of their own).
    """

    tensor: Tensor
    vector: Tensor
    params: list[Tensor]
    retain_graph: bool = False
    scale: float = 1.0
    accumulation: Literal["sum", "concat"] = "sum"


@dataclass
class Pieces:
    """What a path computed from one call's losses, before aggregation.

    Attributes:
        shared: The parameters whose Jacobian is aggregated, in the order of its columns.
        matrix: Their Jacobian ``[m, n]``, as scaled as the losses, or ``None`` when the path
            aggregates something else (or nothing).
        own: Gradients added into ``.grad`` as they are, by parameter (the parameters outside
            ``shared``: task heads, or every parameter of a scalarised loss).
        finite: Whether every value computed is finite.
        reason: What is not finite, when ``finite`` is ``False``, for the user.
    """

    shared: list[Tensor] = field(default_factory=list)
    matrix: Tensor | None = None
    own: dict[Tensor, Tensor] = field(default_factory=dict)
    finite: bool = True
    reason: str = ""


@dataclass
class Update:
    """What a path's aggregation adds into ``.grad``, once the optimizer accepts it.

    Attributes:
        grads: The gradient to add, by parameter; parameters absent here are left alone.
        finite: Whether every gradient is finite.
        reason: What is not finite, when ``finite`` is ``False``.
        diagnose: Computes the `StepDiagnostics` of this aggregation (given only when asked).
    """

    grads: dict[Tensor, Tensor] = field(default_factory=dict)
    finite: bool = True
    reason: str = ""
    diagnose: Callable[[], StepDiagnostics] | None = None


class Path(ABC):
    """One way of turning losses into ``.grad``, computed on the side.

    Args:
        method: The aggregator or scalarizer the path applies.
    """

    method_type: ClassVar[type[nn.Module]] = nn.Module
    """The kind of method the path applies."""
    mode: ClassVar[Literal["jacobian", "gramian"]] = "jacobian"
    """What `JDOptimizer.resolved_mode` reports for this path."""
    what: ClassVar[str] = "the Jacobian"
    """What the path aggregates, as named in messages about non-finite values."""
    queues: ClassVar[bool] = True
    """Whether the pieces of several calls can wait for one aggregation (``aggregate=False``)."""
    reduces: ClassVar[Literal["pieces", "update", "itself"]] = "pieces"
    """What the optimizer averages across ranks under data parallelism: the pieces (the exact
    global Jacobian), or only the update (each rank aggregates its own losses); or nothing,
    for a path that reduces across ranks itself (on sharded parameters)."""
    method_in_pieces: ClassVar[bool] = False
    """Whether `pieces` already runs the method (whose state may then change before the
    aggregation)."""

    def __init__(self, method: nn.Module) -> None:
        self.method = method

    @abstractmethod
    def pieces(self, losses: Losses) -> Pieces:
        """Compute what the aggregation of ``losses`` needs; write nothing."""

    @abstractmethod
    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        """Aggregate finite ``pieces`` (those of one call, or several combined) into an update.

        Args:
            pieces: The pieces.
            scale: The ``GradScaler``'s scale of the losses the pieces come from.
            diagnostics: Also return how to compute the `StepDiagnostics`.
        """

    def discard(self) -> None:
        """Forget what `pieces` keeps for `aggregate`, when the aggregation will not happen.
        Paths that keep nothing outside their pieces have nothing to do."""
        return None


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one synchronisation.

    A sum is non-finite whenever a term is, so one pass of additions decides the common case;
    only a non-finite sum (which finite terms can also give, by overflow) is checked entry by
    entry.
    """
    if not tensors:
        return True
    sums = torch.stack([t.sum() for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def non_finite_reason(vector: Tensor, otherwise: str) -> str:
    """Name the non-finite losses, or else ``otherwise`` (what was found not finite)."""
    bad = (~torch.isfinite(vector)).nonzero().flatten().tolist()
    return f"losses at indices {bad} are not finite" if bad else f"{otherwise} is not finite"


def not_connected(params: Sequence[Tensor]) -> ValueError:
    """The error for losses that reach none of ``params``."""
    return ValueError(
        f"None of the {len(params)} parameters of the optimizer receives a gradient from the "
        "losses; are they computed from this model?"
    )


def combine(queued: Sequence[Pieces], accumulation: Literal["sum", "concat"]) -> Pieces:
    """Combine the pieces of several calls into those of one aggregation.

    Jacobians are added (``"sum"``: the same objectives on several micro-batches) or their rows
    stacked (``"concat"``: different objectives); own gradients are added.

    Raises:
        ValueError: If the calls reach different shared parameters, or ``"sum"`` meets
            Jacobians of different shapes.
    """
    first = queued[0]
    if len(queued) == 1:
        return first
    own: dict[Tensor, Tensor] = {}
    for pieces in queued:
        check_combinable(first, pieces, accumulation)
        for p, g in pieces.own.items():
            own[p] = g if p not in own else own[p] + g
    matrices = [pieces.matrix for pieces in queued if pieces.matrix is not None]
    matrix = None
    if matrices and accumulation == "concat":
        matrix = torch.cat(matrices)
    elif matrices:
        matrix = torch.stack(matrices).sum(dim=0)
    finite = all(pieces.finite for pieces in queued)
    reason = next((pieces.reason for pieces in queued if not pieces.finite), "")
    return Pieces(first.shared, matrix, own, finite, reason)


def check_combinable(first: Pieces, later: Pieces, accumulation: Literal["sum", "concat"]) -> None:
    """Raise unless ``later`` can be combined with ``first`` under ``accumulation``."""
    if [id(p) for p in later.shared] != [id(p) for p in first.shared]:
        raise ValueError(
            "The accumulated losses reach different shared parameters; accumulate "
            "micro-batches of the same model and objectives."
        )
    if accumulation == "sum" and first.matrix is not None and later.matrix is not None:
        shapes = sorted({tuple(first.matrix.shape), tuple(later.matrix.shape)})
        if len(shapes) > 1:
            raise ValueError(
                f"accumulation='sum' adds Jacobians of the same objectives, got shapes "
                f"{shapes}; use accumulation='concat' for different objectives."
            )
