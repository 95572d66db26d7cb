from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    GramianWeightedAggregator,
    Weighting,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    optional,
    solve_dtype,
)
from jdoptim.aggregation._columns import Columns, block_gramians
from jdoptim.linalg._gramian import weighted_sum
from jdoptim.registry import register

_PAPER = "https://arxiv.org/abs/1711.02257"


def _check_layer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"Invalid {name} value: {value!r}; expected the index of a layer (an integer, -1 for "
            "the last) or None."
        )
    return value


def _example(m: int) -> dict[str, Any]:
    return {"lr": 0.1}


@register(paper=_PAPER, stateful=True, permutation_invariant=True, example_args=_example)
class GradNormWeighting(Weighting):
    r"""GradNorm's loss weights, trained at each call (see `GradNorm`).

    It receives the Gramian of the gradients at the layer where their norms are balanced (that
    of the whole Jacobian, or of the layer that `GradNorm` chooses) and the values of the
    losses; it returns the weights of this call, $w(t)$, and takes its step to $w(t + 1)$.

    Args:
        lr: The step size of the gradient step on the weights.
        alpha: The asymmetry $\alpha \ge 0$.
        n_warmup_steps: The number of first calls whose losses are averaged into $L(0)$,
            with weights 1 meanwhile; ``0`` takes the first call's losses as $L(0)$.
    """

    needs_losses = True
    lr = Argument(check_positive)
    alpha = Argument(check_non_negative)
    n_warmup_steps = Argument(check_non_negative_int)

    def __init__(self, lr: float, alpha: float = 1.5, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self.lr = lr
        self.alpha = alpha
        self.n_warmup_steps = n_warmup_steps
        self.reset()

    def reset(self) -> None:
        """Set the weights back to 1 and forget $L(0)$."""
        self._weights_now: Tensor | None = None
        self._initial_losses: Tensor | None = None
        self._loss_sum: Tensor | None = None
        self._calls = 0
        self._targets: Tensor | None = None

    @property
    def loss_weights(self) -> Tensor | None:
        """The weights of the next call, ``[m]`` (``None`` before the first call: all 1)."""
        return self._weights_now

    @property
    def initial_losses(self) -> Tensor | None:
        """$L(0)$, ``[m]`` (``None`` until the warm-up is over)."""
        return self._initial_losses

    def head_weights(self, losses: Tensor) -> Tensor | None:
        return self._weights_now

    def report(self) -> dict[str, Tensor]:
        report = {}
        if self._weights_now is not None:
            report["loss_weights"] = self._weights_now
        if self._targets is not None:
            report["gradient_norm_targets"] = self._targets
        return report

    def get_extra_state(self) -> Any:
        return {
            "weights": self._weights_now,
            "initial_losses": self._initial_losses,
            "loss_sum": self._loss_sum,
            "calls": torch.tensor(self._calls),
            "targets": self._targets,
        }

    def set_extra_state(self, state: Any) -> None:
        self._weights_now = state["weights"]
        self._initial_losses = state["initial_losses"]
        self._loss_sum = state["loss_sum"]
        self._calls = int(state["calls"])
        self._targets = state["targets"]

    def _weights(self, matrix: Tensor, losses: Tensor) -> Tensor:  # type: ignore[override]
        m = matrix.shape[0]
        dtype = solve_dtype(matrix.dtype)
        G = matrix.to(dtype)
        losses = losses.to(dtype=dtype, device=G.device)
        fresh = self._weights_now is None or self._weights_now.shape[0] != m
        weights = G.new_ones(m) if fresh else self._weights_now.to(G)  # type: ignore[union-attr]
        initial = None if fresh or self._initial_losses is None else self._initial_losses.to(G)
        loss_sum = None if fresh or self._loss_sum is None else self._loss_sum.to(G)
        calls = (0 if fresh else self._calls) + 1
        # Everything is computed before the state changes, so that an error changes nothing.
        if initial is None and calls <= self.n_warmup_steps:
            loss_sum = losses if loss_sum is None else loss_sum + losses
            if calls == self.n_warmup_steps:
                initial = self._checked_initial(loss_sum / self.n_warmup_steps)
                loss_sum = None
            self._commit(weights, initial, loss_sum, calls, None)
            return weights
        if initial is None:
            initial = self._checked_initial(losses)
        norms = G.diagonal().clamp(min=0).sqrt()  # n_i = ‖∇_W L_i‖
        weighted_norms = weights * norms  # G_W^(i) = ‖∇_W (w_i L_i)‖
        ratios = losses / initial  # L̃_i
        mean_ratio = ratios.mean()
        rates = torch.where(mean_ratio > 0, ratios / torch.where(mean_ratio > 0, mean_ratio, 1), 1)
        targets = weighted_norms.mean() * rates**self.alpha  # constant in the gradient step
        # ∂/∂w_i Σ_j |w_j n_j - T_j| with the targets T held constant.
        gradient = torch.sign(weighted_norms - targets) * norms
        stepped = (weights - self.lr * gradient).clamp(min=0)
        total = stepped.sum()
        following = torch.where(
            total > 0, m * stepped / torch.where(total > 0, total, 1), torch.ones_like(stepped)
        )
        self._commit(following, initial, None, calls, targets)
        return weights

    def _commit(
        self,
        weights: Tensor,
        initial: Tensor | None,
        loss_sum: Tensor | None,
        calls: int,
        targets: Tensor | None,
    ) -> None:
        self._weights_now = weights
        self._initial_losses = initial
        self._loss_sum = loss_sum
        self._calls = calls
        self._targets = targets

    @staticmethod
    def _checked_initial(initial: Tensor) -> Tensor:
        if not bool((initial > 0).all()):
            raise ValueError(
                "GradNorm divides the losses by their initial values L(0), which must be "
                f"positive; got L(0) = {initial.cpu().tolist()}."
            )
        return initial


@register(paper=_PAPER, stateful=True, permutation_invariant=True, example_args=_example)
class GradNorm(GramianWeightedAggregator):
    r"""GradNorm (Chen et al., *GradNorm: Gradient Normalization for Adaptive Loss Balancing in
    Deep Multitask Networks*, ICML 2018, [arXiv 1711.02257](https://arxiv.org/abs/1711.02257)):
    loss weights $w_i$, trained so that the gradient norms of the weighted losses at a layer
    $W$ follow the tasks' training rates.

    At step $t$ the update is $\mathcal A(J) = \sum_i w_i(t)\, g_i$. With $n_i = \lVert
    \nabla_W L_i \rVert$, $G_i = w_i(t)\, n_i$, $\bar G = \frac1m \sum_i G_i$, the loss ratios
    $\tilde L_i = L_i(t) / L_i(0)$ and the inverse training rates $r_i = \tilde L_i /
    (\frac1m \sum_j \tilde L_j)$, the weights then take one gradient step on

    $$
    L_{\mathrm{grad}} = \sum_i \big|\, G_i - \bar G\, r_i^\alpha \big|
    $$

    with the targets $\bar G r_i^\alpha$ held constant (the paper's Algorithm 1):
    $w_i \leftarrow w_i - \eta\, \operatorname{sign}(G_i - \bar G r_i^\alpha)\, n_i$, and are
    renormalised to $\sum_i w_i(t + 1) = m$. They start at 1.

    The weights are trained inside the aggregator, with the step size ``lr`` (the paper uses
    the network's optimizer; here no second optimizer is needed in the training loop). The
    step is in the units of the gradient norms, so ``lr`` has no default. The paper leaves open
    what a step that makes a weight negative does; here weights are floored at 0 before the
    renormalisation (a negative weight would ascend its loss), and a floored weight grows back
    at the next step, since its gradient norm is still seen (if every weight were floored the
    weights would restart at 1). With ``shared_params`` in `jdoptim.JDOptimizer`, the task
    heads receive the gradient of $\sum_i w_i(t) L_i$, as in the paper, where the whole network
    descends the weighted loss.

    Choices where the paper leaves one: $W$ defaults to all the shared parameters (``layer=None``,
    as in LibMTL); the paper takes the last shared layer to save computing the gradients
    elsewhere, which costs nothing more here since the Jacobian is there anyway, and
    ``layer=-1`` does that (the layers are found by `jdoptim.JDOptimizer`, see `GradVac`).
    $L(0)$ is the first call's losses, as in the paper, or with ``n_warmup_steps=k`` the mean
    of the losses of the first $k$ calls, during which the weights stay at 1: LibMTL trains its
    first epoch with weights 1 and takes that epoch's mean losses as $L(0)$, so
    ``n_warmup_steps`` set to the number of batches of an epoch reproduces it. LibMTL keeps
    the weights as $m \operatorname{softmax}(\xi)$ of logits $\xi$ that the network's
    optimizer trains (another parametrisation of the same sum constraint, with another step),
    and gives the heads the gradients of the unweighted losses.

    The method needs the values of the losses, which `jdoptim.JDOptimizer` passes (a direct call
    is ``GradNorm(...)(J, losses=losses)``); $L(0)$ must be positive. With ``layer=None`` it
    only needs the Gramian and the losses, so it runs in gramian mode too. Its state (the
    weights, $L(0)$, the warm-up sums) is in ``state_dict()``; `reset` restarts it. The weights
    of the next step are ``weighting.loss_weights`` and, in the diagnostics,
    ``method_state["loss_weights"]``.

    Args:
        lr: The step size $\eta > 0$ of the weights' gradient step.
        alpha: The asymmetry $\alpha \ge 0$ (the paper uses 0.12 to 3; 1.5 is LibMTL's
            default): the larger, the more the slowly trained tasks are pushed.
        n_warmup_steps: The number of first calls whose mean losses are $L(0)$.
        layer: The index of the layer whose gradient norms are balanced, among the layers of the
            shared parameters in the order of the Jacobian's columns (``-1``: the last), or
            ``None`` for all of them.

    Examples:
        >>> import torch
        >>> from jdoptim import GradNorm
        >>> J = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> aggregator = GradNorm(lr=0.1)
        >>> aggregator(J, losses=torch.tensor([2.0, 1.0]))  # w(0) = (1, 1)
        tensor([1., 3.], dtype=torch.float64)
        >>> aggregator.weighting.loss_weights  # the second task's gradient is larger
        tensor([1.2222, 0.7778], dtype=torch.float64)
        >>> aggregator(J, losses=torch.tensor([1.0, 1.0]))
        tensor([1.2222, 2.3333], dtype=torch.float64)
    """

    weighting: GradNormWeighting
    layer = Argument(optional(_check_layer))

    def __init__(
        self,
        lr: float,
        alpha: float = 1.5,
        n_warmup_steps: int = 0,
        layer: int | None = None,
    ) -> None:
        super().__init__(GradNormWeighting(lr, alpha, n_warmup_steps))
        self.layer = layer

    @property  # type: ignore[override]
    def needs_columns(self) -> bool:  # type: ignore[override]
        """Whether the norms are taken at one layer, whose columns must be known."""
        return self.layer is not None

    def _aggregate(
        self, matrix: Tensor, losses: Tensor | None = None, columns: Columns | None = None
    ) -> Tensor:
        if columns is None:
            return super()._aggregate(matrix, losses)
        layers = columns.blocks("layer")
        layer = self.layer
        if not -len(layers) <= layer < len(layers):  # type: ignore[operator]
            raise ValueError(
                f"GradNorm(layer={layer}) asks for a layer the shared parameters do not have: "
                f"they have {len(layers)} layers."
            )
        gramian = block_gramians(matrix, [layers[layer]])[0]  # type: ignore[index]
        return weighted_sum(self.weighting(gramian, losses=losses), matrix)
