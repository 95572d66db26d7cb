"""The Gramian path: the ``m × m`` Gramian from the model's layers, the aggregator's weighting,
then the weighted gradient, without the Jacobian (see `jdoptim.gramian.GramianEngine`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from jdoptim._paths.base import Losses, Path, Pieces, Update, all_finite, non_finite_reason
from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.diagnostics import diagnose_gramian
from jdoptim.gramian import GramianEngine


@dataclass
class GramianPieces(Pieces):
    """The pieces of the Gramian path: the Gramian of the unscaled losses, and the parameters
    its weighted gradient goes to (``own`` holds the gradients added as they are). The engine
    keeps what the weighted gradient needs."""

    gramian: Tensor | None = None
    params: list[Tensor] | None = None


class GramianPath(Path):
    """Weight the losses from their Gramian, then add their weighted gradient.

    Args:
        method: A Gramian-based aggregator, whose weighting maps the Gramian to weights.
        engine: The engine hooked on the model before the forward pass.
    """

    mode = "gramian"
    what = "the Gramian"
    queues = False
    reduces = "update"
    method_type = GramianWeightedAggregator
    method: GramianWeightedAggregator

    def __init__(self, method: GramianWeightedAggregator, engine: GramianEngine) -> None:
        super().__init__(method)
        self.engine = engine

    def pieces(self, losses: Losses) -> GramianPieces:
        if not bool(torch.isfinite(losses.vector).all()):
            return GramianPieces(finite=False, reason=non_finite_reason(losses.vector, self.what))
        gramian, own, params = self._gramian(losses)
        if losses.scale != 1.0:
            gramian = gramian / losses.scale**2
        if not all_finite([gramian, *own.values()]):
            return GramianPieces(finite=False, reason=non_finite_reason(losses.vector, self.what))
        values = losses.vector.detach()
        return GramianPieces(
            own=own,
            loss_values=values if losses.scale == 1.0 else values / losses.scale,
            gramian=gramian,
            params=params,
        )

    def _gramian(self, losses: Losses) -> tuple[Tensor, dict[Tensor, Tensor], list[Tensor]]:
        """The Gramian of the (scaled) losses, the gradients added as they are, and the
        parameters that receive the weighted gradient."""
        # The engine reads the per-sample structure from the loss tensor's shape.
        gramian = self.engine.gramian(losses.tensor, retain_graph=losses.retain_graph)
        return gramian, {}, losses.params

    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        assert isinstance(pieces, GramianPieces) and pieces.gramian is not None
        gramian, params = pieces.gramian, pieces.params or []
        weighting = self.method.weighting
        context = {"losses": pieces.loss_values} if weighting.needs_losses else {}
        weights = weighting(gramian, **context)
        if not all_finite([weights]):
            return Update(finite=False, reason=f"{self.method!r} returned non-finite weights")
        grads = captured(lambda: self.engine.backward(weights, params=params), params)
        grads.update(pieces.own)
        report = {k: v.clone() for k, v in self.method.report().items()} if diagnostics else {}

        def diagnose_step():
            return diagnose_gramian(gramian, weights, report)

        return Update(grads, diagnose=diagnose_step if diagnostics else None)

    def discard(self) -> None:
        self.engine.reset()


def captured(backward: Callable[[], None], params: list[Tensor]) -> dict[Tensor, Tensor]:
    """The gradients that ``backward()`` writes into ``params``' ``.grad``, leaving ``.grad`` as
    it was."""
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        backward()
        return {p: p.grad for p in params if p.grad is not None}
    finally:
        for p, grad in zip(params, saved, strict=True):
            p.grad = grad
