"""Diagnostics of one aggregation, computed from the Gramian of the objectives' gradients.

Everything stays a tensor on the Jacobian's device; call ``.item()`` or ``.tolist()`` when you log
them. From a Jacobian, the Gramian is formed by `jdoptim.linalg.gramian`, so the diagnostics are
finite and exact at any scale; they are in the dtype it was formed in (float32 for half-precision
Jacobians, float64 for float32 ones whose Gramian leaves float32's range).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from jdoptim.linalg._gramian import gramian as form_gramian

CONFLICT_TOLERANCE = 1e-6
"""An inner product counts as a conflict below ``-CONFLICT_TOLERANCE`` times the product of the
norms, so that rounding errors of an exactly non-conflicting update are not reported."""


@dataclass(frozen=True)
class StepDiagnostics:
    """What the objectives' gradients and the update looked like at one step.

    Attributes:
        weights: The weights ``w`` with update ``Jᵀw`` for weighted aggregators, else ``None``.
        gradient_norms: ``‖gᵢ‖`` for each objective, shape ``[m]``.
        cosine_similarities: ``cos(gᵢ, gⱼ)``, shape ``[m, m]`` (0 where a gradient is zero).
        conflicting_pairs: Number of pairs ``i < j`` whose gradients conflict (0-d tensor).
        alignments: ``cos(gᵢ, d)`` between each gradient and the update ``d``, shape ``[m]``.
        update_conflicts: Whether the update conflicts with some objective (0-d bool tensor).
        update_norm: ``‖d‖`` (0-d tensor).
        method_state: What the method reports about this step, by name (see
            `jdoptim.aggregation.Aggregator.report`): the weights that GradNorm, MoCo, DB-MTL or
            IMTL learn, for example. Empty for methods without such state.
    """

    weights: Tensor | None
    gradient_norms: Tensor
    cosine_similarities: Tensor
    conflicting_pairs: Tensor
    alignments: Tensor
    update_conflicts: Tensor
    update_norm: Tensor
    method_state: Mapping[str, Tensor] = field(default_factory=dict)


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(numerator))


def _from_products(
    gramian: Tensor,
    products: Tensor,
    update_norm: Tensor,
    weights: Tensor | None,
    method_state: Mapping[str, Tensor] | None,
) -> StepDiagnostics:
    norms = gramian.diagonal().clamp(min=0).sqrt()
    cosines = _safe_divide(gramian, norms[:, None] * norms[None, :])
    alignments = _safe_divide(products, norms * update_norm)
    return StepDiagnostics(
        weights=None if weights is None else weights.detach(),
        gradient_norms=norms,
        cosine_similarities=cosines,
        conflicting_pairs=(cosines < -CONFLICT_TOLERANCE).triu(diagonal=1).sum(),
        alignments=alignments,
        update_conflicts=(alignments < -CONFLICT_TOLERANCE).any(),
        update_norm=update_norm,
        method_state=dict(method_state or {}),
    )


def diagnose(
    matrix: Tensor,
    update: Tensor,
    weights: Tensor | None = None,
    method_state: Mapping[str, Tensor] | None = None,
) -> StepDiagnostics:
    """Compute `StepDiagnostics` from a Jacobian ``[m, n]`` and its aggregated update ``[n]``
    (with the weights and what the method reports, when there are some).

    Examples:
        >>> import torch
        >>> from jdoptim import UPGrad
        >>> from jdoptim.diagnostics import diagnose
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> report = diagnose(J, J.mean(dim=0))
        >>> report.conflicting_pairs, report.update_conflicts
        (tensor(1), tensor(True))
        >>> bool(diagnose(J, UPGrad()(J)).update_conflicts)
        False
    """
    with torch.no_grad():
        gramian = form_gramian(matrix)
        # J d and ‖d‖ in the dtype of the Gramian too: they overflow with it.
        work = matrix.detach().to(gramian.dtype)
        exact = update.detach().to(gramian.dtype)
        return _from_products(gramian, work @ exact, exact.norm(), weights, method_state)


def diagnose_gramian(
    gramian: Tensor, weights: Tensor, method_state: Mapping[str, Tensor] | None = None
) -> StepDiagnostics:
    """Compute `StepDiagnostics` from a Gramian ``G = J Jᵀ`` and the weights of the update
    ``d = Jᵀ w``, without the Jacobian: ``J d = G w`` and ``‖d‖² = wᵀ G w``.

    Examples:
        >>> import torch
        >>> from jdoptim.diagnostics import diagnose, diagnose_gramian
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> w = torch.tensor([0.5, 0.5], dtype=torch.float64)
        >>> from_gramian = diagnose_gramian(J @ J.T, w)
        >>> torch.allclose(from_gramian.alignments, diagnose(J, w @ J).alignments)
        True
    """
    with torch.no_grad():
        products = gramian @ weights
        update_norm = (weights @ products).clamp(min=0).sqrt()
        return _from_products(gramian, products, update_norm, weights, method_state)
