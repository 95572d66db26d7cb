from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Aggregator, Argument, all_finite, check_non_negative_int
from jdoptim.registry import register


def _example(m: int) -> dict[str, int]:
    return {"trim_number": min(1, (m - 1) // 2)}


@register(
    paper="https://arxiv.org/abs/1803.01498", permutation_invariant=True, example_args=_example
)
class TrimmedMean(Aggregator):
    r"""Coordinate-wise trimmed mean, for gradients some of which may be adversarial (Yin et
    al., *Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates*, ICML 2018,
    [arXiv 1803.01498](https://arxiv.org/abs/1803.01498)).

    In every column of $J$, the $b$ largest and the $b$ smallest entries are removed and
    the $m - 2b$ others are averaged:

    $$
    \mathcal A(J)_k = \frac{1}{m - 2b} \sum_{r = b + 1}^{m - b} J_{(r)k},
    $$

    where $J_{(1)k} \le \dots \le J_{(m)k}$ is column $k$ sorted. It needs
    $m \ge 2b + 1$ rows (checked at each call); $b = 0$ is the mean, and
    $b = (m - 1)/2$ for odd $m$ the coordinate-wise median. The method needs $J$ itself.

    Args:
        trim_number: Number $b$ of entries removed at each end of every column.

    Examples:
        >>> import torch
        >>> from jdoptim import TrimmedMean
        >>> J = torch.tensor([[1e11, 3.0], [1.0, -1e11], [-1e10, 1e10], [2.0, 2.0]])
        >>> TrimmedMean(trim_number=1)(J)
        tensor([1.5000, 2.5000])
    """

    trim_number = Argument(check_non_negative_int)

    def __init__(self, trim_number: int) -> None:
        super().__init__()
        self.trim_number = trim_number

    def _aggregate(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        if m < 2 * self.trim_number + 1:
            raise ValueError(
                f"TrimmedMean with trim_number={self.trim_number} removes "
                f"{2 * self.trim_number} entries per column, so it needs at least "
                f"2 * trim_number + 1 = {2 * self.trim_number + 1} rows, got {m}."
            )
        if self.trim_number == 0:
            return matrix.mean(dim=0)
        ordered = matrix.sort(dim=0).values
        trimmed = ordered[self.trim_number : m - self.trim_number].mean(dim=0)
        # Sorting would trim non-finite entries away: a column holding one gives NaN instead.
        return torch.where(all_finite(matrix, dim=0), trimmed, torch.nan)
