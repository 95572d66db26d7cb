"""UPGrad and DualProj on the Gramians of real training runs, against the independent reference.

Every Gramian of ``tests/data/gramian_corpus.npz`` (see `tests.gramian_corpus`: float32, as
produced by the examples' setups without label smoothing; zero, tiny and repeated gradients,
indefinite by rounding) is given to `UPGradWeighting` and `DualProjWeighting`:

- in float32, as produced, and in float64 with the same values (also with its rows in a random
  order), against the float32 bars of `tests.dual_cone_reference.BARS` (within 2e-3 of the exact
  update's norm plus 1e-3 of the largest row norm, no cosine below -1e-5): these values carry
  float32's rounding (eigenvalues down to -1e-7 of the largest, subnormal products of tiny
  rows), which decides the projection to about that accuracy whatever the dtype they are
  given in;
- in float64 as the PSD matrix ``L Lᵀ`` of the reference's square root ``L`` (the same rows, to
  float32's rounding, with a consistent float64 Gramian), also with its rows in a random order,
  against the float64 bars (within 1e-7 plus 1e-8, no cosine below -1e-10);
- one matrix per setup in bfloat16 and float16.

The weights must come back finite, without an exception; the reference is NNLS on the Moreau
decomposition through a square root of the Gramian (`tests.dual_cone_reference`). Conflicts
count wherever the update is not negligible (above 1e-8, in float32 1e-3, of the largest row
norm).

A few corpus matrices hold rows below 1e-21 whose products with each other are float32
subnormals (a handful of bits): their cosine matrix is indefinite by up to 3.7, not by rounding,
so no positive semi-definite repair defines "the" projection (the reference's, which clips the
cosine matrix's eigenvalues, conflicts with well-resolved rows by cosines down to -0.03 there).
`jdoptim.linalg.gramian` no longer forms such Gramians (it goes to float64). On these the
weights must still come back finite without an exception and, with the rows in their order,
not conflict with any row whose squared norm is a normal float32 number well above the
subnormals (``G_ii ≥ 1e-30``); with the rows permuted the answer may differ (one matrix gives a
conflict of -0.4 with a resolved row then), and only finiteness is required.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from jdoptim import DualProjWeighting, UPGradWeighting
from tests.dual_cone_reference import (
    BARS,
    cosines,
    dualproj_reference,
    gramian_root,
    resolved,
    upgrad_reference,
    violations,
)
from tests.gramian_corpus import load_corpus

CORPUS = load_corpus()
METHODS = {
    "upgrad": (UPGradWeighting, upgrad_reference),
    "dualproj": (DualProjWeighting, dualproj_reference),
}
HALF = sorted({g.source: i for i, g in enumerate(CORPUS)}.values())
"""One Gramian per setup (its last) for the half-precision checks."""


@functools.cache
def _reference(index: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference weights and the square root of the corpus Gramian ``index``."""
    G = CORPUS[index].gramian.astype(np.float64)
    return METHODS[method][1](G), gramian_root(G)


def _solve(method: str, G: torch.Tensor) -> tuple[torch.Tensor | None, str | None]:
    try:
        return METHODS[method][0]()(G), None
    except Exception as error:  # any exception is a failure of the contract
        return None, f"raised {type(error).__name__}: {str(error)[:200]}"


@functools.cache
def _resolved(index: int) -> bool:
    """Whether the corpus Gramian ``index`` defines a projection: positive semi-definite up to
    float32's rounding relative to its rows' norms (`tests.dual_cone_reference.resolved`)."""
    return resolved(CORPUS[index].gramian, torch.float32)


def _check(
    index: int, method: str, dtype: torch.dtype, permute: bool = False, consistent: bool = False
) -> list[str]:
    G32 = CORPUS[index].gramian
    w_ref, root = _reference(index, method)
    if not consistent and not _resolved(index):
        return _check_unresolved(index, method, dtype, permute)
    values = root @ root.T if consistent else G32
    if dtype in (torch.bfloat16, torch.float16) and np.abs(values).max() > 0:
        # Scaled by a power of two to a largest entry of at most 1, within half precision's range.
        values = values / 2.0 ** np.ceil(np.log2(np.abs(values).max()))
    G = torch.from_numpy(values.copy()).to(dtype)
    m = G.shape[0]
    order = torch.randperm(m, generator=torch.Generator().manual_seed(index)) if permute else None
    weights, error = _solve(method, G if order is None else G[order][:, order])
    if error is not None:
        return [error]
    if weights.dtype != dtype or weights.shape != (m,):
        return [f"weights of dtype {weights.dtype} and shape {tuple(weights.shape)}"]
    if order is not None:
        unpermuted = torch.empty_like(weights)
        unpermuted[order] = weights
        weights = unpermuted
    if consistent:
        return violations(weights, w_ref, values, BARS[torch.float64], root)
    if dtype in (torch.float64, torch.float32):
        # The values are those of the float32 corpus matrix: same reference, float32's bars.
        return violations(weights, w_ref, G32, BARS[torch.float32], root)
    half = G.double().numpy()  # half precision: the reference on the rounded values
    return violations(weights, METHODS[method][1](half), half, BARS[dtype])


