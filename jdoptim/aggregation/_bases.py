"""Base classes: aggregators map a Jacobian to an update, weightings map it to weights.

Every concrete class declares each constructor argument once, as an `Argument` class attribute
holding its check, and stores it under the same public name. The check runs on construction and
on every later assignment, so an object always computes with what it reports: ``repr`` and
`jdoptim.to_config` read the arguments back through the constructor's signature, here, once. A
weighted aggregator has no arguments of its own: they are its weighting's, read and written
there.

Aggregation is not differentiable: aggregators and weightings run under ``torch.no_grad()``
and return tensors that do not require grad, whatever their input (as in TorchJD).
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from jdoptim.aggregation._columns import Columns
from jdoptim.linalg._gramian import gramian, solve_dtype, weighted_sum

Check = Callable[[Any, str], Any]
"""``check(value, name)`` returns the value to store or raises an error naming ``name`` and
``value``."""

_UNSET = object()


class Argument:
    """A constructor argument: stored under its public name, checked on every assignment.

    Declare one per constructor parameter of an aggregator, weighting or scalarizer, as a class
    attribute of the parameter's name, and assign the parameter in ``__init__`` (see the example).
    A tensor value is stored as a non-persistent buffer (so that ``.to()`` moves it), a module as
    a submodule, anything else as a plain attribute. After the check, the owner's
    ``_argument_set(name)`` runs (cross-argument checks, restarting a generator...); if either
    raises, the previous value stays.

    Args:
        check: ``check(value, name)`` returns the value to store (converted, e.g. a list to a
            tensor) or raises a ``ValueError`` or ``TypeError`` naming the argument and value.
        fixed: The value can only be set once, in the constructor (for arguments that shape the
            object's state, such as a number of objectives).

    Examples:
        >>> import torch
        >>> from jdoptim.aggregation import Argument, Weighting
        >>> def check_power(value, name):
        ...     if not isinstance(value, (int, float)) or value <= 0:
        ...         raise ValueError(f"Invalid {name} value: {value!r}; expected a number > 0.")
        ...     return float(value)
        >>> class PowerWeighting(Weighting):  # weights proportional to |g_i|^power
        ...     power = Argument(check_power)
        ...
        ...     def __init__(self, power: float = 1.0) -> None:
        ...         super().__init__()
        ...         self.power = power
        ...
        ...     def _weights(self, gramian):
        ...         norms = gramian.diagonal().sqrt() ** self.power
        ...         return norms / norms.sum()
        >>> weighting = PowerWeighting()
        >>> weighting.power = 2
        >>> weighting, weighting(torch.diag(torch.tensor([1.0, 9.0])))
        (PowerWeighting(power=2.0), tensor([0.1000, 0.9000]))
        >>> weighting.power = -1.0
        Traceback (most recent call last):
        ...
        ValueError: Invalid power value: -1.0; expected a number > 0.
    """

    def __init__(self, check: Check, *, fixed: bool = False) -> None:
        self.check = check
        self.fixed = fixed
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        value = self._stored(obj)
        if value is _UNSET:
            raise AttributeError(f"{type(obj).__name__}.{self.name} has not been set.")
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        owner = type(obj).__name__
        previous = self._stored(obj)
        if self.fixed and previous is not _UNSET:
            raise AttributeError(
                f"{owner}.{self.name} is fixed when the {owner} is built; build a new one with "
                f"{self.name}={value!r} instead."
            )
        self._store(obj, self.check(value, self.name))
        try:
            obj._argument_set(self.name)
        except BaseException:
            self._store(obj, previous)
            raise

    def _stored(self, obj: Any) -> Any:
        for store in (obj._buffers, obj._modules, obj.__dict__):
            if self.name in store:
                return store[self.name]
        return _UNSET

    def _store(self, obj: Any, value: Any) -> None:
        obj._buffers.pop(self.name, None)
        obj._non_persistent_buffers_set.discard(self.name)
        obj._modules.pop(self.name, None)
        obj.__dict__.pop(self.name, None)
        if value is _UNSET:
            return
        if isinstance(value, Tensor):
            obj._buffers[self.name] = value
            obj._non_persistent_buffers_set.add(self.name)
        elif isinstance(value, nn.Module):
            obj._modules[self.name] = value
        else:
            obj.__dict__[self.name] = value


def _format_arg(value: Any) -> str:
    if isinstance(value, Tensor):
        return repr(value.tolist())
    return repr(value)


class Configurable(nn.Module, ABC):
    """An ``nn.Module`` whose ``repr`` and configuration come from its constructor signature,
    and whose arguments (declared with `Argument`) are checked on every assignment."""

    registry_kind: ClassVar[str] = ""
    """The registry listing that subclasses belong to (``"aggregator"``, ``"weighting"``...)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), Argument):
            object.__setattr__(self, name, value)  # Argument.__set__ checks and stores it
        else:
            super().__setattr__(name, value)

    def _argument_set(self, name: str) -> None:
        """Called after argument ``name`` got a checked value; raise to refuse it (the previous
        value is then restored). Override for checks across arguments or state that depends on
        an argument."""

    def constructor_args(self) -> dict[str, Any]:
        """Return the constructor arguments this object computes with, by parameter name."""
        return {name: self._constructor_arg(name) for name in constructor_parameters(type(self))}

    def _constructor_arg(self, name: str) -> Any:
        return getattr(self, name)

    def reset(self) -> None:
        """Forget any state accumulated over calls. Stateless methods do nothing."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_format_arg(v)}" for k, v in self.constructor_args().items())
        return f"{type(self).__name__}({args})"


@functools.cache
def constructor_parameters(cls: type) -> tuple[str, ...]:
    """The names of the parameters of ``cls.__init__`` (without ``self``, ``*args``,
    ``**kwargs``), in order."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return tuple(
        p.name
        for p in parameters
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )


