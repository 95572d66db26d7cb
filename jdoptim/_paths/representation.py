"""The representation path (``rep_grad=True``): Jacobian descent on the gradients with respect
to the shared representation, an approximation of that on the shared parameters.

A multi-task model's shared part (the trunk) maps the input to a representation ``Z`` that every
head reads. The gradient of loss ``i`` with respect to the shared parameters is
``(∂Z/∂θ)ᵀ ∂L_i/∂Z``, so instead of their Jacobian ``J_θ`` (a batched backward pass through the
trunk) this path aggregates the much smaller ``J_Z = [∂L_i/∂Z]`` and sends the aggregated
representation gradient ``d_Z = A(J_Z)`` through the trunk once:

1. the graph of the losses is cut where it enters the shared part (``jdoptim._split``): the
   gradients of the losses at that boundary are ``J_Z`` (each head differentiated once), and the
   heads get their ordinary gradient (of the losses weighted by the aggregator's `head_weights`);
2. after the aggregation, the shared parameters' update ``(∂Z/∂θ)ᵀ d_Z`` comes from one
   ordinary backward pass from the boundary.

The representation is therefore whatever enters the shared part: the trunk's output, or several
tensors (several inputs through the trunk, or a shared parameter also read after the trunk).
For a weighted aggregator, ``d_Z = J_Zᵀ w`` and the shared parameters' update is ``J_θᵀ w``: the
update of Jacobian descent with the weights computed from ``J_Z`` instead of ``J_θ`` (MGDA-UB's
upper bound, Sener & Koltun, arXiv 1810.04650).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from jdoptim._paths.base import (
    Losses,
    Pieces,
    Update,
    all_finite,
    non_finite_reason,
    not_connected,
)
from jdoptim._paths.jacobian import JacobianPath
from jdoptim._split import split
from jdoptim.aggregation import Aggregator, WeightedAggregator
from jdoptim.diagnostics import diagnose


@dataclass
class RepresentationPieces(Pieces):
    """The pieces of the representation path: ``matrix`` is ``J_Z``, the gradients of the losses
    at the ``boundary`` of the shared part (whose graph is kept until the aggregated gradient
    goes through it)."""

    boundary: list[Any] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)
    retain_graph: bool = False


class RepresentationPath(JacobianPath):
    """Aggregate the Jacobian with respect to the shared representation, then send the
    aggregated gradient through the shared part.

    Args:
        method: The aggregator, mapping ``J_Z`` ``[m, z]`` to a representation gradient ``[z]``.
        shared_params: The shared parameters (the trunk's).
        mode: ``"gramian"`` when the optimizer was asked for gramian mode (the aggregator is then
            Gramian-based: its weights come from ``J_Z J_Zᵀ``), else ``"jacobian"``.
        chunk_size: Losses per batched backward pass through the heads, as for `JacobianPath`.
    """

    what = "the Jacobian of the representation"
    queues = False

    def __init__(
        self,
        method: Aggregator,
        shared_params: Sequence[Tensor],
        mode: str = "jacobian",
        chunk_size: int | None = None,
    ) -> None:
        check_method(method)
        super().__init__(method, shared_params, chunk_size)
        self.mode = mode  # type: ignore[assignment]

    def pieces(self, losses: Losses) -> Pieces:
        vector = losses.vector
        shared_ids = {id(p) for p in self.shared_params or []}
        shared = [p for p in losses.params if id(p) in shared_ids]
        others = [p for p in losses.params if id(p) not in shared_ids]
        rows = torch.eye(vector.shape[0], dtype=vector.dtype, device=vector.device)
        heads = self.method.head_weights(vector.detach() / losses.scale)

        def compute(batched: bool, retain_graph: bool) -> Any:
            options = {"batched": batched, "chunk_size": self.chunk_size}
            return split(
                vector, rows, shared, others, own_weights=heads, retain_graph=True, **options
            )

        cut = self._batched_or_not(compute, True)
        own = cut.own
        if not cut.boundary:
            if not own:
                raise not_connected(losses.params)
            finite = all_finite([vector, *own.values()])
            reason = "" if finite else non_finite_reason(vector, self.what)
            return RepresentationPieces(own=own, finite=finite, reason=reason)
        if any(edge.node is vector.grad_fn for edge in cut.boundary):
            raise ValueError(
                "rep_grad=True found no representation between the losses and the shared "
                "parameters: the losses reach the shared parameters without going through "
                "parameters of their own (task heads), or a module's backward hook on the heads "
                "keeps the graph from being cut. Use rep_grad=False."
            )
        m = vector.shape[0]
        matrix = torch.cat([c.reshape(m, -1) for c in cut.cotangents], dim=1)
        finite = all_finite([vector, matrix, *own.values()])
        return RepresentationPieces(
            shared=shared,
            matrix=matrix,
            own=own,
            finite=finite,
            reason="" if finite else non_finite_reason(vector, self.what),
            loss_values=vector.detach(),
            boundary=list(cut.boundary),
            shapes=[c.shape[1:] for c in cut.cotangents],
            retain_graph=losses.retain_graph,
        )

    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        assert isinstance(pieces, RepresentationPieces)
        if pieces.matrix is None:
            return Update(dict(pieces.own))
        matrix = pieces.matrix if scale == 1.0 else pieces.matrix / scale
        context: dict[str, Tensor] = {}
        if self.method.needs_losses and pieces.loss_values is not None:
            values = pieces.loss_values
            context["losses"] = values if scale == 1.0 else values / scale
        weights: list[Tensor] = []
        handle = None
        if diagnostics and isinstance(self.method, WeightedAggregator):
            handle = self.method.weighting.register_forward_hook(
                lambda module, args, output: weights.append(output)
            )
        try:
            update = self.method(matrix, **context)
        finally:
            if handle is not None:
                handle.remove()
        if not all_finite([update]):
            return Update(finite=False, reason=f"{self.method!r} returned a non-finite update")
        report = {k: v.clone() for k, v in self.method.report().items()} if diagnostics else {}
        sizes = [int(torch.Size(shape).numel()) for shape in pieces.shapes]
        cotangents = torch.split(update * scale if scale != 1.0 else update, sizes)
        grads = torch.autograd.grad(
            pieces.boundary,
            pieces.shared,
            [c.view(shape) for c, shape in zip(cotangents, pieces.shapes, strict=True)],
            retain_graph=pieces.retain_graph,
            allow_unused=True,
        )
        updates = {p: g for p, g in zip(pieces.shared, grads, strict=True) if g is not None}
        if not all_finite(list(updates.values())):
            return Update(
                finite=False, reason="the update sent through the shared part is not finite"
            )
        updates.update(pieces.own)

        def diagnose_step():
            return diagnose(matrix, update, weights[-1] if weights else None, report)

        return Update(updates, diagnose=diagnose_step if diagnostics else None)


def check_method(method: Aggregator) -> None:
    """Raise unless ``method`` can aggregate the Jacobian of the representation."""
    if method.needs_columns:
        raise ValueError(
            f"{method!r} treats blocks of the shared parameters' columns separately, but with "
            "rep_grad=True the columns are the representation's entries; use it without "
            "rep_grad, or on the whole Jacobian."
        )
    if method.column_state:
        raise ValueError(
            f"{method!r} keeps state per column of the Jacobian, but with rep_grad=True the "
            "columns are the representation's entries, which are other samples' at every "
            "step; use it without rep_grad."
        )
