from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim import Krum, KrumWeighting

J_KRUM = torch.tensor(
    [
        [1.0, 1.0, 1.0],
        [1.0, 0.0, 1.0],
        [75.0, -666.0, 23.0],  # adversarial row
        [1.0, 2.0, 3.0],
        [2.0, 0.0, 1.0],
    ],
    dtype=torch.float64,
)


def _reference_selection(J: Tensor, f: int, k: int, squared: bool = True) -> list[int]:
    """Indices selected by (Multi-)Krum, from the rows, by brute force."""
    m = J.shape[0]
    scores = []
    for i in range(m):
        distances = sorted(float((J[i] - J[j]).norm()) for j in range(m) if j != i)
        nearest = distances[: m - f - 2]
        scores.append(sum(d**2 if squared else d for d in nearest))
    return sorted(sorted(range(m), key=lambda i: (scores[i], i))[:k])


def test_torchjd_documented_values():
    # TorchJD 0.18 documentation: Krum(n_byzantine=1, n_selected=4)(J) = [1.25, 0.75, 1.5],
    # KrumWeighting(1, 4)(G) = [0.25, 0.25, 0, 0.25, 0.25].
    torch.testing.assert_close(
        Krum(n_byzantine=1, n_selected=4)(J_KRUM),
        torch.tensor([1.25, 0.75, 1.5], dtype=J_KRUM.dtype),
    )
    torch.testing.assert_close(
        KrumWeighting(1, 4)(J_KRUM @ J_KRUM.T),
        torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25], dtype=J_KRUM.dtype),
    )


@pytest.mark.parametrize(("m", "f", "k"), [(5, 1, 1), (7, 2, 3), (9, 3, 2), (6, 0, 6)])
def test_selection_matches_the_brute_force_reference(m: int, f: int, k: int):
    generator = torch.Generator().manual_seed(m * 10 + f)
    for _ in range(5):
        J = torch.randn(m, 4, generator=generator, dtype=torch.float64)
        J[0] *= 20  # an outlier
        weights = KrumWeighting(f, k)(J @ J.T)
        selected = weights.nonzero().flatten().tolist()
        assert selected == _reference_selection(J, f, k)
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=J.dtype))
        torch.testing.assert_close(Krum(f, k)(J), J[selected].mean(dim=0))


def test_scores_are_sums_of_squared_distances_as_in_the_paper():
    generator = torch.Generator().manual_seed(0)
    differing = 0
    for _ in range(200):
        J = torch.randn(6, 2, generator=generator, dtype=torch.float64)
        squared = _reference_selection(J, 1, 1, squared=True)
        plain = _reference_selection(J, 1, 1, squared=False)
        assert KrumWeighting(1)(J @ J.T).nonzero().flatten().tolist() == squared
        differing += squared != plain
    assert differing > 0  # the two definitions do select different rows on some matrices


def test_too_few_rows_are_rejected_with_the_minimum():
    with pytest.raises(ValueError, match=r"needs at least n_byzantine \+ 3 = 4 rows.*got 3"):
        Krum(n_byzantine=1)(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"n_selected=5 rows out of 4"):
        Krum(n_byzantine=0, n_selected=5)(torch.randn(4, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_byzantine": -1}, "n_byzantine"),
        ({"n_byzantine": 1.0}, "n_byzantine"),
        ({"n_byzantine": 0, "n_selected": 0}, "n_selected"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        Krum(**kwargs)
