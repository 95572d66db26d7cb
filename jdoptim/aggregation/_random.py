from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Weighting
from jdoptim.registry import register


@register(paper="https://arxiv.org/abs/2111.10603", stateful=True, randomised=True)
class RandomWeighting(Weighting):
    r"""Random weights $w = \operatorname{softmax}(z)$, $z \sim \mathcal N(0, I_m)$
    (Random Weighting, Lin et al., [arXiv 2111.10603](https://arxiv.org/abs/2111.10603)).

    Args:
        seed: Seed of a generator owned by the weighting, whose state is saved in
            ``state_dict()``. With ``None``, draws come from torch's global generator, so
            ``torch.manual_seed`` makes them reproducible.
    """

    uses_matrix = False

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Invalid seed value: {seed!r}; expected an integer or None.")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.reset()

    def reset(self) -> None:
        """Restart the owned generator from ``seed``."""
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    def _weights(self, matrix: Tensor) -> Tensor:
        # Drawn on the CPU, so that a seed gives the same weights on every device.
        z = torch.randn(matrix.shape[0], generator=self._generator, dtype=matrix.dtype)
        return z.softmax(dim=0).to(matrix.device)

    def get_extra_state(self) -> Any:
        return None if self._generator is None else self._generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        if state is not None:
            if self._generator is None:
                raise ValueError(
                    "This state holds a generator state, but this RandomWeighting has no seed."
                )
            self._generator.set_state(state)


@register(paper="https://arxiv.org/abs/2111.10603", stateful=True, randomised=True)
class Random(GramianWeightedAggregator):
    r"""A random convex combination of the rows: $\mathcal A(J) = J^\top
    \operatorname{softmax}(z)$, $z \sim \mathcal N(0, I_m)$ (Lin et al.,
    [arXiv 2111.10603](https://arxiv.org/abs/2111.10603)).

    Args:
        seed: Seed of an owned generator (saved in ``state_dict()``); ``None`` uses torch's
            global generator.

    Examples:
        >>> import torch
        >>> from jdoptim import Random
        >>> aggregator = Random(seed=0)
        >>> aggregator(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([0.8623, 0.1377])
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(RandomWeighting(seed))
