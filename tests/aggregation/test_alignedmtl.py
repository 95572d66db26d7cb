from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim import AlignedMTL, AlignedMTLWeighting

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def _reference(J: Tensor, u: Tensor, mode: str, rank: int) -> Tensor:
    """sqrt(λ*) Q Pᵀ u from the SVD J = P S Qᵀ, keeping the top `rank` singular values."""
    P, S, Qt = torch.linalg.svd(J, full_matrices=False)
    P, S, Qt = P[:, :rank], S[:rank], Qt[:rank]
    eigenvalues = S**2
    star = {
        "min": eigenvalues.min(),
        "median": eigenvalues.sort().values[(rank - 1) // 2],
        "rmse": eigenvalues.mean(),
    }[mode]
    return star.sqrt() * Qt.T @ (P.T @ u)


def test_torchjd_documented_values():
    # TorchJD 0.18 documentation: AlignedMTL()(J) = [0.2133, 0.9673, 0.9673] and
    # AlignedMTLWeighting()(G) = [0.5591, 0.4083].
    torch.testing.assert_close(
        AlignedMTL()(J_BASE),
        torch.tensor([0.2133, 0.9673, 0.9673], dtype=J_BASE.dtype),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        AlignedMTLWeighting()(J_BASE @ J_BASE.T),
        torch.tensor([0.5591, 0.4083], dtype=J_BASE.dtype),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@pytest.mark.parametrize(("m", "rank"), [(4, 4), (5, 5), (6, 2)])
def test_matches_the_svd_reference(mode: str, m: int, rank: int):
    generator = torch.Generator().manual_seed(m + rank)
    J = torch.randn(m, rank, generator=generator, dtype=torch.float64) @ torch.randn(
        rank, 8, generator=generator, dtype=torch.float64
    )
    u = torch.rand(m, generator=generator, dtype=torch.float64)
    update = AlignedMTL(u, scale_mode=mode)(J)
    torch.testing.assert_close(update, _reference(J, u, mode, rank))


def test_aligned_gradients_are_orthogonal_with_equal_norms():
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = J @ J.T
    weighting = AlignedMTLWeighting()
    B = torch.stack([weighting.__class__(pref_vector=e)(G) for e in torch.eye(4)], dim=1)
    aligned = J.T @ B  # columns: the aligned gradients
    smallest = torch.linalg.eigvalsh(G)[0]
    torch.testing.assert_close(aligned.T @ aligned, smallest * torch.eye(4, dtype=J.dtype))


def test_can_conflict_for_more_than_two_objectives():
    generator = torch.Generator().manual_seed(0)
    cosines = [
        (J @ update / (J.norm(dim=1) * update.norm())).min().item()
        for J in torch.randn(100, 4, 6, generator=generator, dtype=torch.float64)
        for update in [AlignedMTL()(J)]
    ]
    assert min(cosines) < -0.1


def test_zero_gramian_gives_the_preferences():
    G = torch.zeros(3, 3, dtype=torch.float64)
    torch.testing.assert_close(AlignedMTLWeighting([1.0, 2.0, 3.0])(G), G.new_tensor([1, 2, 3]))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")
    with pytest.raises(ValueError, match="2 preferences but the Jacobian has 3 rows"):
        AlignedMTL([1.0, 2.0])(torch.randn(3, 4))


def test_huge_and_half_precision_gramians_do_not_fail():
    # float32 eigh failed on finite Gramians with entries near 1e37, half precision had no eigh.
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    G = J @ J.T
    expected = AlignedMTLWeighting()(G)
    torch.testing.assert_close(
        AlignedMTLWeighting()((G * 1e37).float()).double(), expected, rtol=1e-5, atol=0
    )
    for dtype in (torch.bfloat16, torch.float16):
        weights = AlignedMTLWeighting()(G.to(dtype))
        assert weights.dtype == dtype
        torch.testing.assert_close(weights.double(), expected, rtol=0, atol=3e-2)


def test_the_cut_off_is_the_gramians_precision():
    # Singular values 1 and 1e-5: the Gramian's eigenvalue 1e-10 is above float64's rounding
    # level (kept, as in TorchJD 0.18), below float32's (dropped, for a float32 Gramian).
    P, _ = torch.linalg.qr(torch.randn(2, 2, generator=torch.Generator().manual_seed(8)).double())
    Q, _ = torch.linalg.qr(torch.randn(5, 2, generator=torch.Generator().manual_seed(9)).double())
    J = P @ torch.diag(torch.tensor([1.0, 1e-5], dtype=torch.float64)) @ Q.T
    u = torch.full((2,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL()(J), _reference(J, u, "min", 2))
    weights = AlignedMTLWeighting()((J @ J.T).float()).double()
    torch.testing.assert_close(weights @ J, _reference(J, u, "min", 1), rtol=1e-4, atol=1e-6)