def check_matrix(matrix: Tensor, what: str) -> None:
    """Raise unless ``matrix`` is a 2-D floating-point tensor."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"Expected the {what} to be a torch.Tensor, got {type(matrix).__name__}.")
    if matrix.ndim != 2:
        raise ValueError(
            f"Expected the {what} to be a 2-D tensor, got shape {tuple(matrix.shape)}."
        )
    if not matrix.is_floating_point():
        raise TypeError(f"Expected the {what} to have a floating dtype, got {matrix.dtype}.")


def all_finite(tensor: Tensor, dim: int | None = None) -> Tensor:
    """Whether every entry (along ``dim``, if given) of ``tensor`` is finite, as a boolean
    tensor, without host synchronisation. The least and largest entries are NaN or infinite
    exactly when some entry is; finding them is several times faster than
    ``torch.isfinite(tensor).all()`` on the CPU."""
    if tensor.numel() == 0:
        shape = () if dim is None else tensor.shape[:dim] + tensor.shape[dim + 1 :]
        return torch.ones(shape, dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor) if dim is None else torch.aminmax(tensor, dim=dim)
    return torch.isfinite(low) & torch.isfinite(high)


class Weighting(Configurable):
    """Maps a Gramian ``G = J Jᵀ`` of shape ``[m, m]`` (or, if `needs_jacobian`, the
    Jacobian ``J`` of shape ``[m, n]``) to a weight vector of shape ``[m]``.

    The weights do not require grad (aggregation is not differentiable) and have the input's
    dtype; methods solve half-precision input (bfloat16, float16) in float32 or better (see
    `solve_dtype`). A matrix with a non-finite entry gives NaN weights, never finite ones, and
    leaves the weighting's state unchanged; so do non-finite losses for a weighting that
    `needs_losses`.
    """

    registry_kind: ClassVar[str] = "weighting"
    needs_jacobian: ClassVar[bool] = False
    """``True`` when the weighting needs ``J`` itself, so it cannot run from a Gramian."""
    uses_matrix: ClassVar[bool] = True
    """``False`` when the weights depend only on the number of objectives ``m``, so callers may
    pass any ``[m, m]`` tensor (such as a zero-stride view) instead of computing the Gramian."""
    needs_losses: ClassVar[bool] = False
    """``True`` when the weights depend on the values of the losses too, passed as
    ``weighting(matrix, losses=losses)`` (`jdoptim.JDOptimizer` passes them)."""
    column_state: ClassVar[bool] = False
    """``True`` when the weighting keeps state per column of ``J`` (see
    `Aggregator.column_state`)."""

    def forward(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        """Compute the weights.

        Args:
            matrix: The Gramian ``[m, m]``, or the Jacobian ``[m, n]`` if
                `needs_jacobian`.
            losses: The values of the ``m`` losses, for a weighting that `needs_losses`
                (ignored by the others).

        Returns:
            The weights, shape ``[m]``, with ``matrix``'s dtype and device.
        """
        if self.needs_jacobian:
            check_matrix(matrix, "Jacobian")
        else:
            check_matrix(matrix, "Gramian")
            if matrix.shape[0] != matrix.shape[1]:
                raise ValueError(
                    f"{type(self).__name__} expects a square Gramian, got shape "
                    f"{tuple(matrix.shape)}."
                )
        needs_losses = self.needs_losses
        if needs_losses:
            losses = check_losses_of(losses, matrix.shape[0], self)
        with torch.no_grad():
            if self.uses_matrix and not bool(all_finite(matrix)):
                # One host synchronisation, so that no solver runs (or raises) on non-finite
                # input and no state changes.
                return matrix.new_full((matrix.shape[0],), torch.nan)
            if needs_losses:
                if not bool(all_finite(losses)):
                    return matrix.new_full((matrix.shape[0],), torch.nan)
                return self._weights(matrix, losses).to(matrix.dtype)  # type: ignore[call-arg]
            return self._weights(matrix).to(matrix.dtype)

    @abstractmethod
    def _weights(self, matrix: Tensor) -> Tensor: ...

    def head_weights(self, losses: Tensor) -> Tensor | None:
        """See `Aggregator.head_weights`."""
        return None

    def report(self) -> dict[str, Tensor]:
        """See `Aggregator.report`."""
        return {}


def check_losses_of(losses: Tensor | None, m: int, method: nn.Module) -> Tensor:
    """Raise unless ``losses`` holds the values of ``m`` losses, for a method that needs them;
    return them detached."""
    owner = type(method).__name__
    if losses is None:
        raise ValueError(
            f"{owner} needs the values of the losses: call it as method(matrix, "
            "losses=losses) (JDOptimizer passes them)."
        )
    if not isinstance(losses, Tensor):
        raise TypeError(f"{owner} expects the losses as a torch.Tensor, got {losses!r}.")
    if losses.ndim != 1 or losses.shape[0] != m or not losses.is_floating_point():
        raise ValueError(
            f"{owner} expects a 1-D floating tensor of {m} losses (one per row), got shape "
            f"{tuple(losses.shape)} and dtype {losses.dtype}."
        )
    return losses.detach()


class Aggregator(Configurable):
    """Maps a Jacobian ``J`` of shape ``[m, n]`` (one row per objective) to an update ``[n]``.

    The update does not require grad (aggregation is not differentiable), and has ``J``'s
    dtype and device.

    Most methods need ``J`` alone. A method that `needs_losses` also takes the values of the
    losses, and one that `needs_columns` the layout of ``J``'s columns (which parameter, layer
    or parameter group each belongs to, as `Columns`); `jdoptim.JDOptimizer` passes both.
    """

    registry_kind: ClassVar[str] = "aggregator"
    needs_losses: ClassVar[bool] = False
    """``True`` when the update depends on the values of the losses too."""
    needs_columns: ClassVar[bool] = False
    """``True`` when the method treats blocks of ``J``'s columns (layers, parameters)
    separately, so it needs their layout; such a method cannot run from a Gramian."""
    column_state: ClassVar[bool] = False
    """``True`` when the method keeps state per column of ``J`` (moving averages of the
    gradients): such state means nothing where the columns change meaning between calls, as
    those of the representation with ``rep_grad=True`` do."""
    loss_dependent_head_weights: ClassVar[bool] = False
    """``True`` when `head_weights` depends on the values of the losses, so that the heads'
    gradients of micro-batches summed with ``accumulation="sum"`` would not be those of the
    whole batch."""

    def forward(
        self, matrix: Tensor, *, losses: Tensor | None = None, columns: Columns | None = None
    ) -> Tensor:
        """Aggregate the rows of ``matrix``.

        Args:
            matrix: The Jacobian, shape ``[m, n]``.
            losses: The values of the ``m`` losses, for a method that `needs_losses` (ignored
                by the others).
            columns: The layout of the columns, for a method that `needs_columns` (ignored by
                the others).

        Returns:
            The update, shape ``[n]``, with ``matrix``'s dtype and device.
        """
        check_matrix(matrix, "Jacobian")
        if matrix.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} needs at least one row, got shape (0, n).")
        extra: dict[str, Any] = {}
        if self.needs_losses:
            extra["losses"] = check_losses_of(losses, matrix.shape[0], self)
        if self.needs_columns:
            extra["columns"] = check_columns_of(columns, matrix.shape[1], self)
        with torch.no_grad():
            return self._aggregate(matrix, **extra)

    @abstractmethod
    def _aggregate(self, matrix: Tensor) -> Tensor: ...

    def head_weights(self, losses: Tensor) -> Tensor | None:
        """The weights ``c`` of the losses in the gradient of the parameters that are not
        aggregated (task heads, under ``shared_params``): they receive the gradient of
        ``Σ_i c_i L_i``. ``None`` (the default) means the plain sum. Methods that scale or
        transform each loss (GradNorm's weights, DB-MTL's logarithm) return the derivative of
        what they do to each loss, so that the heads train on the same losses as the trunk.

        Args:
            losses: The values of the losses ``[m]``, detached.
        """
        return None

    def report(self) -> dict[str, Tensor]:
        """What the last call computed besides the update, by name, for the diagnostics
        (`jdoptim.diagnostics.StepDiagnostics.method_state`): the weights a method learns, for
        example. Empty by default."""
        return {}


def check_columns_of(columns: Columns | None, n: int, method: nn.Module) -> Columns:
    """Raise unless ``columns`` is the layout of ``n`` columns, for a method that needs it."""
    owner = type(method).__name__
    if columns is None:
        raise ValueError(
            f"{owner} needs the layout of the Jacobian's columns: call it as "
            "aggregator(J, columns=Columns.of(params, model)) (JDOptimizer passes it)."
        )
    if not isinstance(columns, Columns):
        raise TypeError(f"{owner} expects columns as a jdoptim Columns, got {columns!r}.")
    if columns.n != n:
        raise ValueError(
            f"{owner} got the layout of {columns.n} columns for a Jacobian with {n} columns."
        )
    return columns


@functools.cache
def _forwarded_arguments(cls: type) -> frozenset[str]:
    # The arguments the aggregator declares itself (how it calls its weighting) stay on it.
    own = {name for name in dir(cls) if isinstance(inspect.getattr_static(cls, name), Argument)}
    return frozenset(constructor_parameters(cls)) - {"weighting"} - own


class WeightedAggregator(Aggregator):
    """Aggregates as ``Jᵀ w`` with weights ``w = weighting(J)``, for a weighting that needs the
    Jacobian (`Weighting.needs_jacobian`); a Gramian-based weighting belongs in a
    `GramianWeightedAggregator`.

    A method that builds its own weighting (``UPGrad`` builds an ``UPGradWeighting``) keeps its
    weighting's arguments there: reading or assigning ``aggregator.reg_eps`` reads or assigns
    ``aggregator.weighting.reg_eps``, where it is checked. Only the arguments that say how the
    aggregator calls its weighting (which columns it shows it, for example) are declared on
    the aggregator itself. Its weighting cannot be replaced. An
    aggregator built directly from a weighting (this class, `GramianWeightedAggregator`) can get
    another one by assignment, checked in the same way.

    Args:
        weighting: A weighting with ``needs_jacobian = True`` (or one whose weights depend only
            on the number of objectives, such as ``MeanWeighting``).

    Examples:
        >>> import torch
        >>> from jdoptim.aggregation import ConstantWeighting, GramianWeightedAggregator
        >>> aggregator = GramianWeightedAggregator(ConstantWeighting([0.25, 0.75]))
        >>> aggregator(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))
        tensor([1., 3.])
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        self.weighting = weighting

    def __getattr__(self, name: str) -> Any:
        # The arguments of a method that builds its own weighting live there.
        try:
            return super().__getattr__(name)
        except AttributeError:
            weighting = self.__dict__["_modules"].get("weighting")
            if weighting is None or name not in _forwarded_arguments(type(self)):
                raise
            return getattr(weighting, name)

    def __setattr__(self, name: str, value: Any) -> None:
        weighting = self.__dict__.get("_modules", {}).get("weighting")
        if name == "weighting":
            if weighting is not None and type(self).__init__ is not WeightedAggregator.__init__:
                owner = type(self).__name__
                raise AttributeError(
                    f"{owner}.weighting is the {type(weighting).__name__} built from {owner}'s "
                    "arguments and cannot be replaced; assign its arguments instead "
                    f"(aggregator.weighting.<argument> = value), or build a new {owner}."
                )
            self._check_weighting(value)
        elif weighting is not None and name in _forwarded_arguments(type(self)):
            setattr(weighting, name, value)
            return
        super().__setattr__(name, value)

    def _check_weighting(self, weighting: Any) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(
                f"Invalid weighting value: {weighting!r} of type {type(weighting).__name__}; "
                "expected a jdoptim Weighting."
            )
        if not weighting.needs_jacobian and weighting.uses_matrix:
            name = type(weighting).__name__
            raise TypeError(
                f"Invalid weighting value: {name} maps a Gramian to weights, but a "
                f"{type(self).__name__} hands its weighting the Jacobian; use "
                f"GramianWeightedAggregator({name}(...)) instead."
            )

    def reset(self) -> None:
        self.weighting.reset()

    @property  # type: ignore[override]
    def needs_losses(self) -> bool:  # type: ignore[override]
        """Whether the weighting needs the values of the losses."""
        return self.weighting.needs_losses

    @property  # type: ignore[override]
    def column_state(self) -> bool:  # type: ignore[override]
        """Whether the weighting keeps state per column of ``J``."""
        return self.weighting.column_state

    def head_weights(self, losses: Tensor) -> Tensor | None:
        return self.weighting.head_weights(losses)

    def report(self) -> dict[str, Tensor]:
        return self.weighting.report()

    def _weighting_input(self, matrix: Tensor) -> Tensor:
        return matrix

    def _aggregate(self, matrix: Tensor, losses: Tensor | None = None) -> Tensor:
        # A wrapped weighting (in CRMOGMWeighting) can change kind after construction.
        self._check_weighting(self.weighting)
        context = {"losses": losses} if self.weighting.needs_losses else {}
        weights = self.weighting(self._weighting_input(matrix), **context)
        return weighted_sum(weights, matrix)


