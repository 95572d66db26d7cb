r"""An independent reference for the dual-cone projection, written from the mathematics.

For a Jacobian $J$ (rows $g_i$) and lower bounds $u$, the projection of $y = J^\top u$ onto the
dual cone $K = \{x : Jx \ge 0\}$ follows from Moreau's decomposition $y = \pi_K(y) +
\pi_{K^\circ}(y)$, where the polar cone is $K^\circ = \{-J^\top z : z \ge 0\}$:

$$
z^\star = \arg\min_{z \ge 0} \lVert J^\top z + y \rVert,\qquad
\pi_K(y) = y + J^\top z^\star = J^\top (u + z^\star),
$$

so the weights are $v = u + z^\star$, a nonnegative least-squares problem solved here by scipy's
``nnls`` (Lawson and Hanson) with $A = J^\top$ and $b = -y$. When only the Gramian $G$ is known,
a square root $L$ of $G$ ($G = L L^\top$, from a float64 eigendecomposition, eigenvalues made
negative by rounding set to 0) takes the place of $J$: the projection, measured through $L$, is
the same for every square root.

Everything here runs in float64 NumPy and shares no code with ``jdoptim.linalg``. The helpers
measure, in float64, what the tests of the dual-cone methods compare: the update error
$\lVert J^\top (w - w^\star) \rVert$, the largest row norm $\max_i \lVert g_i \rVert$ and the
cosines between the update and the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import nnls

Array = NDArray[np.float64]


def as_float64(matrix: ArrayLike | torch.Tensor) -> Array:
    """Return ``matrix`` as a float64 NumPy array (half-precision tensors included)."""
    if isinstance(matrix, torch.Tensor):
        return matrix.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(matrix, dtype=np.float64)


def gramian_root(G: ArrayLike | torch.Tensor) -> Array:
    """Return ``L`` of shape ``[m, m]`` with ``L Lᵀ = G`` (``G`` made PSD, see below).

    The root is taken of the matrix of cosines ``C = D G D``, ``D = diag(1 / sqrt(G_ii))``
    (eigenvalues below 0, from rounding, set to 0: ``C = V Λ Vᵀ``, ``L_C = V sqrt(Λ)``), and
    ``L = D⁻¹ L_C``. So each row of ``L`` keeps its norm ``sqrt(G_ii)`` to the last digits even
    when the rows' norms span many orders of magnitude, and any finite scale works. Rows with
    ``G_ii ≤ 0`` (zero gradients) are 0.
    """
    G = as_float64(G)
    if not np.all(np.isfinite(G)):
        raise ValueError("The reference needs a finite Gramian.")
    G = (G + G.T) / 2.0
    diagonal = np.diag(G).copy()
    rows = diagonal > 0.0
    root = np.zeros_like(G)
    if not rows.any():
        return root
    norms = np.sqrt(diagonal[rows])
    C = G[np.ix_(rows, rows)] / norms[:, None] / norms[None, :]
    eigenvalues, eigenvectors = np.linalg.eigh(C)
    root[rows, : int(rows.sum())] = (
        norms[:, None] * eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))
    )
    return root


def project_with_jacobian(U: ArrayLike, J: ArrayLike) -> Array:
    """Solve ``min_v ‖Jᵀv‖²`` subject to ``v ≥ u`` for every row ``u`` of ``U`` (``[..., m]``).

    Returns ``u + z*`` with ``z* = argmin_{z ≥ 0} ‖Jᵀz + Jᵀu‖`` (NNLS). The columns of ``Jᵀ``
    are normalised (``z_j`` rescaled back) and so is the right-hand side, which leaves the
    problem unchanged and keeps NNLS's tolerances relative to each row; zero rows get
    ``z_j = 0``.
    """
    U = as_float64(U)
    J = as_float64(J)
    flat = U.reshape(-1, J.shape[0])
    norms = np.linalg.norm(J, axis=1)
    rows = norms > 0.0
    A = (J[rows] / norms[rows, None]).T
    V = flat.copy()
    for k, u in enumerate(flat):
        b = -(A @ (u[rows] * norms[rows]))
        size = float(np.linalg.norm(b))
        if size == 0.0 or not rows.any():
            continue
        z, _ = nnls(A, b / size, maxiter=50 * max(A.shape))
        V[k, rows] += z * size / norms[rows]
    return V.reshape(U.shape)


def reference_weights(U: ArrayLike | torch.Tensor, G: ArrayLike | torch.Tensor) -> Array:
    """Solve ``min_v vᵀGv`` subject to ``v ≥ u`` for every row ``u`` of ``U``, in float64.

    ``G`` is replaced by the PSD part of its symmetric part (see `gramian_root`).

    Examples:
        >>> import numpy as np
        >>> G = np.array([[1.0, -1.0], [-1.0, 4.0]])
        >>> reference_weights(np.eye(2), G).round(6)
        array([[1.  , 0.25],
               [1.  , 1.  ]])
    """
    return project_with_jacobian(U, gramian_root(G))


def preferences(m: int, pref: ArrayLike | None = None) -> Array:
    """Return ``pref`` as float64, or the uniform preferences ``1/m`` of UPGrad and DualProj."""
    return np.full(m, 1.0 / m) if pref is None else as_float64(pref)


def upgrad_reference(G: ArrayLike | torch.Tensor, pref: ArrayLike | None = None) -> Array:
    """UPGrad's weights ``Σ_i v⁽ⁱ⁾``, ``v⁽ⁱ⁾ = argmin_{v ≥ u_i e_i} vᵀGv``, in float64."""
    G = as_float64(G)
    return reference_weights(np.diag(preferences(G.shape[0], pref)), G).sum(axis=0)


