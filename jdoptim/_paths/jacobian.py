"""The Jacobian path: the Jacobian of the losses, then the aggregator.

One batched backward pass (``jdoptim.functional.jacobian``) gives the Jacobian of the losses with
respect to the parameters. With ``shared_params`` (multi-task learning), only the shared
parameters' columns are aggregated; every other parameter gets the sum of its rows, the ordinary
gradient of the sum of the losses (a task head gets its own task's gradient), or the combination
of its rows with the aggregator's `head_weights`. Aggregators that need them also receive the
values of the losses and the layout of the Jacobian's columns (`jdoptim.aggregation.Columns`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from jdoptim._paths.base import (
    Losses,
    Path,
    Pieces,
    Update,
    all_finite,
    non_finite_reason,
    not_connected,
)
from jdoptim.aggregation import Aggregator, Columns, WeightedAggregator
from jdoptim.diagnostics import diagnose
from jdoptim.functional import jacobian, split_update, stack_jacobians


class JacobianPath(Path):
    """Aggregate the Jacobian of the losses.

    Args:
        method: The aggregator, mapping the Jacobian ``[m, n]`` to an update ``[n]``.
        shared_params: The parameters whose Jacobian is aggregated; ``None`` for all of them.
        chunk_size: Losses per batched backward pass; ``None`` for all at once, ``1`` for one
            backward pass per loss.
        columns_of: The layout of the columns of the shared parameters' Jacobian, for
            aggregators that need it; ``None`` gives only the parameters' sizes.
    """

    method_type = Aggregator
    method: Aggregator

    def __init__(
        self,
        method: Aggregator,
        shared_params: Sequence[Tensor] | None = None,
        chunk_size: int | None = None,
        columns_of: Callable[[list[Tensor]], Columns] | None = None,
    ) -> None:
        super().__init__(method)
        self.shared_params = None if shared_params is None else list(shared_params)
        self.chunk_size = chunk_size
        self.columns_of = columns_of
        # None until the first batched backward pass tells whether vmap runs on this graph.
        self.batched: bool | None = None if chunk_size != 1 else False

    def pieces(self, losses: Losses) -> Pieces:
        params = losses.params
        jacobians = self._jacobians(losses.vector, params, losses.retain_graph)
        reached = [(p, jac) for p, jac in zip(params, jacobians, strict=True) if jac is not None]
        if not reached:
            raise not_connected(params)
        values = losses.vector.detach()
        if self.shared_params is None:
            shared, own = reached, {}
        else:
            shared_ids = {id(p) for p in self.shared_params}
            shared = [(p, j) for p, j in reached if id(p) in shared_ids]
            heads = [(p, j) for p, j in reached if id(p) not in shared_ids]
            weights = self.method.head_weights(values / losses.scale) if heads else None
            own = {p: _combine_rows(j, weights) for p, j in heads}
        matrix = stack_jacobians([j for _, j in shared]) if shared else None
        finite = all_finite([losses.vector, *own.values(), *([] if matrix is None else [matrix])])
        reason = "" if finite else non_finite_reason(losses.vector, self.what)
        return Pieces([p for p, _ in shared], matrix, own, finite, reason, values)

    def _jacobians(self, vector: Tensor, params: list[Tensor], retain_graph: bool) -> list:
        if self.batched is None:
            try:
                # The graph is kept in case vmap fails midway and the losses must be replayed.
                jacobians = jacobian(vector, params, chunk_size=self.chunk_size, retain_graph=True)
            except RuntimeError as error:
                # vmap's failure if the same losses go through one backward pass per loss; else
                # the model's, raised from that retry (and tried batched again next time).
                jacobians = jacobian(vector, params, retain_graph=retain_graph, batched=False)
                warnings.warn(
                    f"The batched backward pass failed where one backward pass per loss works, "
                    f"so vmap cannot batch this graph ({error}); the losses go through one "
                    "backward pass per loss from now on. Pass chunk_size=1 to choose this "
                    "explicitly.",
                    stacklevel=5,
                )
                self.batched = False
            else:
                self.batched = True
            return jacobians
        return jacobian(
            vector,
            params,
            chunk_size=self.chunk_size,
            retain_graph=retain_graph,
            batched=self.batched,
        )

    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        if pieces.matrix is None:
            return Update(dict(pieces.own))
        matrix = pieces.matrix if scale == 1.0 else pieces.matrix / scale
        weights: list[Tensor] = []
        handle = None
        if diagnostics and isinstance(self.method, WeightedAggregator):
            handle = self.method.weighting.register_forward_hook(
                lambda module, args, output: weights.append(output)
            )
        context: dict = {}
        values = pieces.loss_values
        if self.method.needs_losses and values is not None:
            context["losses"] = values if scale == 1.0 else values / scale
        if self.method.needs_columns:
            shared = list(pieces.shared)
            context["columns"] = (
                Columns(tuple(p.numel() for p in shared))
                if self.columns_of is None
                else self.columns_of(shared)
            )
        try:
            update = self.method(matrix, **context)
        finally:
            if handle is not None:
                handle.remove()
        if not all_finite([update]):
            return Update(finite=False, reason=f"{self.method!r} returned a non-finite update")
        report = {k: v.clone() for k, v in self.method.report().items()} if diagnostics else {}
        updates = split_update(update * scale if scale != 1.0 else update, pieces.shared)
        grads = dict(zip(pieces.shared, updates, strict=True))
        grads.update(pieces.own)

        def diagnose_step():
            return diagnose(matrix, update, weights[-1] if weights else None, report)

        return Update(grads, diagnose=diagnose_step if diagnostics else None)


def _combine_rows(jacobian: Tensor, weights: Tensor | None) -> Tensor:
    """``Σ_i c_i J_i`` over the rows of a parameter's Jacobian ``[m, *shape]`` (their sum when
    ``weights`` is ``None``)."""
    if weights is None:
        return jacobian.sum(dim=0)
    return torch.tensordot(weights.to(jacobian.dtype), jacobian, dims=1)
