from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Argument, check_non_negative, optional
from jdoptim.registry import register
from jdoptim.scalarization._bases import (
    Scalarizer,
    as_preference_tensor,
    check_count,
    stable_norm,
)


def _example(m: int) -> dict[str, float]:
    return {"lambda_": 1.0}


@register(
    name="scalarization.cosmos",
    paper="https://arxiv.org/abs/2103.13392",
    permutation_invariant=True,
    example_args=_example,
)
class COSMOS(Scalarizer):
    r"""The COSMOS objective (Ruchte and Grabocka, *Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning*, Eq. 5, [arXiv 2103.13392](https://arxiv.org/abs/2103.13392)): a
    linear scalarization minus a penalty on the angle between the losses and the preference
    ray $r$,

    $$ s(L) = r^\top L - \lambda \frac{r^\top L}{\lVert r \rVert \, \lVert L \rVert}. $$

    Minimising it rewards loss vectors aligned with $r$. The full method also feeds $r$ to the
    model (sampled from a Dirichlet distribution at each step); that is left to the model: to
    follow it, assign a new preference before each call, e.g.
    ``cosmos.weights = torch.distributions.Dirichlet(torch.ones(m)).sample()``.

    The cosine is undefined when all losses are zero; the penalty is taken as $0$ there (the
    scalar is then $r^\top L = 0$), so the value and gradient stay finite.

    Args:
        lambda_: The penalty coefficient $\lambda \ge 0$; $0$ gives the plain linear
            scalarization. The paper uses values from $0.01$ to $8$ depending on the data, so
            it has no default.
        weights: The preference ray $r$ (non-negative, one entry per objective). ``None`` means
            $r_i = 1/m$.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import COSMOS
        >>> losses = torch.tensor([3.0, 4.0], dtype=torch.float64)
        >>> COSMOS(lambda_=1.0, weights=[1.0, 0.0])(losses)  # 3 - 3 / 5
        tensor(2.4000, dtype=torch.float64)
    """

    lambda_ = Argument(check_non_negative)
    weights = Argument(optional(as_preference_tensor))

    def __init__(self, lambda_: float, weights: Tensor | Sequence[float] | None = None) -> None:
        super().__init__()
        self.lambda_ = lambda_
        self.weights = weights

    def _scalarize(self, losses: Tensor) -> Tensor:
        m = losses.shape[0]
        if self.weights is None:
            ray = losses.new_full((m,), 1.0 / m)
        else:
            check_count(self.weights.shape[0], losses, type(self).__name__, "weights")
            ray = self.weights.to(dtype=losses.dtype, device=losses.device)
        linear = ray @ losses
        norms = stable_norm(ray) * stable_norm(losses)
        positive = norms > 0
        # Both branches are computed; the safe denominator keeps the unused one finite.
        cosine = torch.where(positive, linear / torch.where(positive, norms, 1.0), 0.0)
        return linear - self.lambda_ * cosine