def dualproj_reference(G: ArrayLike | torch.Tensor, pref: ArrayLike | None = None) -> Array:
    """DualProj's weights ``argmin_{v ≥ u} vᵀGv``, in float64."""
    G = as_float64(G)
    return reference_weights(preferences(G.shape[0], pref), G)


def update_norm(w: ArrayLike | torch.Tensor, root: ArrayLike) -> float:
    """``‖Jᵀw‖ = sqrt(wᵀGw)``, computed as ``‖Lᵀw‖`` from a square root ``L`` of ``G``."""
    return float(np.linalg.norm(as_float64(root).T @ as_float64(w)))


def update_error(
    w: ArrayLike | torch.Tensor, w_ref: ArrayLike | torch.Tensor, root: ArrayLike
) -> float:
    """``‖Jᵀ(w − w*)‖ = sqrt((w − w*)ᵀG(w − w*))``, from a square root ``L`` of ``G``."""
    return update_norm(as_float64(w) - as_float64(w_ref), root)


def largest_row_norm(G: ArrayLike | torch.Tensor) -> float:
    """``max_i ‖g_i‖ = sqrt(max_i G_ii)`` (negative diagonal entries, from rounding, count 0)."""
    return float(np.sqrt(max(float(np.max(np.diag(as_float64(G)), initial=0.0)), 0.0)))


def cosines(
    w: ArrayLike | torch.Tensor, G: ArrayLike | torch.Tensor, root: ArrayLike | None = None
) -> Array:
    """The cosines ``(Gw)_i / (sqrt(G_ii) ‖Jᵀw‖)`` between the rows and the update ``Jᵀw``.

    The agreements ``(Gw)_i`` are computed on ``G`` as given (in float64), since that is the
    matrix the method saw; the update's norm is ``‖Lᵀw‖`` from a square root ``L`` of ``G``
    (`gramian_root`, computed if not given), which stays meaningful where rounding has made
    ``G`` indefinite. A row with ``G_ii ≤ 0`` (a zero gradient) has cosine 0 with everything,
    and all cosines are 0 for a zero update.
    """
    G = as_float64(G)
    w = as_float64(w)
    if not np.all(np.isfinite(w)):
        return np.full(G.shape[0], np.nan)
    scale = float(np.max(np.abs(np.diag(G)), initial=0.0))
    result = np.zeros(G.shape[0])
    if scale == 0.0:
        return result
    root = gramian_root(G) if root is None else as_float64(root)
    # Cosines do not depend on the scale; dividing by it keeps Gw finite.
    norm = update_norm(w, root / np.sqrt(scale))
    if norm == 0.0:
        return result
    Gw = (G / scale) @ w
    diagonal = np.diag(G) / scale
    rows = diagonal > 0.0
    result[rows] = Gw[rows] / (np.sqrt(diagonal[rows]) * norm)
    return result


