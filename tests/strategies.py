"""Hypothesis strategies for the degenerate Jacobians that real training produces.

Clean random matrices hide most numerical failures. The Jacobians drawn here combine the
degeneracies seen in training runs: zero rows (gradients that underflowed), exact duplicates
(repeated samples), tiny rows (well-classified samples, 1e-6 to 1e-20 times the others), low
rank, a large common component (objectives that mostly agree), a weakly stationary point (a
positive combination of some rows is 0), row norms spread over many orders of magnitude,
an overall scale from 1e-30 to 1e30, the rounding of the working dtype (float64, float32,
bfloat16, float16) and any row order.

Every matrix is finite in its dtype. Tests that need an exact reference cast the drawn matrix
to float64: that is the input the method was given, rounding included.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import Tensor

import jdoptim.linalg

FLOAT_DTYPES: tuple[torch.dtype, ...] = (
    torch.float64,
    torch.float32,
    torch.bfloat16,
    torch.float16,
)
"""The dtypes a Jacobian can come in."""

_LOG_SCALE = {
    torch.float64: (-30.0, 30.0),
    torch.float32: (-30.0, 30.0),
    torch.bfloat16: (-30.0, 30.0),
    # float16 overflows at 65504 and goes subnormal below 6e-5.
    torch.float16: (-2.0, 2.0),
}

DEGENERACIES: tuple[str, ...] = (
    "zero_rows",
    "duplicated_rows",
    "tiny_rows",
    "low_rank",
    "common_component",
    "weakly_stationary",
    "spread_norms",
)
"""What can be done to a random matrix, in this order, each at most once."""


def _degenerate(
    m: int,
    n: int,
    degeneracies: frozenset[str],
    rank: int,
    log_tiny: float,
    log_spread: float,
    log_scale: float,
    seed: int,
    dtype: torch.dtype,
) -> Tensor:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def some_rows(count: int) -> Tensor:
        return torch.randperm(m, generator=generator)[:count]

    J = randn(m, rank) @ randn(rank, n) if "low_rank" in degeneracies else randn(m, n)
    if "common_component" in degeneracies:
        J = J + 5.0 * J.norm(dim=1).mean() / math.sqrt(n) * randn(1, n)
    if "weakly_stationary" in degeneracies and m >= 2:
        # Some positive combination of the first rows is 0 (with a zero weight on the rest).
        k = max(1, m // 2)
        coefficients = torch.rand(k, generator=generator, dtype=torch.float64) + 0.1
        J[k] = -(coefficients[:, None] * J[:k]).sum(dim=0)
    if "spread_norms" in degeneracies:
        J = J * torch.logspace(-log_spread, log_spread, m, dtype=torch.float64)[:, None]
    if "duplicated_rows" in degeneracies and m >= 2:
        source, target = some_rows(2).tolist()
        J[target] = J[source]
    if "tiny_rows" in degeneracies:
        J[some_rows(max(1, m // 4))] *= 10.0**log_tiny
    if "zero_rows" in degeneracies:
        J[some_rows(max(1, m // 4))] = 0.0
    J = J[torch.randperm(m, generator=generator)]
    # Scale by the largest entry so that the matrix is finite in its dtype.
    largest = J.abs().max()
    if largest > 0:
        J = J / largest
    low, high = _LOG_SCALE[dtype]
    J = J * 10.0 ** min(max(log_scale, low), high)
    return J.to(dtype)


@st.composite
def degenerate_jacobians(
    draw: st.DrawFn,
    max_m: int = 12,
    max_n: int = 20,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    min_m: int = 1,
) -> Tensor:
    """Draw a finite ``[m, n]`` Jacobian with some of `DEGENERACIES`, in one of ``dtypes``.

    The overall scale is drawn from 1e-30 to 1e30 (1e-2 to 1e2 in float16), the tiny rows from
    1e-6 to 1e-20 of the others, the row norms spread over up to 1e-6..1e6.
    """
    m = draw(st.integers(min_m, max_m))
    n = draw(st.integers(1, max_n))
    degeneracies = frozenset(draw(st.sets(st.sampled_from(DEGENERACIES))))
    rank = draw(st.integers(1, max(1, min(m, n) - 1)))
    log_tiny = draw(st.floats(-20.0, -6.0))
    log_spread = draw(st.floats(0.0, 6.0))
    log_scale = draw(st.one_of(st.just(0.0), st.floats(-30.0, 30.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from(dtypes))
    return _degenerate(m, n, degeneracies, rank, log_tiny, log_spread, log_scale, seed, dtype)


@st.composite
def loss_vectors(
    draw: st.DrawFn,
    max_m: int = 12,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    m: int | None = None,
):
    """Draw ``m`` finite positive losses of one of ``dtypes``, each from 1e-30 to 1e30 (float16:
    from 1e-7 to 6e4, nearly its whole positive range); ``m`` is drawn up to ``max_m`` unless
    given."""
    dtype = draw(st.sampled_from(dtypes))
    m = draw(st.integers(1, max_m)) if m is None else m
    low, high = (-7.0, 4.8) if dtype == torch.float16 else (-30.0, 30.0)
    exponents = draw(st.lists(st.floats(low, high), min_size=m, max_size=m))
    return (10.0 ** torch.tensor(exponents, dtype=torch.float64)).to(dtype)


_GRAMIAN_LOG_SCALE = {
    torch.float64: (-60.0, 60.0),
    torch.float32: (-30.0, 30.0),
    torch.bfloat16: (-30.0, 30.0),
    # float16 overflows at 65504; its subnormals start at 6e-5.
    torch.float16: (-3.0, 3.0),
}


def degenerate_gramian(
    J: Tensor, dtype: torch.dtype, log_scale: float, formed_in_dtype: bool
) -> Tensor:
    """The Gramian of ``J`` (any dtype; its values are used in float64) in ``dtype``, its largest
    diagonal entry scaled to about ``10**log_scale`` (clamped to the dtype's range, see
    `degenerate_gramians`), finite.

    With ``formed_in_dtype``, ``J`` is rounded to ``dtype`` and ``J Jᵀ`` is formed there (as a
    model kept in that dtype does: rounding makes ``G`` indefinite, and half precision may make
    it slightly asymmetric); otherwise ``J Jᵀ`` is formed in float64 and rounded to ``dtype``.
    Either way, as `jdoptim.linalg.gramian` forms Gramians, one whose products would be
    subnormal or overflow in ``dtype`` comes in float64 instead: subnormal products keep a
    handful of bits, and their cosines are then indefinite by far more than rounding.
    """
    J = J.to(torch.float64)
    largest = J.norm(dim=1).max()
    if largest > 0:
        J = J / largest
    low, high = _GRAMIAN_LOG_SCALE[dtype]
    J = J * 10.0 ** (min(max(log_scale, low), high) / 2)
    if formed_in_dtype:
        return jdoptim.linalg.gramian(J.to(dtype))
    G = J @ J.T
    nonzero = G[G != 0].abs()
    if dtype != torch.float64 and nonzero.numel() and nonzero.min() < torch.finfo(dtype).tiny:
        return G
    return G.to(dtype)


@st.composite
def degenerate_gramians(
    draw: st.DrawFn,
    max_m: int = 24,
    max_n: int = 16,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    min_m: int = 1,
) -> Tensor:
    """Draw a finite ``[m, m]`` Gramian of a `degenerate_jacobians` Jacobian, in one of
    ``dtypes``.

    The Jacobian has any of `DEGENERACIES` (zero, duplicated and tiny rows down to 1e-20 of the
    others, rank down to 1, a common component, a weakly stationary point such as 20 rows of
    rank 10 with a positive combination equal to 0, spread norms). The Gramian's largest
    diagonal entry is drawn from 1e-60 to 1e60 in float64, 1e-30 to 1e30 in float32 and bfloat16,
    1e-3 to 1e3 in float16; it is formed either in float64 and rounded, or in the dtype itself
    from the rounded Jacobian (indefinite by rounding, see `degenerate_gramian`).
    """
    J = draw(degenerate_jacobians(max_m, max_n, dtypes=(torch.float64,), min_m=min_m))
    dtype = draw(st.sampled_from(dtypes))
    low, high = _GRAMIAN_LOG_SCALE[dtype]
    log_scale = draw(st.one_of(st.just(0.0), st.floats(low, high)))
    formed_in_dtype = draw(st.booleans()) if dtype != torch.float64 else False
    return degenerate_gramian(J, dtype, log_scale, formed_in_dtype)
