from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_fraction,
    check_length,
    check_weights,
    optional,
)
from jdoptim.aggregation._upgrad import UPGradWeighting
from jdoptim.registry import register

_PAPER = (
    "https://proceedings.neurips.cc/paper_files/paper/2022/hash/"
    "f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html"
)


def _example(m: int) -> dict[str, Any]:
    return {"weighting": UPGradWeighting(), "alpha": 0.5}


def _check_weighting(value: Any, name: str) -> Weighting:
    if not isinstance(value, Weighting):
        raise TypeError(
            f"Invalid {name} value: {value!r} of type {type(value).__name__}; expected a jdoptim "
            "Weighting to wrap."
        )
    return value


@register(paper=_PAPER, stateful=True, example_args=_example)
class CRMOGMWeighting(Weighting):
    r"""Moving average of the weights of any weighting (Zhou et al., *On the Convergence of
    Stochastic Multi-Objective Gradient Manipulation and Beyond*, NeurIPS 2022,
    [proceedings](https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html);
    the paper has no arXiv version).

    With $\hat\lambda_k$ the weights of the wrapped weighting at call $k$:

    $$
    \lambda_k = \alpha\, \lambda_{k-1} + (1 - \alpha)\, \hat\lambda_k,
    $$

    where $\lambda_0$ is ``initial_weights``, or $\hat\lambda_1$ when it is ``None`` (so
    the first call returns the wrapped weighting's weights). ``alpha = 0`` returns the wrapped
    weights unchanged, ``alpha = 1`` keeps $\lambda_0$. The paper shows that weights
    computed from each mini-batch alone make stochastic gradient manipulation (MGDA, PCGrad,
    CAGrad...) biased and possibly non-convergent, and that averaging them this way fixes it.

    The wrapper takes whatever input the wrapped weighting takes (a Gramian, or ``J`` for a
    weighting that needs it), so it also sets ``needs_jacobian`` from it: use it in a
    `GramianWeightedAggregator` (or `CRMOGM`) around a Gramian-based weighting, and in a
    `WeightedAggregator` around one that needs ``J``.

    State: $\lambda_{k-1}$ (a vector of $m$ weights, saved in ``state_dict()`` with the
    wrapped weighting's own state). ``reset()`` forgets it and resets the wrapped weighting.
    Changing the number of objectives without calling ``reset()`` raises a `ValueError`.

    Args:
        weighting: The weighting whose weights are averaged; in a config, a nested mapping
            such as ``{"name": "upgradweighting"}``.
        alpha: Weight $\alpha \in [0, 1]$ of the previous average. It may be changed between
            calls (for instance to follow a learning-rate schedule).
        initial_weights: $\lambda_0$ (one weight per objective), or ``None``.

    Examples:
        >>> import torch
        >>> import jdoptim
        >>> weighting = jdoptim.build(
        ...     {"name": "crmogmweighting", "weighting": {"name": "mgdaweighting"}, "alpha": 0.5}
        ... )
        >>> weighting
        CRMOGMWeighting(weighting=MGDAWeighting(solver='active_set', epsilon=0.001,
                        max_iters=100), alpha=0.5, initial_weights=None)
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting(J @ J.T)
        tensor([0.6000, 0.4000])
        >>> weighting(torch.eye(2))  # MGDA alone would give [0.5, 0.5]
        tensor([0.5500, 0.4500])
    """

    weighting = Argument(_check_weighting)
    alpha = Argument(check_fraction)
    initial_weights = Argument(optional(check_weights))

    def __init__(
        self,
        weighting: Weighting,
        alpha: float = 0.9,
        initial_weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.weighting = weighting
        self.alpha = alpha
        self.initial_weights = initial_weights
        self._average: Tensor | None = None

    # This wrapper takes exactly the input of the weighting it wraps.
    @property  # type: ignore[override]
    def needs_jacobian(self) -> bool:  # type: ignore[override]
        """Whether the wrapped weighting needs the Jacobian."""
        return self.weighting.needs_jacobian

    @property  # type: ignore[override]
    def uses_matrix(self) -> bool:  # type: ignore[override]
        """Whether the wrapped weighting reads the matrix."""
        return self.weighting.uses_matrix

    def reset(self) -> None:
        """Forget the average, and reset the wrapped weighting."""
        self._average = None
        self.weighting.reset()

    def _weights(self, matrix: Tensor) -> Tensor:
        fresh = self.weighting(matrix)
        m = fresh.shape[0]
        if self._average is not None:
            if self._average.shape[0] != m:
                raise ValueError(
                    f"The number of objectives changed from {self._average.shape[0]} to {m}; "
                    "call reset() before changing it."
                )
            previous = self._average.to(dtype=fresh.dtype, device=fresh.device)
        elif self.initial_weights is not None:
            check_length(self.initial_weights, m, type(self).__name__, "initial weights")
            previous = self.initial_weights.to(dtype=fresh.dtype, device=fresh.device)
        else:
            previous = fresh
        average = self.alpha * previous + (1 - self.alpha) * fresh
        self._average = average.detach()
        return average

    def get_extra_state(self) -> Any:
        return self._average

    def set_extra_state(self, state: Any) -> None:
        self._average = None if state is None else state.clone()


@register(paper=_PAPER, stateful=True, example_args=_example)
class CRMOGM(GramianWeightedAggregator):
    r"""Gradient manipulation with averaged weights (CR-MOGM, Zhou et al., NeurIPS 2022):
    $\mathcal A(J) = J^\top \lambda_k$, with $\lambda_k$ the moving average of the weights
    of a Gramian-based weighting (see `CRMOGMWeighting`).

    A weighting that needs ``J`` is refused here; wrap it as
    ``WeightedAggregator(CRMOGMWeighting(weighting))`` instead.

    Args:
        weighting: The Gramian-based weighting whose weights are averaged; in a config, a
            nested mapping such as ``{"name": "upgradweighting"}``.
        alpha: Weight $\alpha \in [0, 1]$ of the previous average.
        initial_weights: $\lambda_0$ (one weight per objective), or ``None`` for the first
            call's weights.

    Examples:
        >>> import torch
        >>> import jdoptim
        >>> aggregator = jdoptim.build({"name": "crmogm", "weighting": {"name": "upgradweighting"}})
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> aggregator(J)  # the first call is UPGrad's update
        tensor([0.2924, 1.9006, 1.9006], dtype=torch.float64)
        >>> jdoptim.to_config(aggregator)["weighting"]["name"]
        'upgradweighting'
    """

    def __init__(
        self,
        weighting: Weighting,
        alpha: float = 0.9,
        initial_weights: Tensor | Sequence[float] | None = None,
    ) -> None:
        super().__init__(CRMOGMWeighting(weighting, alpha, initial_weights))

    def _constructor_arg(self, name: str) -> Any:
        if name == "weighting":
            return self.weighting.weighting
        return super()._constructor_arg(name)