def kkt_residuals(U: ArrayLike, G: ArrayLike, V: ArrayLike) -> dict[str, float]:
    """The KKT residuals of ``V`` for ``min_v vᵀGv`` s.t. ``v ≥ u`` (rows of ``U``), relative.

    ``λ = Gv`` must be ``≥ 0``, ``v ≥ u`` and, for each ``i``, ``λ_i = 0`` or ``v_i = u_i``.
    Each residual is dimensionless (0 for an exact solution): ``λ_i`` is divided by the scale
    of its terms, ``‖g_i‖ Σ_j ‖g_j‖ |v_j|``, and ``v − u`` by ``max_j |v_j|``; complementarity
    is the larger over ``i`` of the smaller of the two.
    """
    G = as_float64(G)
    U = as_float64(U).reshape(-1, G.shape[0])
    V = as_float64(V).reshape(U.shape)
    row_norms = np.sqrt(np.clip(np.diag(G), 0.0, None))
    worst = {"dual_feasibility": 0.0, "primal_feasibility": 0.0, "complementarity": 0.0}
    for u, v in zip(U, V, strict=True):
        terms = row_norms * (row_norms @ np.abs(v))
        lam = np.where(terms > 0.0, (G @ v) / np.where(terms > 0.0, terms, 1.0), 0.0)
        gap = (v - u) / max(float(np.max(np.abs(v), initial=0.0)), np.finfo(np.float64).tiny)
        worst["dual_feasibility"] = max(worst["dual_feasibility"], float(np.max(-lam)))
        worst["primal_feasibility"] = max(worst["primal_feasibility"], float(np.max(-gap)))
        both = np.minimum(np.abs(lam), np.abs(gap))
        worst["complementarity"] = max(worst["complementarity"], float(np.max(both)))
    return worst


@dataclass(frozen=True)
class Bars:
    """What a dual-cone method's weights ``w`` must meet on a Gramian, against the reference
    ``w*`` (all measured in float64 on the input's values).

    - Exactness: ``‖Jᵀ(w − w*)‖ ≤ relative · ‖Jᵀw*‖ + absolute · max_i ‖g_i‖``.
    - No conflict: every cosine between a row and ``Jᵀw`` is at least ``-conflict``, wherever
      the update is not negligible, that is ``‖Jᵀw‖ > negligible · max_i ‖g_i‖``.

    For half-precision input (``rounding`` > 0) the weights come back rounded to the dtype; both
    bars then also allow what rounding ``w*`` to the dtype can cause: ``rounding · S`` for the
    update and ``rounding · S / ‖Jᵀw‖`` for the cosines, where ``S = Σ_j |w_j| ‖g_j‖`` bounds
    the change of ``Jᵀw`` (relative change of each weight at most ``rounding``).

    Both bars also allow the rounding floor ``sqrt(m ε) · S*`` (ε that of the values' dtype,
    ``epsilon``; ``S*`` as ``S`` for
    the reference weights; the negligible size grows by it too): a Gramian rounded at ε
    relative to its rows' norms determines the projection onto a face of a degenerate cone
    (weakly stationary rows, rank-deficient products) only to about that, so that two exact
    methods on the same values may differ by it. On a 13-row float64 Gramian of rank 6 with
    ``S*`` ≈ 1 it is 5e-8, on a 14-row float32 one 1.3e-3.
    """

    relative: float
    absolute: float
    conflict: float
    negligible: float
    rounding: float = 0.0
    epsilon: float = float(np.finfo(np.float64).eps)
    """The rounding of the Gramian's values (of the dtype they come in), for the floor."""