def _check_unresolved(index: int, method: str, dtype: torch.dtype, permute: bool) -> list[str]:
    """No exception, finite weights, no conflict with the rows of normal squared norm."""
    G32 = CORPUS[index].gramian
    G = torch.from_numpy(G32.copy()).to(dtype)
    m = G.shape[0]
    order = torch.randperm(m, generator=torch.Generator().manual_seed(index)) if permute else None
    weights, error = _solve(method, G if order is None else G[order][:, order])
    if error is not None:
        return [error]
    if not bool(torch.isfinite(weights).all()):
        return [f"non-finite weights {weights}"]
    if order is not None:
        unpermuted = torch.empty_like(weights)
        unpermuted[order] = weights
        weights = unpermuted
    if permute:
        return []
    values = G.double().numpy()
    normal = np.diag(values) >= 1e-30
    worst = float(cosines(weights, values, gramian_root(values))[normal].min(initial=0.0))
    bar = BARS[torch.float64 if dtype == torch.float64 else torch.float32].conflict
    return [] if worst >= -bar else [f"conflict with a resolved row: cosine {worst:.3g}"]


def _name(index: int) -> str:
    return f"{index}-{CORPUS[index].name}"


INDICES = range(len(CORPUS))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("index", INDICES, ids=_name)
def test_float64(index: int, method: str):
    assert _check(index, method, torch.float64) == []


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("index", INDICES, ids=_name)
def test_float64_consistent(index: int, method: str):
    assert _check(index, method, torch.float64, consistent=True) == []


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("index", INDICES, ids=_name)
def test_float64_consistent_permuted(index: int, method: str):
    assert _check(index, method, torch.float64, permute=True, consistent=True) == []


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("index", INDICES, ids=_name)
def test_float64_permuted(index: int, method: str):
    assert _check(index, method, torch.float64, permute=True) == []


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("index", INDICES, ids=_name)
def test_float32(index: int, method: str):
    assert _check(index, method, torch.float32) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("index", HALF, ids=_name)
def test_half_precision(index: int, method: str, dtype: torch.dtype):
    assert _check(index, method, dtype) == []


def test_corpus_is_degenerate():
    """The corpus holds what it is there for: zero and tiny diagonal entries, indefinite
    float32 products, and the sizes of the examples' batches."""
    diagonals = [np.diag(g.gramian) for g in CORPUS]
    assert sum(bool(np.any(d == 0)) for d in diagonals) >= 5
    assert sum(bool(np.any(d < 1e-10 * d.max())) for d in diagonals if d.max() > 0) >= 50
    indefinite = [np.linalg.eigvalsh(g.gramian.astype(np.float64)).min() < 0 for g in CORPUS]
    assert sum(indefinite) >= 20
    assert max(g.gramian.shape[0] for g in CORPUS) >= 96
    assert len({g.source for g in CORPUS}) >= 5


def test_the_unresolved_matrices_are_few_and_have_subnormal_products():
    unresolved = [i for i in INDICES if not _resolved(i)]
    assert len(unresolved) <= 10
    for index in unresolved:
        assert np.diag(CORPUS[index].gramian)[np.diag(CORPUS[index].gramian) > 0].min() < 1e-38


def test_reference_meets_the_bars_on_the_corpus():
    """The bars are within reach of an exact answer: the reference weights, rounded to each
    dtype, meet them on the PSD matrix ``L Lᵀ`` they solve exactly (on the corpus matrix itself,
    indefinite by rounding, the reference is only as exact as that rounding)."""
    for index in INDICES:
        for method in METHODS:
            w_ref, root = _reference(index, method)
            psd = root @ root.T
            for dtype in (torch.float64, torch.float32):
                rounded = torch.from_numpy(w_ref).to(dtype)
                found = violations(rounded, w_ref, psd, BARS[dtype], root)
                assert found == [], (_name(index), method, dtype, found)
