"""Projection of weight vectors onto the dual cone of a Jacobian's rows, in weight space.

For a Jacobian ``J`` with Gramian ``G = J Jᵀ`` and a weight vector ``u``, the projection of
``Jᵀu`` onto the dual cone ``{x : Jx ≥ 0}`` is ``Jᵀv`` where ``v`` solves

    min_v  vᵀ G v   subject to   v ≥ u

(Proposition 1 of arXiv 2406.16232). UPGrad solves it for every row of ``diag(u)``, DualProj for
``u`` itself.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from jdoptim.linalg._quadprog import project_weights_quadprog

Solver = Literal["quadprog"]
SOLVERS: tuple[str, ...] = ("quadprog",)


def project_weights(U: Tensor, G: Tensor, solver: Solver) -> Tensor:
    """Solve ``min_v vᵀGv s.t. v ≥ u`` for every row ``u`` of ``U`` (any leading shape).

    Args:
        U: Lower bounds, shape ``[..., m]``.
        G: Gramian, shape ``[m, m]``. The ``"quadprog"`` solver needs it positive definite.
        solver: Which solver to use; one of `SOLVERS`.

    Returns:
        The minimisers, with ``U``'s shape, device and dtype.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown dual-cone solver {solver!r}; valid solvers: {SOLVERS}.")
    flat = U.reshape(-1, U.shape[-1])
    return project_weights_quadprog(flat, G).reshape(U.shape)
