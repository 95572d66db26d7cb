"""The Jacobian path: the Jacobian of the losses, then the aggregator.

One batched backward pass (``jdoptim.functional.jacobian``) gives the Jacobian of the losses with
respect to the parameters. With ``shared_params`` (multi-task learning), only the shared
parameters' Jacobian is computed and aggregated: the graph is cut where it enters the shared part
(``jdoptim._split``), each task's own part (its head) is differentiated once by an ordinary
backward pass of the sum of the losses, which gives every other parameter its ordinary gradient
(a task head, its own task's gradient, or of the losses weighted by the aggregator's
`head_weights`), and only the shared part is batched over the losses. Aggregators that need them
also receive the values of the losses and the layout of the Jacobian's columns
(`jdoptim.aggregation.Columns`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

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
from jdoptim._split import jacobian_matrix, split
from jdoptim.aggregation import Aggregator, Columns, WeightedAggregator
from jdoptim.diagnostics import diagnose
from jdoptim.functional import split_update


class JacobianPath(Path):
    """Aggregate the Jacobian of the losses.

    Args:
        method: The aggregator, mapping the Jacobian ``[m, n]`` to an update ``[n]``.
        shared_params: The parameters whose Jacobian is aggregated; ``None`` for all of them.
            The others receive the ordinary gradient of the sum of the losses that reach them.
        chunk_size: Losses per batched backward pass; ``None`` for as many as fit in
            `jdoptim._split.PASS_ENTRIES` entries of the Jacobian, ``1`` for one backward pass
            per loss.
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
        if self.shared_params is None:
            shared, matrix, own = self._all(losses)
        else:
            shared, matrix, own = self._split(losses)
        if matrix is None and not own:
            raise not_connected(losses.params)
        finite = all_finite([losses.vector, *own.values(), *([] if matrix is None else [matrix])])
        reason = "" if finite else non_finite_reason(losses.vector, self.what)
        return Pieces(shared, matrix, own, finite, reason, losses.vector.detach())

    def _all(self, losses: Losses) -> tuple[list[Tensor], Tensor | None, dict[Tensor, Tensor]]:
        """The Jacobian of every parameter the losses reach, from batched backward passes."""
        params, vector = losses.params, losses.vector
        rows = torch.eye(vector.shape[0], dtype=vector.dtype, device=vector.device)

        def compute(batched: bool, retain_graph: bool) -> tuple[Tensor | None, list[bool]]:
            options = {"batched": batched, "chunk_size": self.chunk_size}
            return jacobian_matrix([vector], params, [rows], retain_graph=retain_graph, **options)

        matrix, reached = self._batched_or_not(compute, losses.retain_graph)
        return [p for p, hit in zip(params, reached, strict=False) if hit], matrix, {}

    def _split(self, losses: Losses) -> tuple[list[Tensor], Tensor | None, dict[Tensor, Tensor]]:
        """The Jacobian of the shared parameters and the others' ordinary gradients: each
        task's own part is differentiated once, only the shared part is batched over the losses
        (see `jdoptim._split`)."""
        shared_ids = {id(p) for p in self.shared_params}  # type: ignore[union-attr]
        shared = [p for p in losses.params if id(p) in shared_ids]
        others = [p for p in losses.params if id(p) not in shared_ids]
        vector = losses.vector
        rows = torch.eye(vector.shape[0], dtype=vector.dtype, device=vector.device)
        heads = self.method.head_weights(vector.detach() / losses.scale)

        def compute(batched: bool, retain_graph: bool) -> tuple[Tensor | None, list[bool], dict]:
            options = {"batched": batched, "chunk_size": self.chunk_size}
            cut = split(
                vector,
                rows,
                shared,
                others,
                own_weights=heads,
                retain_graph=retain_graph,
                **options,
            )
            if not cut.boundary:  # the losses reach no shared parameter
                return None, [], cut.own
            # Through convolutions, one backward pass per loss is faster (see `jdoptim._split`).
            options["batched"] = batched and not cut.convolutions
            matrix, reached = jacobian_matrix(
                cut.boundary, shared, cut.cotangents, retain_graph=retain_graph, **options
            )
            return matrix, reached, cut.own

        matrix, reached, own = self._batched_or_not(compute, losses.retain_graph)
        return [p for p, hit in zip(shared, reached, strict=False) if hit], matrix, own

    def _batched_or_not(self, compute: Callable[[bool, bool], Any], retain_graph: bool) -> Any:
        """Run ``compute(batched, retain_graph)``, batched unless vmap is known to fail on this
        graph.

        The first batched run keeps the graph. If it fails, the same losses are replayed one
        backward pass per loss: if that works, vmap was at fault, and the losses go one by one
        from now on; if it fails too, the error is the model's, raised from that retry, and the
        next call tries the batched pass again."""
        if self.batched is None:
            try:
                result = compute(True, True)
            except RuntimeError as error:
                result = compute(False, retain_graph)
                warnings.warn(
                    f"The batched backward pass failed where one backward pass per loss works, "
                    f"so vmap cannot batch this graph ({error}); the losses go through one "
                    "backward pass per loss from now on. Pass chunk_size=1 to choose this "
                    "explicitly.",
                    stacklevel=6,
                )
                self.batched = False
            else:
                self.batched = True
            return result
        return compute(self.batched, retain_graph)

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
