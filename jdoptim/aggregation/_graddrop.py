from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Aggregator,
    Argument,
    Configurable,
    Seeded,
    as_weight_tensor,
    check_length,
    optional,
    solve_dtype,
)
from jdoptim.registry import register


def _check_f(value: Any, name: str) -> Callable[[Tensor], Tensor]:
    # A nested config such as {"name": "mean"} builds an aggregator, which is callable too.
    if not callable(value) or isinstance(value, Configurable):
        raise TypeError(
            f"Invalid {name} value: {value!r}; expected a function applied element-wise to the "
            "purity tensor (such as torch.sqrt), or None for the identity."
        )
    return value


def _check_leak(value: Any, name: str) -> Tensor:
    leak = as_weight_tensor(value, name)
    if not ((leak >= 0) & (leak <= 1)).all():
        raise ValueError(f"Invalid {name} value: {leak.tolist()}; expected values in [0, 1].")
    return leak


@register(paper="https://arxiv.org/abs/2010.06808", stateful=True, randomised=True)
class GradDrop(Seeded, Aggregator):
    r"""Gradient sign dropout (Chen et al., *Just Pick a Sign: Optimizing Deep Multitask
    Models with Gradient Sign Dropout*, NeurIPS 2020,
    [arXiv 2010.06808](https://arxiv.org/abs/2010.06808), Algorithm 1, lines 10 to 15).

    For each coordinate $k$ (column of $J$), the positive sign purity
    $P_k = \frac12\bigl(1 + \sum_i J_{ik} / \sum_i |J_{ik}|\bigr)$ sets the
    probability of keeping the positive entries of that column rather than the negative ones:
    with $U_k \sim \mathcal U(0, 1)$,

    $$
    M_{ik} = \mathbb 1[f(P_k) > U_k]\,\mathbb 1[J_{ik} > 0]
           + \mathbb 1[f(P_k) < U_k]\,\mathbb 1[J_{ik} < 0],\qquad
    \mathcal A(J)_k = \sum_{i=1}^m \bigl(\ell_i + (1 - \ell_i) M_{ik}\bigr) J_{ik},
    $$

    where $\ell_i \in [0, 1]$ is the leak of row $i$ (how much of it always passes). A
    column of zeros has $P_k = \frac12$ and contributes zero.

    The paper applies the dropout to the gradients of an activation layer; as in TorchJD, here
    it applies to the columns of the Jacobian handed to the aggregator (to restrict it to some
    layers, aggregate those parameters' Jacobian with `GradDrop` and the others with another
    aggregator). The method needs $J$ itself, not only its Gramian.

    Args:
        f: A monotonically increasing function applied element-wise to the purity tensor
            $P$ (shape ``[n]``); ``None`` is the identity (TorchJD's default). A custom
            function cannot be written to a config.
        leak: One leak $\ell_i \in [0, 1]$ per objective; ``None`` is no leak.
        seed: Seed of a generator owned by the aggregator for $U$ (saved in
            ``state_dict()``); ``None`` draws from torch's global generator.

    Examples:
        >>> import torch
        >>> from jdoptim import GradDrop
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> aggregator = GradDrop(seed=2)
        >>> aggregator(J)  # P = (0.6, 1, 1): the first column keeps 6 with probability 0.6
        tensor([-4.,  2.,  2.])
        >>> aggregator(J)
        tensor([6., 2., 2.])
    """

    f = Argument(optional(_check_f))
    leak = Argument(optional(_check_leak))

    def __init__(
        self,
        f: Callable[[Tensor], Tensor] | None = None,
        leak: Tensor | Sequence[float] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.f = f
        self.leak = leak
        self.seed = seed

    def _aggregate(self, matrix: Tensor) -> Tensor:
        return self._drop(matrix.to(solve_dtype(matrix.dtype))).to(matrix.dtype)

    def _drop(self, matrix: Tensor) -> Tensor:
        m, n = matrix.shape
        if self.leak is None:
            keep = matrix.new_ones(m)
            always = matrix.new_zeros(n)
        else:
            check_length(self.leak, m, type(self).__name__, "leaks")
            leak = self.leak.to(dtype=matrix.dtype, device=matrix.device)
            keep = 1 - leak
            always = leak @ matrix
        total = matrix.sum(dim=0)
        magnitude = matrix.abs().sum(dim=0)
        purity = 0.5 * (1 + total / torch.where(magnitude > 0, magnitude, 1.0))
        f_purity = purity if self.f is None else self.f(purity)
        draws = self._random.rand((n,), matrix)
        positive = keep @ matrix.clamp(min=0)
        negative = keep @ matrix.clamp(max=0)
        # Masks multiply rather than select, so that a non-finite column stays non-finite.
        return always + positive * (f_purity > draws) + negative * (f_purity < draws)
