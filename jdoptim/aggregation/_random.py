from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._bases import GramianWeightedAggregator, Seeded, Weighting
from jdoptim.registry import register


@register(paper="https://arxiv.org/abs/2111.10603", stateful=True, randomised=True)
class RandomWeighting(Seeded, Weighting):
    r"""Random weights $w = \operatorname{softmax}(z)$, $z \sim \mathcal N(0, I_m)$
    (Random Weighting, Lin et al., [arXiv 2111.10603](https://arxiv.org/abs/2111.10603)).

    Args:
        seed: Seed of a generator owned by the weighting (created on the device of the first
            call), whose state is saved in ``state_dict()``. With ``None``, draws come from
            torch's global generator, so ``torch.manual_seed`` makes them reproducible.
    """

    uses_matrix = False

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed

    def _weights(self, matrix: Tensor) -> Tensor:
        return self._random.randn((matrix.shape[0],), matrix).softmax(dim=0)


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
