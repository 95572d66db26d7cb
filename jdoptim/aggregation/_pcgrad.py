from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2001.06782"


def check_seed(seed: int | None) -> int | None:
    """Raise unless ``seed`` is an integer or ``None``."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"Invalid seed value: {seed!r}; expected an integer or None.")
    return seed


class RandomSource:
    """Uniform random numbers for a randomised method.

    Without a seed, draws come from torch's global generator of the input's device, so
    ``torch.manual_seed`` makes them reproducible. With a seed, they come from a generator owned
    by the method, created from the seed on the device of the first draw (a seed gives the same
    numbers on the same device; CPU and CUDA streams differ); its state travels in
    ``state_dict()`` through `state` and `load_state`.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = check_seed(seed)
        self._generator: torch.Generator | None = None

    def reset(self) -> None:
        """Restart from ``seed`` at the next draw."""
        self._generator = None

    def rand(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Draw uniform numbers in ``[0, 1)`` with ``like``'s dtype, on ``like``'s device."""
        if self.seed is None:
            return torch.rand(shape, dtype=like.dtype, device=like.device)
        if self._generator is None:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        draws = torch.rand(
            shape, generator=self._generator, dtype=like.dtype, device=self._generator.device
        )
        return draws.to(like.device)

    def permutations_of_others(self, m: int, like: Tensor) -> Tensor:
        """Row ``i`` of the ``[m, m - 1]`` result is a uniformly random order of ``{j ≠ i}``."""
        keys = self.rand((m, m), like)
        keys.fill_diagonal_(2.0)  # above every draw, so that i itself sorts last
        return keys.argsort(dim=1)[:, : m - 1]

    def state(self) -> dict[str, Any] | None:
        """The owned generator's device and state, or ``None`` before the first seeded draw."""
        if self._generator is None:
            return None
        return {"device": str(self._generator.device), "state": self._generator.get_state()}

    def load_state(self, state: dict[str, Any] | None, owner: str) -> None:
        """Restore what `state` returned."""
        if state is None:
            self._generator = None
            return
        if self.seed is None:
            raise ValueError(f"This state holds a generator state, but this {owner} has no seed.")
        generator = torch.Generator(device=state["device"])
        generator.set_state(state["state"])
        self._generator = generator


@register(paper=_PAPER, stateful=True, randomised=True)
class PCGradWeighting(Weighting):
    r"""PCGrad's weights: $w = \mathbf 1^\top C$, where row $i$ of $C$ holds the
    coefficients of $g_i^{\mathrm{PC}} = \sum_k C_{ik} g_k$ (see `PCGrad`).

    Everything is computed from the Gramian: with $c_i$ the current row,
    $g_i^{\mathrm{PC}} \cdot g_j = (c_i G)_j$, and the projection of
    $g_i^{\mathrm{PC}}$ onto the normal plane of $g_j$ subtracts
    $(c_i G)_j / G_{jj}$ from $C_{ij}$.

    Args:
        seed: Seed of a generator owned by the weighting for the random orders (saved in
            ``state_dict()``); ``None`` draws from torch's global generator.
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._random = RandomSource(seed)

    @property
    def seed(self) -> int | None:
        return self._random.seed

    def reset(self) -> None:
        """Restart the owned generator from ``seed``."""
        self._random.reset()

    def _weights(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        order = self._random.permutations_of_others(m, matrix)
        rows = torch.arange(m, device=matrix.device)
        coefficients = torch.eye(m, dtype=matrix.dtype, device=matrix.device)
        # products[i, j] = g_i^PC · g_j, kept up to date as coefficients change.
        products = matrix.clone()
        squared_norms = matrix.diagonal()
        rows_of_j = torch.empty_like(matrix)
        # Rows are independent: step k projects every g_i^PC against its k-th task at once.
        for k in range(m - 1):
            j = order[:, k]
            dot = products[rows, j]
            norm2 = squared_norms[j]
            conflicting = (dot < 0) & (norm2 > 0)
            step = torch.where(conflicting, -dot / torch.where(norm2 > 0, norm2, 1.0), 0.0)
            coefficients[rows, j] += step
            products.addcmul_(step[:, None], torch.index_select(matrix, 0, j, out=rows_of_j))
        return coefficients.sum(dim=0)

    def get_extra_state(self) -> Any:
        return self._random.state()

    def set_extra_state(self, state: Any) -> None:
        self._random.load_state(state, type(self).__name__)


@register(paper=_PAPER, stateful=True, randomised=True)
class PCGrad(GramianWeightedAggregator):
    r"""Projecting conflicting gradients (Yu et al., *Gradient Surgery for Multi-Task
    Learning*, [arXiv 2001.06782](https://arxiv.org/abs/2001.06782), Algorithm 1).

    Each gradient is projected, in a random order of the other tasks, onto the normal plane of
    every gradient it conflicts with, and the projected gradients are summed:

    $$
    g_i^{\mathrm{PC}} \leftarrow g_i,\qquad
    g_i^{\mathrm{PC}} \leftarrow g_i^{\mathrm{PC}}
        - \frac{\min(g_i^{\mathrm{PC}} \cdot g_j,\, 0)}{\lVert g_j \rVert^2}\, g_j
    \ \text{ for } j \ne i \text{ in random order},\qquad
    \mathcal A(J) = \sum_{i=1}^m g_i^{\mathrm{PC}}.
    $$

    Each $g_i^{\mathrm{PC}}$ is a combination of the rows, so the method only needs the
    Gramian $G = J J^\top$ (it runs in gramian mode). A zero row is never projected against.

    For two objectives the update never conflicts with either; for $m > 2$ it can (a later
    projection may undo an earlier one). For a fixed order the update is linear under positive
    scaling of the rows, but a new order is drawn at each call.

    Args:
        seed: Seed of a generator owned by the aggregator for the random orders (saved in
            ``state_dict()``); ``None`` draws from torch's global generator.

    Examples:
        >>> import torch
        >>> from jdoptim import PCGrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> PCGrad()(J)
        tensor([0.5848, 3.8012, 3.8012])
        >>> PCGrad().weighting(J @ J.T)
        tensor([2.2222, 1.5789])
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(PCGradWeighting(seed))
