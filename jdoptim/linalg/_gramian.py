"""Forming Gramians safely, and small operations on Gramians shared by the weightings."""

from __future__ import annotations

import math

import torch
from torch import Tensor

HEADROOM = 2.0**16
"""How far inside its dtype's range a Gramian formed without scaling keeps its entries: up to
``finfo.max / HEADROOM`` and, for a row that is not zero, its squared norm from
``finfo.tiny · HEADROOM`` on, so that what a weighting computes from them stays finite and
normal too."""


def solve_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype methods compute in for input of ``dtype``: float32 for half precision
    (bfloat16, float16), the input's dtype otherwise. `gramian` forms Gramians in it (or wider,
    where it would overflow or underflow)."""
    return torch.promote_types(dtype, torch.float32)


def row_magnitudes(matrix: Tensor) -> Tensor:
    """The largest absolute entry of each row of a 2-D ``matrix`` with ``n ≥ 1`` columns, in one
    pass and without a copy of ``matrix``."""
    return torch.maximum(-matrix.amin(dim=1), matrix.amax(dim=1))  # faster than aminmax


def in_range(magnitudes: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """Whether rows of ``n`` entries of at most ``magnitudes`` (their largest absolute entries)
    have a Gramian whose entries stay within ``dtype``'s range with `HEADROOM`, as a 0-d bool
    tensor (without host synchronisation).

    Every entry of the Gramian is at most ``n · max²``; the squared norm of a row that is not
    zero is at least its largest entry squared. Rows that are exactly zero have zero products,
    which are exact. Non-finite magnitudes count as in range: their Gramian is not finite in any
    dtype, and the weightings report it.
    """
    info = torch.finfo(dtype)
    high = math.sqrt(info.max / HEADROOM / n)
    low = math.sqrt(info.tiny * HEADROOM)
    largest = magnitudes.max()
    smallest = torch.where(magnitudes > 0, magnitudes, math.inf).min()
    return ~((largest > high) | (smallest < low))


def kept(G: Tensor, magnitudes: Tensor | None = None) -> Tensor:
    """Whether a Gramian ``G`` formed in its dtype kept its entries, as a 0-d bool tensor
    (without host synchronisation): its diagonal (which bounds every entry, and every partial
    sum of the products that form it) is finite and at most ``finfo.max / HEADROOM``, its
    entries that are not zero at least ``finfo.tiny · HEADROOM``, and so are the squares of the
    ``magnitudes`` that are not zero (the largest entries of the rows of its factors, if
    given)."""
    info = torch.finfo(G.dtype)
    if G.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=G.device)
    diagonal = G.diagonal()
    low = info.tiny * HEADROOM
    smallest = torch.where(diagonal > 0, diagonal, math.inf).min()
    fits = (diagonal.max() <= info.max / HEADROOM) & (smallest >= low)
    if magnitudes is not None and magnitudes.numel():
        fits &= torch.where(magnitudes > 0, magnitudes, math.inf).min() >= math.sqrt(low)
    return fits


def fits_dtype(matrix: Tensor, G: Tensor) -> Tensor:
    """Whether ``G``, formed from ``matrix`` in ``G``'s dtype, is its Gramian (see `kept`), as a
    0-d bool tensor. A row whose squared norm flushed to zero is found from ``matrix`` itself,
    looking only at the rows whose diagonal entry is zero."""
    fits = kept(G)
    zero = G.diagonal() == 0
    if bool(fits & zero.any()):
        fits = fits & (row_magnitudes(matrix[zero]) == 0).all()
    return fits


def gramian(matrix: Tensor) -> Tensor:
    r"""The Gramian $J J^\top$ of the rows of ``matrix``, formed where it neither overflows nor
    underflows.

    - Half precision (bfloat16, float16) is formed in float32 (a float32 copy of ``matrix``).
    - float32 is formed in float32, and kept when it did not leave float32's range (the test,
      on the result: its diagonal, which bounds every entry and every partial sum of products,
      is finite and at most ``finfo.max`` and its non-zero entries at least ``finfo.tiny``, both
      with a margin of $2^{16}$; a zero diagonal entry is checked against its row of
      ``matrix``, which must then be zero). Otherwise it is formed again in float64, where the
      Gramian of any float32 matrix is representable: the result is the Gramian itself, to
      float64's precision.
    - float64 is formed in float64, as it is. Its Gramian leaves float64's range only for rows
      of norm above about $1.3\cdot10^{154}$ (entries overflow to ``inf``, so a weighting returns
      NaN weights, which `jdoptim.JDOptimizer`'s non-finite policy handles) or below about
      $1.5\cdot10^{-154}$ (entries become subnormal or zero, and such rows count as zero).

    In the normal case the cost is one matrix product, with no copy of ``matrix``, and a few
    operations on the diagonal with one host synchronisation; out of range, a second product. A
    weighting that depends on the scale of the Gramian sees the true Gramian in every case, only
    in a wider dtype.

    Args:
        matrix: The matrix ``[m, n]`` (a Jacobian, one row per objective), floating.

    Returns:
        The Gramian ``[m, m]``, in the dtype it was formed in: float32 for half-precision input,
        float32 or float64 for float32 input, float64 for float64 input.

    Raises:
        TypeError: If ``matrix`` is not a floating-point tensor.
        ValueError: If ``matrix`` is not 2-D.

    Examples:
        >>> import torch
        >>> from jdoptim.linalg import gramian
        >>> J = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> gramian(J)
        tensor([[25.,  3.],
                [ 3.,  1.]])
        >>> G = gramian(J * 1e20)  # J Jᵀ would overflow float32
        >>> G.dtype, torch.allclose(G, (J.double() * 1e20) @ (J.double() * 1e20).T)
        (torch.float64, True)
    """
    if not isinstance(matrix, Tensor) or not matrix.is_floating_point():
        raise TypeError(f"Expected a floating-point tensor, got {_describe(matrix)}.")
    if matrix.ndim != 2:
        raise ValueError(f"Expected a 2-D matrix, got shape {tuple(matrix.shape)}.")
    matrix = matrix.detach()
    m, n = matrix.shape
    dtype = solve_dtype(matrix.dtype)
    if n == 0 or m == 0:
        return matrix.new_zeros((m, m), dtype=dtype)
    if matrix.dtype == torch.float16:
        # |x| ≤ 65504 and |x| ≥ 2⁻²⁴ when not zero: n·x² and x² stay within float32's range.
        work = matrix.to(dtype)
        return work @ work.T
    work = matrix.to(dtype)
    G = work @ work.T
    if dtype == torch.float64 or bool(fits_dtype(work, G)):
        return G
    return scaled_gramian(work, row_magnitudes(work))


def scaled_gramian(matrix: Tensor, magnitudes: Tensor) -> Tensor:
    """The Gramian of a float32 ``matrix``, formed in float64 (where the Gramian of any float32
    matrix is representable: squares from about 2e-90 to 1e77) to float64's precision.

    ``magnitudes`` (the rows' largest absolute entries) is accepted for the callers that hold
    it; the float64 product needs no scaling. This runs only where float32 would overflow or
    underflow, at about twice the cost of the float32 product.
    """
    del magnitudes  # not needed in float64
    wide = matrix.to(torch.float64)
    return wide @ wide.T


def power_of_two(exponents: Tensor, dtype: torch.dtype) -> Tensor:
    """``2**exponents`` exactly, in float32 or float64, for integer exponents within the
    dtype's normal range, from the bits of the result (``torch.ldexp`` rounds through
    float32)."""
    mantissa_bits, bias = (23, 127) if dtype == torch.float32 else (52, 1023)
    bits = (exponents.to(torch.int64) + bias) << mantissa_bits
    if dtype == torch.float32:
        return bits.to(torch.int32).view(torch.float32)
    return bits.view(torch.float64)


def weighted_sum(weights: Tensor, matrix: Tensor) -> Tensor:
    """``weightsᵀ matrix``, formed in the wider of the two dtypes and returned in ``matrix``'s
    dtype: weights computed from a Gramian formed in a wider dtype (see `gramian`) meet the
    matrix there."""
    if weights.dtype == matrix.dtype:
        return weights @ matrix
    work = torch.promote_types(weights.dtype, matrix.dtype)
    return (weights.to(work) @ matrix.to(work)).to(matrix.dtype)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype}"
    return type(value).__name__


def normalize_gramian(G: Tensor, eps: float) -> Tensor:
    """Divide ``G`` by its trace (the squared Frobenius norm of the Jacobian).

    A Gramian whose trace is not above ``eps`` is treated as zero, as in the reference
    implementation of UPGrad (arXiv 2406.16232). The division happens on ``G``'s device, with no
    synchronisation with the host.
    """
    trace = G.diagonal().sum()
    return G * torch.where(trace > eps, trace.reciprocal(), torch.zeros_like(trace))


def regularize_gramian(G: Tensor, eps: float) -> Tensor:
    """Return ``G + eps·I``."""
    return G + eps * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
