from __future__ import annotations

import pytest
import torch

from jdoptim import TrimmedMean


def test_torchjd_documented_value():
    # TorchJD 0.18 documentation: TrimmedMean(trim_number=1) on this matrix gives [1.5, 2.5].
    J = torch.tensor([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        TrimmedMean(trim_number=1)(J), torch.tensor([1.5, 2.5], dtype=J.dtype)
    )


@pytest.mark.parametrize("trim_number", [0, 1, 2, 3])
def test_matches_a_column_by_column_reference(trim_number: int):
    J = torch.randn(7, 9, generator=torch.Generator().manual_seed(trim_number))
    expected = []
    for column in J.T.tolist():
        kept = sorted(column)[trim_number : len(column) - trim_number]
        expected.append(sum(kept) / len(kept))
    torch.testing.assert_close(TrimmedMean(trim_number)(J), torch.tensor(expected))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("trim_number", [0, 1])
def test_a_non_finite_entry_is_not_trimmed_away(value: float, trim_number: int):
    J = torch.randn(5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    J[3, 1] = value
    update = TrimmedMean(trim_number)(J)
    assert not torch.isfinite(update[1])
    torch.testing.assert_close(update[[0, 2, 3]], TrimmedMean(trim_number)(J[:, [0, 2, 3]]))


def test_largest_trim_is_the_median_and_no_trim_is_the_mean():
    J = torch.randn(5, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    torch.testing.assert_close(TrimmedMean(2)(J), J.median(dim=0).values)
    torch.testing.assert_close(TrimmedMean(0)(J), J.mean(dim=0))


def test_too_few_rows_are_rejected_with_the_minimum():
    with pytest.raises(ValueError, match=r"at least 2 \* trim_number \+ 1 = 5 rows, got 4"):
        TrimmedMean(2)(torch.randn(4, 3))


@pytest.mark.parametrize("trim_number", [-1, 1.0, True, None])
def test_bad_trim_number_is_rejected(trim_number):
    with pytest.raises(ValueError, match="trim_number"):
        TrimmedMean(trim_number)
