from __future__ import annotations

from torch import Tensor

from jdoptim.aggregation._bases import Seeded
from jdoptim.registry import register
from jdoptim.scalarization._bases import Scalarizer


@register(
    name="scalarization.random",
    paper="https://arxiv.org/abs/2111.10603",
    stateful=True,
    randomised=True,
)
class Random(Seeded, Scalarizer):
    r"""Random Loss Weighting: $s(L) = \sum_i w_i L_i$ with fresh weights at every call,
    $w = \operatorname{softmax}(z)$, $z \sim \mathcal N(0, I_m)$ (Lin et al., *Reasonable
    Effectiveness of Random Weighting*, Algorithm 2,
    [arXiv 2111.10603](https://arxiv.org/abs/2111.10603)).

    The weights are constants for the backward pass. Drawn from the same generator in the same
    way as the `jdoptim.Random` aggregator's, so with the same seed both give the same update.

    Args:
        seed: Seed of a generator owned by the scalarizer, whose state is saved in
            ``state_dict()`` and restarted by `reset`. With ``None``, draws come from torch's
            global generator, so ``torch.manual_seed`` makes them reproducible.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import Random
        >>> Random(seed=0)(torch.tensor([1.0, 0.0]))
        tensor(0.8623)
    """

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.seed = seed

    def _scalarize(self, losses: Tensor) -> Tensor:
        # Constant weights: the draws do not depend on the losses.
        return self._random.randn((losses.shape[0],), losses.detach()).softmax(dim=0) @ losses
