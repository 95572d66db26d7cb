"""`JDOptimizer`: Jacobian descent inside any ``torch.optim`` optimizer.

A loss vector goes through :meth:`JDOptimizer.backward`: its Jacobian with respect to the
parameters (``jdoptim.functional.jacobian``), then the aggregator (``jdoptim.aggregation``, whose
numerical kernels live in ``jdoptim.linalg``), then the update is added into ``.grad``;
:meth:`JDOptimizer.step` then lets the inner optimizer step.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from jdoptim.aggregation import Aggregator
from jdoptim.functional import as_loss_vector, jacobian, split_update, stack_jacobians
from jdoptim.registry import build, to_config

Mode = Literal["jacobian", "auto"]
NonFinite = Literal["raise", "skip"]
MODES: tuple[str, ...] = ("jacobian", "auto")
NONFINITE_POLICIES: tuple[str, ...] = ("raise", "skip")
LossesT = Tensor | Sequence[Tensor]
_STATE_KEY = "jdoptim"


class NonFiniteError(ValueError):
    """Raised when a step meets non-finite losses, Jacobian or update under
    ``nonfinite="raise"``."""


class JDOptimizer(Optimizer):
    """Jacobian descent with any ``torch.optim`` optimizer.

    ``backward(losses)`` computes the Jacobian of a vector of losses with respect to the
    parameters of the inner optimizer, maps it to one update with ``aggregator`` and adds the
    update into the parameters' ``.grad``; ``step(losses)`` does that and then lets the inner
    optimizer step. The wrapper *is* an optimizer: it shares ``param_groups``, ``state`` and
    ``defaults`` with the inner one, so LR schedulers, ``GradScaler`` and checkpoint tools
    accept it.

    Args:
        optimizer: The inner optimizer, which owns the parameters and takes the steps.
        aggregator: Maps the Jacobian ``[m, n]`` to an update ``[n]``.
        mode: How the Jacobian is obtained. ``"jacobian"``: one batched vector-Jacobian
            product over all losses. ``"auto"``: the fastest mode available for the
            aggregator and model, which is ``"jacobian"`` in this version.
        chunk_size: Losses per batched backward pass (bounds memory); ``None`` for all at
            once, ``1`` for one backward pass per loss (no vmap).
        nonfinite: What to do with non-finite losses, Jacobian or update: ``"raise"`` a
            `NonFiniteError`, or ``"skip"`` the step with a warning, leaving everything
            unchanged, as ``GradScaler`` does.

    Examples:
        >>> import torch
        >>> from torch.optim import SGD
        >>> from jdoptim import JDOptimizer, UPGrad
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2)
        >>> opt = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad())
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> losses = ((model(x) - y) ** 2).mean(dim=0)  # one loss per output
        >>> opt.zero_grad()
        >>> opt.step(losses)
        >>> new_losses = ((model(x) - y) ** 2).mean(dim=0)
        >>> bool((new_losses < losses).all())
        True
    """

    def __init__(
        self,
        optimizer: Optimizer,
        aggregator: Aggregator,
        *,
        mode: Mode = "jacobian",
        chunk_size: int | None = None,
        nonfinite: NonFinite = "raise",
    ) -> None:
        if not isinstance(optimizer, Optimizer) or isinstance(optimizer, JDOptimizer):
            raise TypeError(
                "Expected a torch.optim.Optimizer to wrap (not a JDOptimizer), got "
                f"{optimizer!r} of type {type(optimizer).__name__}."
            )
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                "Expected a jdoptim Aggregator (e.g. jdoptim.UPGrad()), got "
                f"{aggregator!r} of type {type(aggregator).__name__}."
            )
        if mode not in MODES:
            raise ValueError(f"Invalid mode value: {mode!r}; valid modes: {MODES}.")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"Invalid chunk_size value: {chunk_size!r}; expected an integer >= 1.")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid nonfinite value: {nonfinite!r}; valid policies: {NONFINITE_POLICIES}."
            )
        self.optimizer = optimizer
        self.aggregator = aggregator
        self.mode = mode
        self.chunk_size = chunk_size
        self.nonfinite = nonfinite
        # None until the first batched backward pass tells whether vmap runs on this graph.
        self._batched: bool | None = None if chunk_size != 1 else False
        self._skip_next_step = False
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._patch_step_function()

    @classmethod
    def from_config(cls, optimizer: Optimizer, config: Mapping[str, Any]) -> JDOptimizer:
        """Build a `JDOptimizer` from a dictionary.

        Args:
            optimizer: The inner optimizer.
            config: ``{"aggregator": <aggregator config>, **keyword arguments}``, where the
                aggregator config is a registry name or ``{"name": ..., **arguments}``.

        Examples:
            >>> import torch
            >>> from jdoptim import JDOptimizer
            >>> sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
            >>> JDOptimizer.from_config(sgd, {"aggregator": {"name": "mgda"}, "mode": "auto"})
            ... # doctest: +ELLIPSIS
            JDOptimizer(
              optimizer=SGD (...),
              aggregator=MGDA(epsilon=0.001, max_iters=100),
              mode='auto', chunk_size=None, nonfinite='raise'
            )
        """
        valid = ("aggregator", "mode", "chunk_size", "nonfinite")
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}.")
        unknown = [key for key in config if key not in valid]
        if unknown:
            raise ValueError(f"Unknown JDOptimizer config keys {unknown}; valid keys: {valid}.")
        if "aggregator" not in config:
            raise ValueError("A JDOptimizer config needs an 'aggregator' key.")
        options = {key: value for key, value in config.items() if key != "aggregator"}
        aggregator = build(config["aggregator"])
        if not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"config['aggregator'] built {aggregator!r}, which is not an Aggregator; wrap a "
                "weighting in jdoptim.GramianWeightedAggregator or name an aggregator."
            )
        return cls(optimizer, aggregator, **options)

    def to_config(self) -> dict[str, Any]:
        """Return the configuration that `from_config` turns back into this wrapper."""
        return {
            "aggregator": to_config(self.aggregator),
            "mode": self.mode,
            "chunk_size": self.chunk_size,
            "nonfinite": self.nonfinite,
        }

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _jacobians(self, vector: Tensor, params: list[Tensor], retain_graph: bool) -> list:
        if self._batched is None:
            try:
                # The graph is kept in case vmap fails midway and the losses must be replayed.
                jacobians = jacobian(vector, params, chunk_size=self.chunk_size, retain_graph=True)
            except RuntimeError as error:
                warnings.warn(
                    f"The batched backward pass failed ({error}); computing one backward pass "
                    "per loss from now on. Pass chunk_size=1 to choose this explicitly.",
                    stacklevel=3,
                )
                self._batched = False
            else:
                self._batched = True
                return jacobians
        return jacobian(
            vector,
            params,
            chunk_size=self.chunk_size,
            retain_graph=retain_graph,
            batched=self._batched,
        )

    def _refuse(self, reason: str) -> None:
        if self.nonfinite == "raise":
            raise NonFiniteError(
                f"{reason}. Nothing was changed. Pass nonfinite='skip' to skip such steps."
            )
        warnings.warn(f"Skipping the step: {reason}.", stacklevel=3)
        self._skip_next_step = True

    def backward(self, losses: LossesT, *, retain_graph: bool = False) -> None:
        """Add the aggregated update of ``losses`` into the parameters' ``.grad``.

        Parameters that no loss reaches keep their ``.grad`` (``None`` stays ``None``).
        If anything fails, no ``.grad`` is changed.

        Args:
            losses: A tensor of losses of any shape with at least one dimension (flattened to
                ``m`` objectives), or a sequence of scalar tensors.
            retain_graph: Keep the autograd graph for another backward pass.

        Raises:
            ValueError: If the losses are empty, 0-d, or not connected to any parameter.
            NonFiniteError: If losses, Jacobian or update are not finite and
                ``nonfinite="raise"``.
        """
        vector = as_loss_vector(losses)
        if not vector.requires_grad:
            raise ValueError(
                "The losses do not require grad, so they are not connected to any parameter; "
                "compute them from the model's outputs with grad enabled."
            )
        params = self._parameters()
        jacobians = self._jacobians(vector, params, retain_graph)
        reached = [(p, jac) for p, jac in zip(params, jacobians, strict=True) if jac is not None]
        if not reached:
            raise ValueError(
                f"None of the {len(params)} parameters of the optimizer receives a gradient "
                "from the losses; are they computed from this model?"
            )
        matrix = stack_jacobians([jac for _, jac in reached])
        finite = torch.isfinite(vector).all() & torch.isfinite(matrix).all()
        if not finite:
            bad = (~torch.isfinite(vector)).nonzero().flatten().tolist()
            what = (
                f"losses at indices {bad} are not finite" if bad else "the Jacobian is not finite"
            )
            return self._refuse(what)
        update = self.aggregator(matrix)
        if not torch.isfinite(update).all():
            return self._refuse(f"{self.aggregator!r} returned a non-finite update")
        for (param, _), piece in zip(
            reached, split_update(update, [p for p, _ in reached]), strict=True
        ):
            if param.grad is None:
                param.grad = piece
            else:
                param.grad.add_(piece)

    def step(  # type: ignore[override]
        self,
        losses: LossesT | None = None,
        closure: Callable[[], LossesT] | None = None,
    ) -> Tensor | None:
        """Run `backward` on ``losses`` (if given), then let the inner optimizer step.

        ``step()`` with no arguments only steps, using the ``.grad`` already there (as
        ``GradScaler.step`` does). A step whose `backward` was skipped for non-finite values
        does not step.

        Args:
            losses: The losses, as in `backward`.
            closure: For optimizers that re-evaluate the losses (such as LBFGS): a function
                that clears the gradients, recomputes and returns the losses. The inner
                optimizer sees the sum of the losses as the loss value. Non-finite values
                always raise here.

        Returns:
            What the inner optimizer's ``step`` returns.
        """
        if closure is not None:
            if losses is not None:
                raise ValueError("Pass either losses or a closure to step(), not both.")

            def jd_closure() -> Tensor:
                with torch.enable_grad():
                    vector = as_loss_vector(closure())
                    policy, self.nonfinite = self.nonfinite, "raise"
                    try:
                        self.backward(vector)
                    finally:
                        self.nonfinite = policy
                return vector.detach().sum()

            return self.optimizer.step(jd_closure)
        if losses is not None:
            self.backward(losses)
        if self._skip_next_step:
            self._skip_next_step = False
            return None
        return self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, as the inner optimizer does, and forget a pending skip."""
        self._skip_next_step = False
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the inner optimizer."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus the aggregator's config and state under the
        ``"jdoptim"`` key."""
        state = self.optimizer.state_dict()
        state[_STATE_KEY] = {
            "aggregator": self._aggregator_config(),
            "aggregator_state": self.aggregator.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by `state_dict` (or by the inner optimizer alone).

        Raises:
            ValueError: If the state was written with another aggregator configuration.
        """
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        current = self._aggregator_config()
        saved = None if extra is None else extra["aggregator"]
        if None not in (saved, current) and saved != current:
            raise ValueError(
                f"This state was saved with the aggregator {saved}, but this "
                f"optimizer uses {current}; build it with "
                "jdoptim.build(state_dict['jdoptim']['aggregator'])."
            )
        self.optimizer.load_state_dict(state_dict)
        if extra is not None:
            self.aggregator.load_state_dict(extra["aggregator_state"])

    def _aggregator_config(self) -> dict[str, Any] | None:
        try:
            return to_config(self.aggregator)
        except (ValueError, TypeError):
            return None  # an unregistered aggregator: its state is still saved

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n  ")
        return (
            f"{type(self).__name__}(\n  optimizer={inner},\n  aggregator={self.aggregator!r},\n"
            f"  mode={self.mode!r}, chunk_size={self.chunk_size!r}, "
            f"nonfinite={self.nonfinite!r}\n)"
        )