class GramianWeightedAggregator(WeightedAggregator):
    """Aggregates as ``Jᵀ w`` with weights ``w = weighting(J Jᵀ)``.

    Only the Gramian reaches the weighting, so such an aggregator can also run from a Gramian
    computed without the Jacobian. A weighting that needs the Jacobian is refused.

    The Gramian is formed by `jdoptim.linalg.gramian`: in float32 for half-precision ``J``, and
    in float64 for a float32 ``J`` whose Gramian would overflow or underflow float32. The
    weighting then computes in that dtype, and the update ``Jᵀ w`` is formed there too and
    returned in ``J``'s dtype.
    """

    def _check_weighting(self, weighting: Any) -> None:
        if not isinstance(weighting, Weighting):
            super()._check_weighting(weighting)
        if weighting.needs_jacobian:
            raise ValueError(
                f"{type(weighting).__name__} needs the Jacobian, so it cannot be used in a "
                "GramianWeightedAggregator; use WeightedAggregator instead."
            )

    def _weighting_input(self, matrix: Tensor) -> Tensor:
        if not self.weighting.uses_matrix:
            m = matrix.shape[0]
            return matrix.new_zeros((), dtype=solve_dtype(matrix.dtype)).expand(m, m)
        return gramian(matrix)


def _invalid(name: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"Invalid {name} value: {value!r}; expected {expected}.")


