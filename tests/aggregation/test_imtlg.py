"""IMTL-G: equal projections onto the unit gradients, at every scale, from the Gramian alone."""

from __future__ import annotations

import pytest
import torch

from jdoptim import IMTLG
from jdoptim.aggregation import IMTLGWeighting


def _normal(m: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e13, 1e14, 1e30])
def test_the_update_scales_with_the_rows(scale: float):
    # TorchJD's absolute test |1ᵀ G⁺ d| < 1e-12 returns 0 once the row norms pass about 1e13.
    J = _normal(4, 7, 0)
    torch.testing.assert_close(IMTLG()(J * scale) / scale, IMTLG()(J), rtol=1e-10, atol=0)


def test_rows_of_very_different_norms_get_equal_projections():
    J = _normal(5, 8, 1) * torch.tensor([1e-18, 1e-6, 1.0, 1e3, 1e6], dtype=torch.float64)[:, None]
    update = IMTLG()(J)
    projections = (J @ update) / J.norm(dim=1)
    torch.testing.assert_close(projections, projections[:1].expand(5), rtol=1e-9, atol=0)
    # Independent rows: w = D⁻¹ C⁻¹ 1 / (1ᵀ D⁻¹ C⁻¹ 1) with C the correlation matrix.
    norms = J.norm(dim=1)
    v = torch.linalg.solve((J / norms[:, None]) @ (J / norms[:, None]).T, torch.ones(5).double())
    expected = v / norms
    torch.testing.assert_close(
        IMTLGWeighting()(J @ J.T), expected / expected.sum(), rtol=1e-9, atol=0
    )


def test_dependent_rows_follow_the_pseudo_inverse():
    J = _normal(3, 6, 2)
    J = torch.cat([J, (J[0] + 2 * J[1])[None], 2 * J[2:3]])
    G = J @ J.T
    v = torch.linalg.pinv(G, hermitian=True) @ G.diagonal().sqrt()
    torch.testing.assert_close(IMTLGWeighting()(G), v / v.sum(), rtol=1e-9, atol=1e-12)
    g = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(IMTLG()(torch.cat([g, 2 * g])), 5 / 3 * g[0])
    torch.testing.assert_close(IMTLG()(torch.cat([g, -g])), torch.zeros(2, dtype=torch.float64))


def test_float32_rank_deficient_rows_are_permutation_invariant():
    # A 4 x 3 Jacobian has rank 3: its float32 Gramian has one eigenvalue at the rounding level.
    generator = torch.Generator().manual_seed(3)
    J = torch.randn(4, 3, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None]
    update = IMTLG()(J)
    for seed in range(5):
        permutation = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(IMTLG()(J[permutation]), update, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gramians_are_solved(dtype: torch.dtype):
    J = _normal(3, 5, 4)
    G = (J @ J.T).to(dtype)
    weights = IMTLGWeighting()(G)
    assert weights.dtype == dtype
    torch.testing.assert_close(weights.double(), IMTLGWeighting()(G.double()), rtol=0, atol=2e-2)
