from __future__ import annotations

import pytest
import torch

from jdoptim import ConFIG

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


def test_torchjd_documented_value():
    # TorchJD 0.18 documentation: ConFIG()(J) = [0.1588, 2.0706, 2.0706].
    torch.testing.assert_close(
        ConFIG()(J_BASE),
        torch.tensor([0.1588, 2.0706, 2.0706], dtype=J_BASE.dtype),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize("pref", [None, [1.0, 2.0, 0.5, 3.0]])
def test_independent_rows_match_the_normal_equations(pref):
    J = torch.randn(4, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = torch.ones(4, dtype=J.dtype) if pref is None else torch.tensor(pref, dtype=J.dtype)
    units = J / J.norm(dim=1, keepdim=True)
    x = units.T @ torch.linalg.solve(units @ units.T, w)  # minimum-norm solution of U x = w
    u = x / x.norm()
    expected = (J @ u).sum() * u
    update = ConFIG(pref)(J)
    torch.testing.assert_close(update, expected)
    # Every unit row has inner product proportional to its preference: no conflict.
    torch.testing.assert_close(units @ update / update.norm(), w / x.norm())


def test_dependent_rows_can_conflict():
    g, h = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    J = torch.stack([g, h, -0.1 * g - 0.1 * h])  # three directions in a plane
    update = ConFIG()(J)
    assert (J @ update < -1e-3).any()


@pytest.mark.parametrize(
    "J",
    [
        torch.zeros(3, 4, dtype=torch.float64),
        torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64),
        torch.tensor([[1.0, 2.0, 0], [-3.0, -6.0, 0], [0, 0, 1], [0, 0, -5]], dtype=torch.float64),
    ],
    ids=["zero", "opposite", "opposite_pairs"],
)
def test_no_direction_gives_a_zero_update(J):
    torch.testing.assert_close(ConFIG()(J), torch.zeros(J.shape[1], dtype=J.dtype))


def test_zero_rows_are_ignored_and_single_rows_are_kept():
    J = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(ConFIG()(J), ConFIG()(J[[0, 2]]))
    torch.testing.assert_close(ConFIG()(J[:1]), J[0])


def test_wide_float32_jacobians_keep_their_small_singular_directions():
    generator = torch.Generator().manual_seed(1)
    a, b, c = torch.linalg.qr(torch.randn(50_000, 3, generator=generator, dtype=torch.float64))[0].T
    J = torch.stack([a, a + 0.005 * b, c])
    pref = [1.0, 2.0, 1.0]  # reaching it needs the direction of singular value 0.0035
    exact = ConFIG(pref)(J)
    single = ConFIG(pref)(J.float()).double()
    torch.testing.assert_close(single, exact, rtol=1e-4, atol=1e-4 * exact.norm().item())
    # torch's default cut-off, max(m, n) * eps = 0.006 here, would drop the 0.005 direction.
    units = J.float() / J.float().norm(dim=1, keepdim=True)
    truncated = torch.linalg.pinv(units) @ torch.tensor(pref)
    assert (units @ truncated - torch.tensor(pref)).abs().max() > 0.1


def test_pref_vector_length_is_checked():
    with pytest.raises(ValueError, match="2 preferences but the Jacobian has 3 rows"):
        ConFIG([1.0, 2.0])(torch.randn(3, 4))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_float32_scales_do_not_overflow(scale: float):
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    update = ConFIG()((J * scale).float())
    torch.testing.assert_close(update.double() / scale, ConFIG()(J), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_solved_in_float32(dtype: torch.dtype):
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(3)).to(dtype)
    update = ConFIG()(J)
    assert update.dtype == dtype
    torch.testing.assert_close(update.double(), ConFIG()(J.double()), rtol=2e-2, atol=2e-2)


def test_a_non_finite_entry_gives_a_non_finite_update():
    J = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    J[1, 2] = float("nan")
    assert not torch.isfinite(ConFIG()(J)).any()
