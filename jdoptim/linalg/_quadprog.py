"""Reference dual-cone projection through quadprog.

It solves each projection as a separate
quadratic program on the CPU in float64, as the reference implementation of UPGrad does; the fast
batched solver in `jdoptim.linalg._dual_cone` is checked against it.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor


def project_weights_quadprog(U: Tensor, G: Tensor) -> Tensor:
    """Solve ``min_v vᵀ G v  s.t.  v ≥ u`` for every row ``u`` of ``U`` with quadprog.

    Args:
        U: Lower bounds, shape ``[k, m]``.
        G: Symmetric positive-definite matrix, shape ``[m, m]``. quadprog rejects singular
            matrices: regularise ``G`` first.

    Returns:
        The minimisers, shape ``[k, m]``, on ``U``'s device and dtype.
    """
    G_np = G.detach().cpu().to(torch.float64).numpy()
    U_np = U.detach().cpu().to(torch.float64).numpy()
    m = G_np.shape[0]
    identity = np.eye(m)
    zeros = np.zeros(m)
    # quadprog minimises ½ xᵀGx − aᵀx subject to Cᵀx ≥ b.
    rows = [quadprog.solve_qp(G_np, zeros, identity, u, 0)[0] for u in U_np]
    V = np.stack(rows) if rows else np.zeros((0, m))
    return torch.as_tensor(V, dtype=U.dtype, device=U.device)
