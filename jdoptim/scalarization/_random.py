from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.registry import register
from jdoptim.scalarization._bases import Scalarizer


@register(
    name="scalarization.random",
    paper="https://arxiv.org/abs/2111.10603",
    stateful=True,
    randomised=True,
)
class Random(Scalarizer):
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
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"Invalid seed value: {seed!r}; expected an integer or None.")
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.reset()

    def reset(self) -> None:
        """Restart the owned generator from ``seed``."""
        if self.seed is not None:
            self._generator = torch.Generator().manual_seed(self.seed)

    def _scalarize(self, losses: Tensor) -> Tensor:
        # Drawn on the CPU, so that a seed gives the same weights on every device.
        z = torch.randn(losses.shape[0], generator=self._generator, dtype=losses.dtype)
        return z.softmax(dim=0).to(losses.device) @ losses

    def get_extra_state(self) -> Any:
        return None if self._generator is None else self._generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        if state is not None:
            if self._generator is None:
                raise ValueError(
                    "This state holds a generator state, but this Random scalarizer has no seed."
                )
            self._generator.set_state(state)
