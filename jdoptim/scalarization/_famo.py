from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Argument, check_non_negative, check_weights, optional
from jdoptim.registry import register
from jdoptim.scalarization._bases import (
    Scalarizer,
    check_count,
    check_losses,
    optional_m,
    state_dtype,
)

_EPSILON = 1e-8
_BETAS = (0.9, 0.999)
_ADAM_EPSILON = 1e-8


@register(name="scalarization.famo", paper="https://arxiv.org/abs/2306.03792", stateful=True)
class FAMO(Scalarizer):
    r"""Fast Adaptive Multitask Optimization (Liu et al., *FAMO: Fast Adaptive Multitask
    Optimization*, NeurIPS 2023, Algorithm 2, [arXiv 2306.03792](https://arxiv.org/abs/2306.03792)):
    balances the rates at which the losses decrease, from the loss values alone.

    With task weights $z = \operatorname{softmax}(\xi)$ from logits $\xi$ and lower bounds $b$,
    the scalar is

    $$ s(L) = c \sum_{i=1}^m z_i \log(L_i - b_i + \epsilon), \qquad
    c = \Big(\sum_i \frac{z_i}{L_i - b_i + \epsilon}\Big)^{-1}, $$

    with $z$ and $c$ constants for the backward pass, so its gradient is the convex combination
    $\sum_i c\, z_i / (L_i - b_i + \epsilon)\, \nabla L_i$. The logits are not trained by that
    backward pass: after the model's step, `update` receives the losses $L'$ recomputed on the
    same batch, forms $\delta_i = \log(L_i - b_i + \epsilon) - \log(L'_i - b_i + \epsilon)$
    and takes one Adam step on $\xi$ along the gradient
    $J_{\operatorname{softmax}}(\xi)^\top \delta = z \odot (\delta - z^\top \delta)$, with
    learning rate ``lr`` and L2 weight decay ``weight_decay`` (the paper's $\gamma$). The Adam
    step is torch.optim.Adam's (betas $(0.9, 0.999)$, eps $10^{-8}$), kept inside the
    scalarizer. $\epsilon = 10^{-8}$.

    The call protocol, once per training step:

    1. ``s = scalarizer(losses)`` in training mode (the default) records the detached losses;
       then ``s`` is backpropagated and the model takes its step.
    2. ``scalarizer.update(new_losses)`` with the losses of the same batch recomputed after the
       step (under ``torch.no_grad()``). It raises if no call recorded losses since the last
       update. Several calls before an update keep the last one's losses.

    The logits, Adam's moments and step count, and the pending losses are buffers saved in
    ``state_dict()``; `reset` returns to uniform weights and a fresh Adam.

    Args:
        m: The number of objectives. With ``None`` (the default) it is learnt at the first
            call, where the state is created on the losses' device; when given, the state is
            created on the CPU, to be moved with ``.to(device)``. Calling with another number
            of losses raises.
        min_losses: The lower bounds $b$ of the losses, one per objective (the paper's
            $L^*$); ``None`` means 0. Each loss must stay at or above its bound.
        lr: Adam's learning rate on the logits (``w_lr`` of the paper's code).
        weight_decay: Adam's L2 weight decay on the logits, the paper's regularisation
            coefficient $\gamma$ (Algorithm 2 uses $10^{-3}$).

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import FAMO
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> scalarizer = FAMO()
        >>> x = torch.randn(8, 3)
        >>> losses = model(x).pow(2).mean(dim=0)
        >>> optimizer.zero_grad()
        >>> scalarizer(losses).backward()
        >>> optimizer.step()
        >>> with torch.no_grad():
        ...     scalarizer.update(model(x).pow(2).mean(dim=0))
        >>> scalarizer.weights()  # the task weights z for the next step
        tensor([0.4875, 0.5125])
    """

    _lazy_buffers = ("logits", "exp_avg", "exp_avg_sq", "pending_losses")

    m = Argument(optional_m, fixed=True)
    min_losses = Argument(optional(check_weights))
    lr = Argument(check_non_negative)
    weight_decay = Argument(check_non_negative)

    def __init__(
        self,
        m: int | None = None,
        min_losses: Tensor | Sequence[float] | None = None,
        lr: float = 0.025,
        weight_decay: float = 0.001,
    ) -> None:
        super().__init__()
        self.m = m
        self.min_losses = min_losses
        self.lr = lr
        self.weight_decay = weight_decay
        for name in self._lazy_buffers:
            self.register_buffer(name, None)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        if m is not None:
            self._create_state(m, torch.get_default_dtype(), self.steps.device)

    def _argument_set(self, name: str) -> None:
        logits = self._buffers.get("logits")
        m = self.m if logits is None else logits.shape[0]
        minimum = self.min_losses if name == "min_losses" else None
        if m is not None and minimum is not None and minimum.shape[0] != m:
            raise ValueError(
                f"Invalid min_losses value: {minimum.tolist()}; FAMO has m={m} objectives."
            )

    def reset(self) -> None:
        """Return to uniform task weights and a fresh Adam, and drop pending losses."""
        self.pending_losses = None
        self.steps.zero_()
        if self.m is None:
            self.logits = self.exp_avg = self.exp_avg_sq = None
        else:
            for state in (self.logits, self.exp_avg, self.exp_avg_sq):
                state.zero_()

    def _create_state(self, m: int, dtype: torch.dtype, device: torch.device) -> None:
        self.logits = torch.zeros(m, dtype=dtype, device=device)
        self.exp_avg = torch.zeros_like(self.logits)
        self.exp_avg_sq = torch.zeros_like(self.logits)

    def weights(self) -> Tensor:
        r"""The current task weights $z = \operatorname{softmax}(\xi)$.

        Raises:
            ValueError: If the number of objectives is not known yet.
        """
        if self.logits is None:
            raise ValueError("FAMO learns m at its first call; call it on losses first.")
        return torch.softmax(self.logits, dim=0)

    def _shifted(self, losses: Tensor, what: str) -> Tensor:
        """``losses - b + ε``, checked to be positive."""
        shifted = losses
        if self.min_losses is not None:
            check_count(self.min_losses.shape[0], losses, type(self).__name__, "min_losses")
            shifted = losses - self.min_losses.to(dtype=losses.dtype, device=losses.device)
        shifted = shifted + _EPSILON
        if (shifted <= 0).any():
            raise ValueError(
                f"FAMO takes the log of the losses minus their lower bounds, so the {what} must "
                f"not be below min_losses; got {losses.detach().cpu().tolist()}."
            )
        return shifted

    def _scalarize(self, losses: Tensor) -> Tensor:
        if self.logits is None:
            self._create_state(losses.shape[0], state_dtype(losses), losses.device)
        check_count(self.logits.shape[0], losses, type(self).__name__, "objectives")
        shifted = self._shifted(losses, "losses")
        z = self.weights().to(losses.dtype)
        c = 1.0 / (z / shifted.detach()).sum()
        if self.training:
            self.pending_losses = losses.detach().to(self.logits.dtype, copy=True)
        return c * (z @ shifted.log())

    @torch.no_grad()
    def update(self, new_losses: Tensor) -> None:
        """Take FAMO's step on the task logits from the losses recomputed after the model step.

        Args:
            new_losses: The losses of the batch last scalarised, recomputed after the model's
                update, shape ``[m]``.

        Raises:
            ValueError: If no call recorded losses since the last update, or the losses do not
                match them.
        """
        owner = f"{type(self).__name__}.update"
        check_losses(new_losses, owner)
        if self.pending_losses is None:
            raise ValueError(
                "FAMO.update() needs the losses of a preceding call in training mode; call the "
                "scalarizer on the batch's losses and step the model first."
            )
        check_count(self.pending_losses.shape[0], new_losses, owner, "pending losses")
        new_losses = new_losses.to(self.logits)
        before = self._shifted(self.pending_losses, "pending losses")
        after = self._shifted(new_losses, "new losses")
        delta = before.log() - after.log()
        z = self.weights()
        gradient = z * (delta - z @ delta)
        self._adam_step(gradient)
        self.pending_losses = None

    def _adam_step(self, gradient: Tensor) -> None:
        beta1, beta2 = _BETAS
        self.steps += 1
        gradient = gradient + self.weight_decay * self.logits
        self.exp_avg.lerp_(gradient, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        steps = self.steps.to(torch.float64)
        bias_correction1 = 1 - beta1**steps
        bias_correction2 = 1 - beta2**steps
        denominator = self.exp_avg_sq.sqrt() / bias_correction2.sqrt() + _ADAM_EPSILON
        self.logits.add_(self.exp_avg / denominator * (-self.lr / bias_correction1))
