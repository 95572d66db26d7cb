"""UPGrad and DualProj on the Gramians of real training runs, against the independent reference.

Every Gramian of ``tests/data/gramian_corpus.npz`` (see `tests.gramian_corpus`: float32, as
produced by the examples' setups without label smoothing; zero, tiny and repeated gradients,
indefinite by rounding) is given to `UPGradWeighting` and `DualProjWeighting` in float32 (as
produced) and in float64 (the same values), in float64 also with its rows in a random order,
and one matrix per setup in bfloat16 and float16. The weights must come back finite, without
an exception, and meet the bars of `tests.dual_cone_reference.BARS` against
`tests.dual_cone_reference` (NNLS on the Moreau decomposition, through a square root of the
Gramian): float64 within 1e-7 of the exact update's norm plus 1e-8 of the largest row norm and
no cosine below -1e-10; float32 within 2e-3 plus 1e-3 and no cosine below -1e-5; conflicts
count wherever the update is not negligible (above 1e-8, in float32 1e-3, of the largest row
norm).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from jdoptim import DualProjWeighting, UPGradWeighting
from tests.dual_cone_reference import (
    BARS,
    dualproj_reference,
    gramian_root,
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


def _check(index: int, method: str, dtype: torch.dtype, permute: bool = False) -> list[str]:
    G32 = CORPUS[index].gramian
    if dtype in (torch.float64, torch.float32):
        # The input's values are those of the float32 corpus matrix: one reference.
        w_ref, root = _reference(index, method)
        G = torch.from_numpy(G32.copy()).to(dtype)
    else:
        # Half precision: scaled so that the largest entry is 1 (float16 overflows at 65504;
        # the weights do not depend on the scale); the reference on the rounded values.
        G = (torch.from_numpy(G32.copy()) / float(np.abs(G32).max(initial=1e-30))).to(dtype)
        w_ref, root = METHODS[method][1](G.double().numpy()), None
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
    return violations(weights, w_ref, G.double().numpy(), BARS[dtype], root)


def _name(index: int) -> str:
    return f"{index}-{CORPUS[index].name}"


INDICES = range(len(CORPUS))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("index", INDICES, ids=_name)
def test_float64(index: int, method: str):
    assert _check(index, method, torch.float64) == []


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
