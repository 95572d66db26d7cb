"""The representation path (``rep_grad=True``): Jacobian descent on the gradients with respect
to the shared representation, an approximation of that on the shared parameters.

A multi-task model's encoder maps the input to a representation ``Z`` that every head reads. The
gradient of loss ``i`` with respect to the encoder's parameters is ``(∂Z/∂θ)ᵀ ∂L_i/∂Z``, so
instead of the Jacobian ``J_θ`` (``m`` backward passes through the encoder) this path
aggregates the much smaller ``J_Z = [∂L_i/∂Z]`` (``m`` passes through the heads only), then
sends the aggregated representation gradient ``d_Z = A(J_Z)`` through the encoder once:

1. ``J_Z`` from one batched backward pass from the losses to ``Z``;
2. the heads' gradients from one backward pass of ``Σ_i c_i L_i`` (``c``: the aggregator's
   `head_weights`, 1 by default);
3. after the aggregation, the encoder's update ``(∂Z/∂θ)ᵀ d_Z`` from one backward pass.

For a weighted aggregator, ``d_Z = J_Zᵀ w`` and the encoder's update is ``J_θᵀ w``: the update of
Jacobian descent with the weights computed from ``J_Z`` instead of ``J_θ`` (MGDA-UB's upper
bound, Sener & Koltun, arXiv 1810.04650). The representation is recorded by a forward hook on
the encoder (the ``shared_params`` module): its outputs of the forward passes since the last
backward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim._paths.base import Losses, Pieces, Update, all_finite, non_finite_reason
from jdoptim._paths.jacobian import JacobianPath
from jdoptim.aggregation import Aggregator, WeightedAggregator
from jdoptim.diagnostics import diagnose


class Representation:
    """The outputs of a module's forward passes, recorded by a forward hook (removed when the
    recorder is garbage-collected, so that a discarded optimizer records nothing). A copy (of a
    pickled or deep-copied optimizer) records nothing: the hook is the original module's.

    Args:
        module: The encoder, whose output is the shared representation.
    """

    def __init__(self, module: nn.Module) -> None:
        self.outputs: list[Tensor] = []
        handle = module.register_forward_hook(_Recorder(weakref.ref(self)))
        self._finalizer: weakref.finalize | None = weakref.finalize(self, handle.remove)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.outputs = []
        self._finalizer = None


class _Recorder:
    """The forward hook: it adds the module's outputs to a `Representation` while that one
    lives. A pickled copy (with a pickled module) records nothing."""

    def __init__(self, ref: weakref.ref | None = None) -> None:
        self.ref = ref

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        representation = None if self.ref is None else self.ref()
        if representation is not None and torch.is_grad_enabled():
            representation.outputs += [t for t in _tensors(output) if t.requires_grad]

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Recorder, ())


def _tensors(value: Any) -> list[Tensor]:
    """The floating-point tensors in a module's output (a tensor, or containers of them)."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


@dataclass
class RepresentationPieces(Pieces):
    """The pieces of the representation path: ``matrix`` is ``J_Z``, ``representation`` the
    tensors ``Z`` whose columns it has, kept (with their graph) until the update goes through
    the encoder."""

    representation: list[Tensor] = field(default_factory=list)
    retain_graph: bool = False