def check_number(value: Any, name: str) -> float:
    """Raise unless ``value`` is a finite real number; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(name, value, "a finite number")
    return float(value)


def check_non_negative(value: Any, name: str) -> float:
    """Raise unless ``value`` is a finite real number ≥ 0; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise _invalid(name, value, "a number >= 0")
    if value == math.inf:
        raise _invalid(name, value, "a finite number")
    return float(value)


def check_positive(value: Any, name: str) -> float:
    """Raise unless ``value`` is a finite real number > 0; return it as a float."""
    value = check_non_negative(value, name)
    if value == 0:
        raise _invalid(name, value, "a number > 0")
    return value


def check_fraction(value: Any, name: str) -> float:
    """Raise unless ``value`` is a real number in ``[0, 1]``; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _invalid(name, value, "a number in [0, 1]")
    return float(value)


def check_non_negative_int(value: Any, name: str) -> int:
    """Raise unless ``value`` is an integer ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(name, value, "an integer >= 0")
    return value


def check_positive_int(value: Any, name: str) -> int:
    """Raise unless ``value`` is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(name, value, "an integer >= 1")
    return value


def check_seed(value: Any, name: str = "seed") -> int | None:
    """Raise unless ``value`` is ``None`` or an integer that ``torch.Generator.manual_seed``
    accepts (from ``-2**63`` to ``2**64 - 1``)."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**64
    ):
        raise _invalid(name, value, "an integer from -2**63 to 2**64 - 1, or None")
    return value


