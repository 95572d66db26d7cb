from __future__ import annotations

import warnings

import torch
from torch import Tensor

from jdoptim.aggregation._bases import Argument, check_positive
from jdoptim.registry import register
from jdoptim.scalarization._bases import Scalarizer, check_losses, state_dtype


@register(name="scalarization.dwa", paper="https://arxiv.org/abs/1803.10704", stateful=True)
class DWA(Scalarizer):
    r"""Dynamic Weight Average (Liu, Johns and Davison, *End-to-End Multi-Task Learning with
    Attention*, [arXiv 1803.10704](https://arxiv.org/abs/1803.10704)): in epoch $t$,

    $$ s(L) = \sum_{k=1}^m \lambda_k(t)\, L_k, \qquad
    \lambda_k(t) = \frac{m \exp(w_k(t-1) / T)}{\sum_i \exp(w_i(t-1) / T)}, \qquad
    w_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)}, $$

    where $\bar L_k(t)$ is the average loss of objective $k$ over epoch $t$: an objective whose
    loss fell more slowly gets more weight. The weights sum to $m$ and are constants for the
    backward pass; in the first two epochs they are all 1 ($w_k = 1$, as in the paper).

    The scalarizer cannot see epochs end, so the training loop tells it (the call protocol):

    1. every batch: ``scalarizer(losses)``. In training mode (``scalarizer.train()``, the
       default) the detached losses are added to the running sums of the current epoch; in
       ``eval()`` mode nothing is recorded, so scalarising validation losses leaves the state
       alone.
    2. at the end of each epoch: ``scalarizer.step()``, which closes the epoch with the average
       of the losses recorded since the previous `step`, or ``scalarizer.step(epoch_losses)``
       to give that epoch's average losses yourself (the running sums are then discarded).

    The state (running sums, number of batches, averages of the last two epochs) is saved in
    ``state_dict()``. The number of objectives is fixed by the first call; `reset` forgets
    everything, after which another number of objectives may be used.

    Args:
        temperature: The temperature $T > 0$; a larger $T$ gives more uniform weights. The
            paper uses $T = 2$.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import DWA
        >>> scalarizer = DWA(temperature=2.0)
        >>> for epoch_losses in ([4.0, 2.0], [2.0, 1.5]):  # one batch per epoch here
        ...     _ = scalarizer(torch.tensor(epoch_losses))
        ...     scalarizer.step()
        >>> scalarizer.weights(2)  # 2 softmax([0.5, 0.75] / 2)
        tensor([0.9376, 1.0624])
    """

    _lazy_buffers = ("loss_sum", "history")

    temperature = Argument(check_positive)

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.register_buffer("loss_sum", None)
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("history", None)

    def reset(self) -> None:
        """Forget the recorded losses and epoch averages."""
        self.loss_sum = None
        self.batches.zero_()
        self.history = None

    def weights(self, m: int) -> Tensor:
        r"""The weights $\lambda(t)$ of the current epoch, for ``m`` objectives.

        Raises:
            ValueError: If the recorded epochs have another number of objectives.
        """
        if self.history is None or self.history.shape[0] < 2:
            dtype = torch.get_default_dtype() if self.history is None else self.history.dtype
            return torch.ones(m, dtype=dtype, device=self.batches.device)
        self._check_objectives(self.history.shape[1], m)
        rates = self.history[1] / self.history[0]
        return m * torch.softmax(rates / self.temperature, dim=0)

    def _scalarize(self, losses: Tensor) -> Tensor:
        m = losses.shape[0]
        weights = self.weights(m).to(dtype=losses.dtype, device=losses.device)
        if self.training:
            detached = losses.detach().to(state_dtype(losses))
            if self.loss_sum is None:
                self.loss_sum = detached.clone()
            else:
                self._check_objectives(self.loss_sum.shape[0], m)
                self.loss_sum = self.loss_sum + detached
            self.batches += 1
        return weights @ losses

    @torch.no_grad()
    def step(self, epoch_losses: Tensor | None = None) -> None:
        """Close the current epoch: record its average losses and start a new one.

        Call it once at the end of every epoch.

        Args:
            epoch_losses: The epoch's average loss of each objective, shape ``[m]``. ``None``
                uses the average of the losses scalarised in training mode since the previous
                `step` (a warning is given, and nothing changes, if there were none).

        Raises:
            ValueError: If an average is zero or not finite (the next ratio would be
                undefined), or the number of objectives changed.
        """
        if epoch_losses is not None:
            check_losses(epoch_losses, f"{type(self).__name__}.step")
            average = epoch_losses.detach().to(state_dtype(epoch_losses))
        elif self.loss_sum is None:
            warnings.warn(
                "DWA.step() found no losses recorded since the previous step(), so the epoch "
                "history is left unchanged; call the scalarizer in training mode during the "
                "epoch, or pass the epoch's average losses to step().",
                stacklevel=2,
            )
            return
        else:
            average = self.loss_sum / self.batches
        if not (torch.isfinite(average).all() and (average != 0).all()):
            raise ValueError(
                "DWA needs finite, non-zero epoch-average losses (it divides consecutive "
                f"averages), got {average.cpu().tolist()}."
            )
        if self.history is None:
            self.history = average[None]
        else:
            self._check_objectives(self.history.shape[1], average.shape[0])
            self.history = torch.cat([self.history[-1:], average.to(self.history)[None]])
        self.loss_sum = None
        self.batches.zero_()

    def _check_objectives(self, recorded: int, m: int) -> None:
        if recorded != m:
            raise ValueError(
                f"DWA recorded losses for {recorded} objectives but got {m}; call reset() "
                "before changing the number of objectives."
            )