class RepresentationPath(JacobianPath):
    """Aggregate the Jacobian with respect to the shared representation, then send the
    aggregated gradient through the encoder.

    Args:
        method: The aggregator, mapping ``J_Z`` ``[m, z]`` to a representation gradient ``[z]``.
        encoder: The module whose output is the shared representation; its parameters are the
            shared ones.
        mode: ``"gramian"`` when the optimizer was asked for gramian mode (the aggregator is then
            Gramian-based: its weights come from ``J_Z J_Zᵀ``), else ``"jacobian"``.
        chunk_size: Losses per batched backward pass, as for `JacobianPath`.
    """

    what = "the Jacobian of the representation"
    queues = False

    def __init__(
        self,
        method: Aggregator,
        encoder: nn.Module,
        mode: str = "jacobian",
        chunk_size: int | None = None,
    ) -> None:
        check_method(method)
        super().__init__(method, list(encoder.parameters()), chunk_size)
        self.mode = mode  # type: ignore[assignment]
        self.representation = Representation(encoder)

    def pieces(self, losses: Losses) -> Pieces:
        vector, params = losses.vector, losses.params
        recorded = self.representation.outputs
        if not recorded:
            raise ValueError(
                "rep_grad=True found no output of the shared module since the last step: build "
                "the JDOptimizer before the forward pass, and compute the losses from the "
                "shared module's output with grad enabled."
            )
        jacobians = self._jacobians(vector, recorded, True)
        kept = [(z, j) for z, j in zip(recorded, jacobians, strict=True) if j is not None]
        # Outputs of earlier forward passes that these losses do not read are dropped; the
        # ones they read stay for another backward pass through the same graph.
        self.representation.outputs = [z for z, _ in kept] if losses.retain_graph else []
        if not kept:
            raise ValueError(
                "The losses do not depend on the output of the shared module (the "
                "representation), so rep_grad=True has nothing to aggregate."
            )
        shared_ids = {id(p) for p in self.shared_params or []}
        _check_no_bypass(vector, [z for z, _ in kept], shared_ids)
        shared = [p for p in params if id(p) in shared_ids]
        heads = [p for p in params if id(p) not in shared_ids]
        values = vector.detach()
        own: dict[Tensor, Tensor] = {}
        if heads:
            weights = self.method.head_weights(values / losses.scale)
            total = vector.sum() if weights is None else weights.to(vector.dtype) @ vector
            grads = torch.autograd.grad(total, heads, retain_graph=True, allow_unused=True)
            own = {p: g for p, g in zip(heads, grads, strict=True) if g is not None}
        m = vector.shape[0]
        matrix = torch.cat([j.reshape(m, -1) for _, j in kept], dim=1)
        finite = all_finite([vector, matrix, *own.values()])
        return RepresentationPieces(
            shared=shared,
            matrix=matrix,
            own=own,
            finite=finite,
            reason="" if finite else non_finite_reason(vector, self.what),
            loss_values=values,
            representation=[z for z, _ in kept],
            retain_graph=losses.retain_graph,
        )

    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        assert isinstance(pieces, RepresentationPieces) and pieces.matrix is not None
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
        outputs = pieces.representation
        cotangents = torch.split(update * scale if scale != 1.0 else update, _sizes(outputs))
        grads = torch.autograd.grad(
            outputs,
            pieces.shared,
            [c.view_as(z).to(z.dtype) for c, z in zip(cotangents, outputs, strict=True)],
            retain_graph=pieces.retain_graph,
            allow_unused=True,
        )
        updates = {p: g for p, g in zip(pieces.shared, grads, strict=True) if g is not None}
        if not all_finite(list(updates.values())):
            return Update(finite=False, reason="the update sent through the encoder is not finite")
        updates.update(pieces.own)

        def diagnose_step():
            return diagnose(matrix, update, weights[-1] if weights else None, report)

        return Update(updates, diagnose=diagnose_step if diagnostics else None)

    def discard(self) -> None:
        self.representation.outputs = []


def _sizes(tensors: Sequence[Tensor]) -> list[int]:
    return [t.numel() for t in tensors]


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


def _check_no_bypass(vector: Tensor, representation: list[Tensor], shared: set[int]) -> None:
    """Raise if a shared parameter is reached from the losses without going through the
    representation (its gradient would not be ``(∂Z/∂θ)ᵀ ∂L/∂Z``). Only the part of the graph
    above the representation is walked."""
    stops = {z.grad_fn for z in representation}
    seen: set[Any] = set()
    stack = [vector.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in shared:
            raise ValueError(
                f"A shared parameter of shape {tuple(variable.shape)} is reached from the losses "
                "without going through the shared module's output, so rep_grad=True cannot "
                "give its gradient; make every use of the shared parameters go through that "
                "output, or use rep_grad=False."
            )
        stack.extend(next_node for next_node, _ in node.next_functions)