def one_of(choices: Collection[str]) -> Check:
    """A check that accepts exactly the strings in ``choices``."""

    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _invalid(name, value, "one of " + ", ".join(map(repr, choices)))
        return value

    return check


def optional(check: Check) -> Check:
    """A check that accepts ``None`` and whatever ``check`` accepts."""

    def check_or_none(value: Any, name: str) -> Any:
        return None if value is None else check(value, name)

    return check_or_none


def as_weight_tensor(values: Any, name: str) -> Tensor:
    """Check and convert a non-empty 1-D sequence (or tensor) of finite numbers to a float
    tensor: a copy, in the tensor's floating dtype (or the default dtype, for an integer
    tensor), or in float64 for Python numbers (so that ``repr``, configs and float64 input see
    them exactly)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Tensor, list, tuple)):
        raise TypeError(
            f"Invalid {name} value: {values!r}; expected a 1-D sequence of numbers or a tensor."
        )
    try:
        tensor = torch.as_tensor(
            values, dtype=None if isinstance(values, Tensor) else torch.float64
        )
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"Invalid {name} value: {values!r}; expected a 1-D sequence of numbers or a tensor."
        ) from None
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"Invalid {name} value: {values!r}; expected real numbers.")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(
            f"Invalid {name} value: {values!r}; expected a non-empty 1-D sequence, got shape "
            f"{tuple(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"Invalid {name} value: {tensor.tolist()}; expected finite numbers.")
    return tensor.detach().clone()


def check_weights(values: Any, name: str) -> Tensor:
    """`as_weight_tensor` as an `Argument` check."""
    return as_weight_tensor(values, name)


def check_length(weights: Tensor, m: int, owner: str, name: str) -> None:
    """Raise unless a per-objective vector has one entry per objective."""
    if weights.shape[0] != m:
        raise ValueError(
            f"{owner} has {weights.shape[0]} {name} but the Jacobian has {m} rows (objectives)."
        )


def preference_weights(pref_vector: Tensor | None, m: int, like: Tensor, owner: str) -> Tensor:
    """Return ``pref_vector`` (checked to have ``m`` entries) or uniform weights ``1/m``."""
    if pref_vector is None:
        return like.new_full((m,), 1.0 / m)
    check_length(pref_vector, m, owner, "preferences")
    return pref_vector.to(dtype=like.dtype, device=like.device)


class RandomSource:
    """Uniform random numbers for a randomised method.

    Without a seed, draws come from torch's global generator of the input's device, so
    ``torch.manual_seed`` makes them reproducible. With a seed, they come from a generator owned
    by the method, created from the seed on the device of the first draw (a seed gives the same
    numbers on the same device; CPU and CUDA streams differ); its state travels in
    ``state_dict()`` through `state` and `load_state`.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = check_seed(seed)
        self._generator: torch.Generator | None = None

    def reset(self) -> None:
        """Restart from ``seed`` at the next draw."""
        self._generator = None

    def rand(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Draw uniform numbers in ``[0, 1)`` with ``like``'s dtype, on ``like``'s device."""
        if self.seed is None:
            return torch.rand(shape, dtype=like.dtype, device=like.device)
        generator = self._generator_for(like)
        draws = torch.rand(shape, generator=generator, dtype=like.dtype, device=generator.device)
        return draws.to(like.device)

    def randn(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Draw standard normal numbers with ``like``'s dtype, on ``like``'s device."""
        if self.seed is None:
            return torch.randn(shape, dtype=like.dtype, device=like.device)
        generator = self._generator_for(like)
        draws = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
        return draws.to(like.device)

    def _generator_for(self, like: Tensor) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        return self._generator

    def permutations_of_others(self, m: int, like: Tensor) -> Tensor:
        """Row ``i`` of the ``[m, m - 1]`` result is a uniformly random order of ``{j ≠ i}``."""
        keys = self.rand((m, m), like)
        keys.fill_diagonal_(2.0)  # above every draw, so that i itself sorts last
        return keys.argsort(dim=1)[:, : m - 1]

    def state(self) -> dict[str, Any] | None:
        """The owned generator's device and state, or ``None`` before the first seeded draw."""
        if self._generator is None:
            return None
        return {"device": str(self._generator.device), "state": self._generator.get_state()}

    def load_state(self, state: dict[str, Any] | None, owner: str) -> None:
        """Restore what `state` returned."""
        if state is None:
            self._generator = None
            return
        if self.seed is None:
            raise ValueError(f"This state holds a generator state, but this {owner} has no seed.")
        generator = torch.Generator(device=state["device"])
        generator.set_state(state["state"])
        self._generator = generator


class Seeded:
    """Mixin of the randomised methods: a ``seed`` argument and the `RandomSource` it seeds in
    ``self._random`` (assigning ``seed`` restarts it), its generator state in ``state_dict()``,
    and `reset` restarting it."""

    seed = Argument(check_seed)
    """The seed of the owned generator, or ``None`` for torch's global generator."""
    _random: RandomSource

    def _argument_set(self, name: str) -> None:
        if name == "seed":
            self._random = RandomSource(self.seed)
        super()._argument_set(name)  # type: ignore[misc]

    def reset(self) -> None:
        """Restart the owned generator from ``seed``."""
        self._random.reset()

    def get_extra_state(self) -> Any:
        return self._random.state()

    def set_extra_state(self, state: Any) -> None:
        self._random.load_state(state, type(self).__name__)
