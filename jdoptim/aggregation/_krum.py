from __future__ import annotations

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_non_negative_int,
    check_positive_int,
    solve_dtype,
)
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/1703.02757"


def _example(m: int) -> dict[str, int]:
    n_byzantine = max(0, (m - 3) // 2)
    return {"n_byzantine": n_byzantine, "n_selected": max(1, m - 2 * n_byzantine - 2)}


@register(paper=_PAPER, example_args=_example, min_objectives=3)
class KrumWeighting(Weighting):
    r"""(Multi-)Krum's weights: $1/k$ on the $k$ rows of smallest Krum score, 0 elsewhere
    (see `Krum`).

    Args:
        n_byzantine: Number $f$ of rows that may be adversarial.
        n_selected: Number $k$ of rows averaged (1 for Krum, more for Multi-Krum).
    """

    n_byzantine = Argument(check_non_negative_int)
    n_selected = Argument(check_positive_int)

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__()
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        matrix = matrix.to(solve_dtype(matrix.dtype))
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Krum with n_byzantine={self.n_byzantine} needs at least n_byzantine + 3 = "
                f"{self.n_byzantine + 3} rows (so that each row has n_byzantine + 2 rows farther "
                f"away than its neighbours), got {m}."
            )
        if m < self.n_selected:
            raise ValueError(
                f"Krum cannot select n_selected={self.n_selected} rows out of {m}; "
                f"expected n_selected <= {m}."
            )
        squared_norms = matrix.diagonal()
        distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * matrix).clamp(min=0)
        distances.fill_diagonal_(torch.inf)
        neighbours = m - self.n_byzantine - 2
        scores = distances.topk(neighbours, dim=1, largest=False).values.sum(dim=1)
        selected = scores.topk(self.n_selected, largest=False).indices
        weights = matrix.new_zeros(m)
        weights[selected] = 1.0 / self.n_selected
        return weights


@register(paper=_PAPER, example_args=_example, min_objectives=3)
class Krum(GramianWeightedAggregator):
    r"""Krum and Multi-Krum, for gradients some of which may be adversarial (Blanchard et al.,
    *Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent*, NeurIPS 2017,
    [arXiv 1703.02757](https://arxiv.org/abs/1703.02757)).

    Each row $g_i$ is scored by the squared distances to its $m - f - 2$ nearest other
    rows, and the $k$ rows of smallest score are averaged:

    $$
    s(i) = \sum_{j \in N_i} \lVert g_i - g_j \rVert^2,\qquad
    \mathcal A(J) = \frac1k \sum_{i \in S_k} g_i,
    $$

    where $N_i$ holds the $m - f - 2$ rows closest to $g_i$ and $S_k$ the $k$ rows of
    smallest score ($k = 1$ is Krum). Distances come from the Gramian,
    $\lVert g_i - g_j \rVert^2 = G_{ii} + G_{jj} - 2 G_{ij}$, so the method runs in gramian
    mode. It needs $m \ge f + 3$ rows (checked at each call); the paper's robustness
    guarantee holds for $m > 2f + 2$. Ties in score are broken by row index.

    TorchJD sums the distances themselves rather than their squares; the neighbours are the
    same, but the selected rows can differ. This follows the paper's definition of the score.

    Args:
        n_byzantine: Number $f$ of rows that may be adversarial.
        n_selected: Number $k$ of rows averaged (1 for Krum, more for Multi-Krum).

    Examples:
        >>> import torch
        >>> from jdoptim import Krum
        >>> J = torch.tensor(
        ...     [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [75.0, -666.0, 23.0], [1.0, 2.0, 3.0],
        ...      [2.0, 0.0, 1.0]]
        ... )
        >>> Krum(n_byzantine=1, n_selected=4)(J)  # the adversarial third row is left out
        tensor([1.2500, 0.7500, 1.5000])
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))
