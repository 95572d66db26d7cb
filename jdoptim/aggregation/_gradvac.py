from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Seeded,
    Weighting,
    all_finite,
    check_fraction,
    check_non_negative,
    one_of,
    solve_dtype,
)
from jdoptim.aggregation._columns import (
    GRANULARITIES,
    Columns,
    Granularity,
    block_gramians,
    combine_blocks,
)
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/2010.05874"


@register(paper=_PAPER, stateful=True, randomised=True)
class GradVacWeighting(Seeded, Weighting):
    r"""GradVac's weights: $w = \mathbf 1^\top C$, where row $i$ of $C$ holds the
    coefficients of $g_i^{\mathrm{PC}} = \sum_k C_{ik} g_k$ (see `GradVac`).

    Norms and cosines come from the Gramian: $\lVert g_i^{\mathrm{PC}} \rVert^2 =
    c_i G c_i^\top$ and $g_i^{\mathrm{PC}} \cdot g_j = (c_i G)_j$, so adding
    $w\, g_j$ to $g_i^{\mathrm{PC}}$ adds $w$ to $C_{ij}$.

    Args:
        beta: Rate of the moving average of the targets $\hat\phi$ (weight of the new
            cosine).
        eps: Added to $\sqrt{1 - \hat\phi_{ij}^2}$ in the step's denominator.
        seed: Seed of a generator owned by the weighting for the random orders (saved in
            ``state_dict()``); ``None`` draws from torch's global generator.
    """

    beta = Argument(check_fraction)
    eps = Argument(check_non_negative)

    def __init__(self, beta: float = 0.5, eps: float = 1e-8, seed: int | None = None) -> None:
        super().__init__()
        self.beta = beta
        self.eps = eps
        self.seed = seed
        self._targets: Tensor | None = None

    @property
    def targets(self) -> Tensor | None:
        r"""The targets $\hat\phi$, shape ``[m, m]``, or ``[K, m, m]`` for ``K > 1`` blocks
        of columns (``None`` before the first call)."""
        if self._targets is None or self._targets.shape[0] > 1:
            return self._targets
        return self._targets[0]

    def reset(self) -> None:
        """Set the targets back to zero and restart the owned generator from ``seed``."""
        self._targets = None
        self._random.reset()

    def _weights(self, matrix: Tensor) -> Tensor:
        return self.block_weights(matrix[None])[0]

    def block_weights(self, gramians: Tensor) -> Tensor:
        """The weights of each block of columns, ``[K, m]``, from their Gramians
        ``[K, m, m]``; one random order of the other tasks per task serves every block."""
        K, m = gramians.shape[0], gramians.shape[1]
        G = gramians.to(solve_dtype(gramians.dtype))
        if self._targets is not None and self._targets.ndim == 2:
            self._targets = self._targets[None]  # the targets of one block, as [m, m]
        if self._targets is None or self._targets.shape != G.shape:
            self._targets = G.new_zeros(K, m, m)
        targets = self._targets.to(dtype=G.dtype, device=G.device)
        order = self._random.permutations_of_others(m, G)
        rows = torch.arange(m, device=G.device)
        coefficients = torch.eye(m, dtype=G.dtype, device=G.device).repeat(K, 1, 1)
        products = G.clone()  # products[k, i, j] = g_i^PC · g_j on block k
        norms = G.diagonal(dim1=1, dim2=2).clamp(min=0).sqrt()
        squared_norms_pc = G.diagonal(dim1=1, dim2=2).clone()  # ‖g_i^PC‖², kept up to date
        rows_of_j = torch.empty_like(G)
        # Rows are independent: step k corrects every g_i^PC against its k-th task at once.
        for k in range(m - 1):
            j = order[:, k]
            dot = products[:, rows, j]
            norm_i = squared_norms_pc.clamp(min=0).sqrt()
            norm_j = norms[:, j]
            norm_product = norm_i * norm_j
            cosine = torch.where(
                norm_product > 0, dot / torch.where(norm_product > 0, norm_product, 1.0), 0.0
            )
            target = targets[:, rows, j]
            sine = (1 - cosine**2).clamp(min=0).sqrt()
            target_sine = (1 - target**2).clamp(min=0).sqrt()
            denominator = norm_j * (target_sine + self.eps)
            correct = (cosine < target) & (denominator > 0)
            step = torch.where(
                correct,
                norm_i
                * (target * sine - cosine * target_sine)
                / torch.where(denominator > 0, denominator, 1.0),
                0.0,
            )
            coefficients[:, rows, j] += step
            squared_norms_pc += step * (2 * dot + step * norm_j**2)
            products.addcmul_(step[:, :, None], torch.index_select(G, 1, j, out=rows_of_j))
            targets[:, rows, j] = (1 - self.beta) * target + self.beta * cosine
        self._targets = targets
        return coefficients.sum(dim=1)

    def get_extra_state(self) -> Any:
        return {"targets": self.targets, "generator": self._random.state()}

    def set_extra_state(self, state: Any) -> None:
        targets = state["targets"]
        self._targets = None if targets is None else targets.clone()
        self._random.load_state(state["generator"], type(self).__name__)


