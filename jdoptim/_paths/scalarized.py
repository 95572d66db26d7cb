"""The scalarised path: a loss scalarizer maps the losses to one loss, whose ordinary backward
pass gives every parameter its gradient; there is no Jacobian."""

from __future__ import annotations

import torch

from jdoptim._paths.base import (
    Losses,
    Path,
    Pieces,
    Update,
    all_finite,
    non_finite_reason,
    not_connected,
)
from jdoptim.scalarization import Scalarizer


class ScalarizedPath(Path):
    """Backpropagate the scalarised loss.

    Args:
        method: The scalarizer, mapping the losses ``[m]`` to one loss.
    """

    what = "the gradient of the scalarised loss"
    method_in_pieces = True
    method_type = Scalarizer
    method: Scalarizer

    def pieces(self, losses: Losses) -> Pieces:
        vector, scale = losses.vector, losses.scale
        if not bool(torch.isfinite(vector).all()):
            # Checked before the scalarizer runs, so that it never sees non-finite losses.
            return Pieces(finite=False, reason=non_finite_reason(vector, "the losses"))
        loss = self.method(vector / scale) * scale if scale != 1.0 else self.method(vector)
        grads = torch.autograd.grad(
            loss, losses.params, retain_graph=losses.retain_graph, allow_unused=True
        )
        own = {p: g for p, g in zip(losses.params, grads, strict=True) if g is not None}
        if not own:
            raise not_connected(losses.params)
        finite = all_finite(list(own.values()))
        return Pieces(own=own, finite=finite, reason="" if finite else f"{self.what} is not finite")

    def aggregate(self, pieces: Pieces, *, scale: float, diagnostics: bool) -> Update:
        return Update(dict(pieces.own))
