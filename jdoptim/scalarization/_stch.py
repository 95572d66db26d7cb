from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Argument, check_positive, check_weights, optional
from jdoptim.registry import register
from jdoptim.scalarization._bases import (
    Scalarizer,
    as_preference_tensor,
    check_count,
)


def _example(m: int) -> dict[str, float]:
    return {"mu": 0.1}


@register(
    name="scalarization.stch",
    paper="https://arxiv.org/abs/2402.19078",
    permutation_invariant=True,
    example_args=_example,
)
class STCH(Scalarizer):
    r"""Smooth Tchebycheff scalarization (Lin et al., *Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization*, [arXiv 2402.19078](https://arxiv.org/abs/2402.19078)):

    $$ s(L) = \mu \log \sum_{i=1}^m \exp\left(\frac{\lambda_i (L_i - z^*_i)}{\mu}\right), $$

    a smooth upper bound of the weighted Tchebycheff scalarization
    $\max_i \lambda_i (L_i - z^*_i)$, within $\mu \log m$ of it. Its gradient weights each
    objective by $\lambda_i \operatorname{softmax}(\lambda \odot (L - z^*) / \mu)_i$, so the
    objective that is worst off dominates as $\mu \to 0$. Computed as
    $t + \mu \log \sum_i \exp((x_i - t)/\mu)$ with $x = \lambda \odot (L - z^*)$ and
    $t = \max_i x_i$, which overflows for no finite losses and $\mu > 0$, in any dtype.

    Args:
        mu: The smoothing parameter $\mu > 0$. The paper evaluates
            $\mu \in \{0.01, 0.1, 0.5, 1\}$ and finds no single best value, so it has no
            default.
        weights: The preference vector $\lambda$ (non-negative, one entry per objective; on the
            simplex in the paper). ``None`` means $\lambda_i = 1/m$.
        reference: The ideal point $z^*$ subtracted from the losses (one entry per objective).
            ``None`` means no shift.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import STCH
        >>> losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> STCH(mu=0.1, weights=[0.5, 0.5])(losses)  # close to max(0.5, 1.5)
        tensor(1.5000, dtype=torch.float64)
        >>> STCH(mu=1.0)(losses)  # log(e^0.5 + e^1.5)
        tensor(1.8133, dtype=torch.float64)
    """

    mu = Argument(check_positive)
    weights = Argument(optional(as_preference_tensor))
    reference = Argument(optional(check_weights))

    def __init__(
        self,
        mu: float,
        weights: Tensor | Sequence[float] | None = None,
        reference: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.mu = mu
        self.weights = weights
        self.reference = reference

    def _scalarize(self, losses: Tensor) -> Tensor:
        owner, m = type(self).__name__, losses.shape[0]
        shifted = losses
        if self.reference is not None:
            check_count(self.reference.shape[0], losses, owner, "reference entries")
            shifted = losses - self.reference.to(dtype=losses.dtype, device=losses.device)
        if self.weights is None:
            weighted = shifted / m
        else:
            check_count(self.weights.shape[0], losses, owner, "weights")
            weighted = self.weights.to(dtype=losses.dtype, device=losses.device) * shifted
        # The largest term is taken out before dividing by mu, so that no quotient overflows
        # (torch.logsumexp(weighted / mu) does, in float32, for 1e30 / 1e-10).
        top = weighted.detach().max()
        return top + self.mu * torch.logsumexp((weighted - top) / self.mu, dim=0)