BARS: dict[torch.dtype, Bars] = {
    torch.float64: Bars(relative=1e-7, absolute=1e-8, conflict=1e-10, negligible=1e-8),
    torch.float32: Bars(2e-3, 1e-3, 1e-5, 1e-3, epsilon=torch.finfo(torch.float32).eps),
    torch.bfloat16: Bars(
        2e-3,
        1e-3,
        1e-5,
        1e-3,
        rounding=2 * torch.finfo(torch.bfloat16).eps,
        epsilon=torch.finfo(torch.bfloat16).eps,
    ),
    torch.float16: Bars(
        2e-3,
        1e-3,
        1e-5,
        1e-3,
        rounding=2 * torch.finfo(torch.float16).eps,
        epsilon=torch.finfo(torch.float16).eps,
    ),
}
"""The bars of each input dtype: float64 and float32 as set for the dual-cone solver; half
precision is solved in float32 or better, so it gets float32's, plus the rounding of the
returned weights."""


def resolved(G: ArrayLike | torch.Tensor, dtype: torch.dtype = torch.float64) -> bool:
    """Whether ``G`` is positive semi-definite up to ``dtype``'s rounding relative to its rows'
    norms: its matrix of cosines ``C = D G D`` (``D = diag(1 / sqrt(G_ii))``, zero rows left
    out) has no eigenvalue below ``-10 m ε`` (ε of ``dtype``, float32's for float32 and half
    precision at least). Products of rows so small that they are subnormal in the dtype that
    formed them keep a handful of bits and break this by far; no positive semi-definite repair
    then defines "the" projection."""
    G = as_float64(G)
    G = (G + G.T) / 2.0
    rows = np.diag(G) > 0
    if not rows.any():
        return True
    norms = np.sqrt(np.diag(G)[rows])
    cosine_matrix = G[np.ix_(rows, rows)] / np.outer(norms, norms)
    epsilon = float(torch.finfo(dtype).eps)
    return bool(np.linalg.eigvalsh(cosine_matrix).min() >= -10 * G.shape[0] * epsilon)


def violations(
    w: ArrayLike | torch.Tensor,
    w_ref: ArrayLike,
    G: ArrayLike | torch.Tensor,
    bars: Bars,
    root: ArrayLike | None = None,
    check_error: bool = True,
) -> list[str]:
    """How the weights ``w`` fail ``bars`` on the Gramian ``G`` (as given to the method) against
    the reference weights ``w_ref``; empty if they meet them. ``root`` is ``gramian_root(G)``
    (computed if not given); ``check_error=False`` checks finiteness and conflicts only."""
    w = as_float64(w)
    G = as_float64(G)
    if not np.all(np.isfinite(w)):
        return [f"non-finite weights {w}"]
    root = gramian_root(G) if root is None else as_float64(root)
    row_norm = largest_row_norm(G)
    found = []
    spread = float(np.abs(w) @ np.linalg.norm(root, axis=1)) * bars.rounding
    # A Gramian rounded at float64's ε (relative to its rows' norms) determines a projection
    # onto a face of a degenerate cone only to about sqrt(m ε) times the size of its terms
    # Σ_i |w_i| ‖g_i‖: below that, two exact methods on the same values may differ.
    # (Of the reference weights; of the weights themselves where no reference is checked.)
    basis = as_float64(w_ref) if check_error else w
    floor = np.sqrt(G.shape[0] * bars.epsilon) * float(np.abs(basis) @ np.linalg.norm(root, axis=1))
    spread += floor
    if check_error:
        error = update_error(w, w_ref, root)
        bar = bars.relative * update_norm(w_ref, root) + bars.absolute * row_norm + spread
        if not error <= bar:
            found.append(f"update error {error:.3g} > bar {bar:.3g} (largest row {row_norm:.3g})")
    norm = update_norm(w, root)
    if norm > bars.negligible * row_norm + floor:
        worst = float(np.min(cosines(w, G, root), initial=0.0))
        if not worst >= -(bars.conflict + spread / norm):
            found.append(f"conflict: cosine {worst:.3g} (update {norm:.3g}, row {row_norm:.3g})")
    return found
