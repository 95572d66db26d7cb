from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from jdoptim.aggregation._bases import (
    Argument,
    check_non_negative_int,
    check_positive,
    check_weights,
    optional,
)
from jdoptim.registry import register
from jdoptim.scalarization._bases import (
    Scalarizer,
    as_preference_tensor,
    check_count,
    check_losses,
    state_dtype,
)

LOG_EPS = 1e-20
"""Added inside the logarithms of the warm-up mode, as in LibMTL, so that a zero loss gives a
finite scalar."""


def _example(m: int) -> dict[str, float]:
    return {"mu": 0.1}


@register(
    name="scalarization.stch",
    paper="https://arxiv.org/abs/2402.19078",
    permutation_invariant=True,
    stateful=True,
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

    **Warm-up with a nadir estimate** (``warmup_epochs > 0``), the way the paper's multi-task
    code and LibMTL run it: during the first ``warmup_epochs`` epochs the scalar is
    $\sum_i \log(L_i + 10^{-20})$; the losses of the last warm-up epoch are averaged into a
    nadir estimate $\bar L$; afterwards the scalar is the formula above on the log-losses
    relative to it, $x_i = \lambda_i \log(L_i / \bar L_i + 10^{-20})$ (no ``reference``
    then). The scalarizer cannot see epochs end, so the training loop calls `step` at the end
    of every epoch, as for `DWA`; losses are recorded in training mode only
    (``scalarizer.train()``, the default). LibMTL's ``STCH_warmup_epoch = E`` warms up for
    $E + 1$ epochs (it averages the losses of epoch $E$), so it is ``warmup_epochs=E + 1``
    here; it also weighs every term by 1 and multiplies the scalar by $m$, which
    ``weights=[1.0] * m`` and a learning rate $m$ times larger reproduce. The state (epochs
    counted, the running sums, the nadir estimate) is saved in ``state_dict()``; `reset`
    starts the warm-up again.

    Args:
        mu: The smoothing parameter $\mu > 0$. The paper evaluates
            $\mu \in \{0.01, 0.1, 0.5, 1\}$ and finds no single best value, so it has no
            default.
        weights: The preference vector $\lambda$ (non-negative, one entry per objective; on the
            simplex in the paper). ``None`` means $\lambda_i = 1/m$.
        reference: The ideal point $z^*$ subtracted from the losses (one entry per objective).
            ``None`` means no shift.
        warmup_epochs: The number of epochs of warm-up on the log-losses before the nadir
            estimate is fixed; ``0`` (the default) uses the losses as they are, with no state.

    Examples:
        >>> import torch
        >>> from jdoptim.scalarization import STCH
        >>> losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
        >>> STCH(mu=0.1, weights=[0.5, 0.5])(losses)  # close to max(0.5, 1.5)
        tensor(1.5000, dtype=torch.float64)
        >>> STCH(mu=1.0)(losses)  # log(e^0.5 + e^1.5)
        tensor(1.8133, dtype=torch.float64)
        >>> scalarizer = STCH(mu=1.0, warmup_epochs=1)
        >>> scalarizer(losses)  # warm-up: log(1) + log(3)
        tensor(1.0986, dtype=torch.float64)
        >>> scalarizer.step()  # the end of the epoch: the nadir estimate is (1, 3)
        >>> scalarizer(torch.tensor([0.5, 3.0], dtype=torch.float64))  # log(e^(log 0.5 / 2) + 1)
        tensor(0.5348, dtype=torch.float64)
    """

    _lazy_buffers = ("loss_sum", "nadir")

    mu = Argument(check_positive)
    weights = Argument(optional(as_preference_tensor))
    reference = Argument(optional(check_weights))
    warmup_epochs = Argument(check_non_negative_int)

    def __init__(
        self,
        mu: float,
        weights: Tensor | Sequence[float] | None = None,
        reference: Tensor | Sequence[float] | None = None,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        self.mu = mu
        self.weights = weights
        self.reference = reference
        self.warmup_epochs = warmup_epochs
        self.register_buffer("loss_sum", None)
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.int64))
        self.register_buffer("nadir", None)

    def _argument_set(self, name: str) -> None:
        reference = self.__dict__.get("reference", self._buffers.get("reference"))
        if reference is not None and self.__dict__.get("warmup_epochs", 0) > 0:
            raise ValueError(
                f"Invalid {name} value: {getattr(self, name)!r}; STCH with warmup_epochs > 0 "
                "estimates its own reference point (the nadir of the log-losses), so reference "
                "must be None."
            )

    def reset(self) -> None:
        """Start the warm-up again: forget the epochs counted, the running sums and the nadir
        estimate."""
        self.loss_sum = None
        self.nadir = None
        self.batches.zero_()
        self.epochs.zero_()

    @property
    def warming_up(self) -> bool:
        """Whether the scalar is still the sum of the log-losses."""
        return self.warmup_epochs > 0 and self.nadir is None

    def _scalarize(self, losses: Tensor) -> Tensor:
        owner, m = type(self).__name__, losses.shape[0]
        shifted = losses
        if self.warmup_epochs > 0:
            if bool((losses + LOG_EPS <= 0).any()):
                raise ValueError(
                    "STCH with warmup_epochs > 0 takes the logarithm of the losses, which must "
                    f"not be negative; got {losses.detach().cpu().tolist()}."
                )
            if self.nadir is None:
                if self.training and int(self.epochs) == self.warmup_epochs - 1:
                    self._record(losses.detach())
                return torch.log(losses + LOG_EPS).sum()
            check_count(self.nadir.shape[0], losses, owner, "nadir entries")
            nadir = self.nadir.to(dtype=losses.dtype, device=losses.device)
            shifted = torch.log(losses / nadir + LOG_EPS)
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

    def _record(self, losses: Tensor) -> None:
        values = losses.to(state_dtype(losses))
        if self.loss_sum is None:
            self.loss_sum = values.clone()
        else:
            check_count(self.loss_sum.shape[0], losses, type(self).__name__, "recorded losses")
            self.loss_sum = self.loss_sum + values.to(self.loss_sum)
        self.batches += 1

    @torch.no_grad()
    def step(self, epoch_losses: Tensor | None = None) -> None:
        """Close an epoch; at the end of the warm-up, fix the nadir estimate.

        Call it once at the end of every epoch (it does nothing without a warm-up, or after
        it).

        Args:
            epoch_losses: The average loss of each objective over the last warm-up epoch, shape
                ``[m]``, to use as the nadir estimate instead of the average of the losses
                scalarised in training mode during that epoch.

        Raises:
            ValueError: If the nadir estimate has an entry that is not positive and finite.
        """
        if not self.warming_up:
            return
        if int(self.epochs) < self.warmup_epochs - 1:
            self.epochs += 1
            return
        if epoch_losses is not None:
            check_losses(epoch_losses, f"{type(self).__name__}.step")
            nadir = epoch_losses.detach().to(state_dtype(epoch_losses))
        elif self.loss_sum is None:
            warnings.warn(
                "STCH.step() found no losses recorded in the last warm-up epoch, so the warm-up "
                "goes on; call the scalarizer in training mode during the epoch, or pass the "
                "epoch's average losses to step().",
                stacklevel=2,
            )
            return
        else:
            nadir = self.loss_sum / self.batches
        if not bool((torch.isfinite(nadir) & (nadir > 0)).all()):
            raise ValueError(
                "STCH's nadir estimate divides the losses, so it must be positive and finite; "
                f"got {nadir.cpu().tolist()}."
            )
        self.nadir = nadir
        self.loss_sum = None
        self.batches.zero_()
        self.epochs += 1