@register(paper=_PAPER, stateful=True, randomised=True)
class GradVac(GramianWeightedAggregator):
    r"""Gradient Vaccine (Wang et al., *Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models*, ICLR 2021,
    [arXiv 2010.05874](https://arxiv.org/abs/2010.05874)).

    Like PCGrad, each gradient is corrected against the others in a random order, but towards
    a target cosine similarity $\hat\phi_{ij}$ rather than only away from conflict.
    With $\phi_{ij}$ the cosine between the current $g_i^{\mathrm{PC}}$ and $g_j$:

    $$
    \text{if } \phi_{ij} < \hat\phi_{ij}:\quad
    g_i^{\mathrm{PC}} \leftarrow g_i^{\mathrm{PC}} +
    \frac{\lVert g_i^{\mathrm{PC}} \rVert \left(\hat\phi_{ij} \sqrt{1 - \phi_{ij}^2}
        - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\right)}
        {\lVert g_j \rVert \left(\sqrt{1 - \hat\phi_{ij}^2} + \varepsilon\right)}\, g_j,
    \qquad
    \hat\phi_{ij} \leftarrow (1 - \beta)\, \hat\phi_{ij} + \beta\, \phi_{ij},
    $$

    and $\mathcal A(J) = \sum_i g_i^{\mathrm{PC}}$. The targets start at zero, so the
    first call equals PCGrad for the same order. The method only needs the Gramian (it runs in
    gramian mode).

    State: the targets $\hat\phi$ (an ``[m, m]`` tensor, exposed as
    ``weighting.targets``) persist across calls and travel in ``state_dict()``; ``reset()``
    sets them back to zero. When the number of objectives changes, the targets are
    re-initialised to zero.

    A cosine with a zero vector is taken as 0. TorchJD adds ``eps`` to $\lVert g_i \rVert
    \lVert g_j \rVert$ and to $\lVert g_j \rVert \sqrt{1 - \hat\phi^2}$, which
    distorts the cosines of gradients with norms near $\sqrt{\varepsilon}$; here ``eps`` only
    enters the dimensionless $\sqrt{1 - \hat\phi^2} + \varepsilon$, so the method is
    exact at every scale and agrees with TorchJD to about ``eps`` for ordinary gradients. With
    ``eps = 0``, a target of exactly 1 cannot be reached by a finite step and no correction is
    applied.

    **Granularity.** The paper also applies the method to parts of the parameters separately
    (the whole model, each layer, each parameter matrix): with ``granularity="layer"``, the
    block of columns $J_k$ of each layer gets its own corrections and targets
    $\hat\phi^{(k)}$, computed from its own cosines, and the update on those columns is
    $\sum_i g_{i,k}^{\mathrm{PC}}$; ``"parameter"`` does the same per
    parameter tensor and ``"group"`` per parameter group of the optimizer (LibMTL's
    ``GradVac_group_type`` 1 is ``"layer"``, 2 is ``"parameter"``). As in LibMTL, one random
    order of the other tasks per task serves every block. A layer is the module that registers
    the parameters: `jdoptim.JDOptimizer` finds the layers in ``shared_params`` (when it is a
    module) or in ``modules``, and passes the layout of the columns to the aggregator; a direct
    call takes it as ``GradVac(...)(J, columns=Columns.of(params, model))``. Blocks need the
    Jacobian's columns, so only ``"all"`` runs in gramian mode. The targets are then a
    ``[K, m, m]`` tensor for ``K`` blocks; they restart at zero when the number of blocks
    changes or ``granularity`` is assigned.

    Args:
        beta: Rate of the moving average of the targets (weight of the new cosine).
        eps: Added to $\sqrt{1 - \hat\phi_{ij}^2}$ in the step's denominator.
        seed: Seed of a generator owned by the aggregator for the random orders (saved in
            ``state_dict()``); ``None`` draws from torch's global generator.
        granularity: ``"all"`` (the whole Jacobian), ``"layer"``, ``"parameter"`` or
            ``"group"`` (see above).

    Examples:
        >>> import torch
        >>> from jdoptim import GradVac
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
        >>> aggregator = GradVac()
        >>> aggregator(J)
        tensor([0.5848, 3.8012, 3.8012], dtype=torch.float64)
        >>> aggregator.weighting.targets
        tensor([[ 0.0000, -0.4206],
                [-0.4206,  0.0000]], dtype=torch.float64)
    """

    weighting: GradVacWeighting
    granularity = Argument(one_of(GRANULARITIES))

    def __init__(
        self,
        beta: float = 0.5,
        eps: float = 1e-8,
        seed: int | None = None,
        granularity: Granularity = "all",
    ) -> None:
        super().__init__(GradVacWeighting(beta, eps, seed))
        self.granularity = granularity

    def _argument_set(self, name: str) -> None:
        if name == "granularity":
            self.weighting._targets = None  # they belong to the blocks of the former granularity
        super()._argument_set(name)

    @property  # type: ignore[override]
    def needs_columns(self) -> bool:  # type: ignore[override]
        """Whether the blocks of columns are corrected separately (``granularity`` is not
        ``"all"``)."""
        return self.granularity != "all"

    def _aggregate(self, matrix: Tensor, columns: Columns | None = None) -> Tensor:
        if columns is None:
            return super()._aggregate(matrix)
        if not bool(all_finite(matrix)):
            return matrix.new_full(matrix.shape[1:], torch.nan)  # and no state changes
        blocks = columns.blocks(self.granularity)
        gramians = block_gramians(matrix, blocks)
        return combine_blocks(matrix, blocks, self.weighting.block_weights(gramians))
