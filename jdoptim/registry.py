"""The registry of aggregators and weightings, and dictionary configuration.

Each registered class has a frozen `Spec` declaring its mathematical properties; the test
suite and the documentation table read them from here. A configuration is either a registry name
or ``{"name": <registry name>, **constructor arguments}``; it is JSON-serialisable and
``build(to_config(obj))`` behaves as ``obj``.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from torch import Tensor

from jdoptim.aggregation._bases import Configurable, Weighting

C = TypeVar("C", bound=type[Configurable])


@dataclass(frozen=True)
class Spec:
    """What the registry knows about one method.

    Attributes:
        name: Registry name (by default the lower-cased class name).
        cls: The registered class.
        paper: Address of the paper defining the method (arXiv where there is one).
        non_conflicting: The update never conflicts with any row: ``J A(J) ≥ 0``.
        linear_under_scaling: ``c ↦ A(diag(c) J)`` is linear on positive ``c``.
        permutation_invariant: Permuting the rows of ``J`` does not change the update.
        stateful: The method keeps state across calls (see ``reset()``).
        randomised: The method draws random numbers.
        example_args: For methods without usable defaults: a function of the number of
            objectives ``m`` returning constructor arguments, used by the test suite and the docs.
        min_objectives: The fewest objectives (rows) the method is defined for; fewer raise a
            ``ValueError`` (Krum, for example, needs at least three).
    """

    name: str
    cls: type[Configurable]
    paper: str | None = None
    non_conflicting: bool = False
    linear_under_scaling: bool = False
    permutation_invariant: bool = False
    stateful: bool = False
    randomised: bool = False
    example_args: Callable[[int], dict[str, Any]] | None = None
    min_objectives: int = 1

    def example(self, m: int) -> Configurable:
        """Build an instance suited to ``m`` objectives (defaults, or ``example_args(m)``)."""
        return self.cls(**({} if self.example_args is None else self.example_args(m)))

    @property
    def kind(self) -> str:
        """``"aggregator"``, ``"weighting"`` or ``"scalarizer"``."""
        return self.cls.registry_kind

    @property
    def gramian_based(self) -> bool:
        """Whether the method only needs the Gramian ``J Jᵀ`` (so it can run in gramian mode)."""
        from jdoptim.aggregation._bases import GramianWeightedAggregator

        if issubclass(self.cls, Weighting):
            # A wrapper (CRMOGMWeighting) takes its wrapped weighting's input: it can run from a
            # Gramian when that one can.
            needs_jacobian = inspect.getattr_static(self.cls, "needs_jacobian")
            return not needs_jacobian if isinstance(needs_jacobian, bool) else True
        return issubclass(self.cls, GramianWeightedAggregator)


_SPECS: dict[str, Spec] = {}


@overload
def register(cls: C, /) -> C: ...


@overload
def register(
    *,
    name: str | None = None,
    paper: str | None = None,
    non_conflicting: bool = False,
    linear_under_scaling: bool = False,
    permutation_invariant: bool = False,
    stateful: bool = False,
    randomised: bool = False,
    example_args: Callable[[int], dict[str, Any]] | None = None,
    min_objectives: int = 1,
) -> Callable[[C], C]: ...


def register(cls: C | None = None, /, *, name: str | None = None, **properties: Any) -> Any:
    """Register an aggregator or weighting class, so that `build` can create it by name.

    Use it as a decorator, bare or with the properties of `Spec`.

    Args:
        cls: The class to register (when used bare).
        name: Registry name; defaults to the lower-cased class name.
        **properties: The other fields of `Spec` (``paper``, ``non_conflicting``, ...).

    Returns:
        The class itself, or a decorator.

    Examples:
        >>> import jdoptim
        >>> from jdoptim.aggregation import Weighting
        >>> @jdoptim.register(name="firstonly", linear_under_scaling=True)
        ... class FirstOnly(Weighting):
        ...     def _weights(self, gramian):
        ...         weights = gramian.new_zeros(gramian.shape[0])
        ...         weights[0] = 1.0
        ...         return weights
        >>> jdoptim.build("firstonly")
        FirstOnly()
        >>> jdoptim.unregister("firstonly")
    """

    def decorate(klass: C) -> C:
        if not (isinstance(klass, type) and issubclass(klass, Configurable)) or not (
            klass.registry_kind
        ):
            raise TypeError(
                "Only Aggregator, Weighting and Scalarizer subclasses can be registered, got "
                f"{klass!r}."
            )
        key = (name or klass.__name__).lower()
        existing = _SPECS.get(key)
        if existing is not None and existing.cls is not klass:
            raise ValueError(
                f"The name {key!r} is already registered for {existing.cls.__qualname__}."
            )
        _SPECS[key] = Spec(name=key, cls=klass, **properties)
        return klass

    return decorate if cls is None else decorate(cls)


def unregister(name: str) -> None:
    """Remove a registry entry (for methods registered temporarily, e.g. in tests)."""
    get_spec(name)
    del _SPECS[name.lower()]


def _unknown(kind: str, value: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(value, valid, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(f"Unknown {kind} {value!r}.{hint} Valid choices: {', '.join(valid)}.")


def get_spec(name_or_obj: str | Configurable | type) -> Spec:
    """Return the `Spec` of a registry name, a registered class or an instance of one."""
    if isinstance(name_or_obj, str):
        spec = _SPECS.get(name_or_obj.lower())
        if spec is None:
            raise _unknown("registry name", name_or_obj, sorted(_SPECS))
        return spec
    cls = name_or_obj if isinstance(name_or_obj, type) else type(name_or_obj)
    for spec in _SPECS.values():
        if spec.cls is cls:
            return spec
    raise ValueError(
        f"{cls.__qualname__} is not registered; decorate it with @jdoptim.register to "
        "configure it by name."
    )


def _names(kind: str, pattern: str | None) -> list[str]:
    names = sorted(name for name, spec in _SPECS.items() if spec.kind == kind)
    if pattern is None:
        return names
    return [name for name in names if fnmatch.fnmatchcase(name, pattern.lower())]


def list_aggregators(pattern: str | None = None) -> list[str]:
    """Return the sorted registry names of the aggregators, optionally filtered.

    Args:
        pattern: A shell-style wildcard such as ``"*grad"`` (case-insensitive).

    Examples:
        >>> import jdoptim
        >>> jdoptim.list_aggregators("up*")
        ['upgrad']
    """
    return _names("aggregator", pattern)


def list_weightings(pattern: str | None = None) -> list[str]:
    """Return the sorted registry names of the weightings, optionally filtered by a wildcard."""
    return _names("weighting", pattern)


def list_scalarizers(pattern: str | None = None) -> list[str]:
    """Return the sorted registry names of the loss scalarizers, optionally filtered."""
    return _names("scalarizer", pattern)


def build(config: str | Mapping[str, Any]) -> Configurable:
    """Create an aggregator or weighting from its configuration.

    Args:
        config: A registry name, or a mapping with a ``"name"`` key and constructor arguments.
            A nested mapping with a ``"name"`` key is built recursively.

    Returns:
        The new aggregator or weighting.

    Raises:
        ValueError: On an unknown name or argument; the message lists the valid ones.
        TypeError: If ``config`` is neither a string nor a mapping.

    Examples:
        >>> import jdoptim
        >>> jdoptim.build({"name": "upgrad", "norm_eps": 1e-3})
        UPGrad(pref_vector=None, norm_eps=0.001, reg_eps=0.0, solver='active_set')
        >>> jdoptim.build("mean")
        Mean()
    """
    if isinstance(config, str):
        config = {"name": config}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"A config must be a registry name or a mapping, got {type(config).__name__}."
        )
    if "name" not in config:
        raise ValueError(f"A config mapping needs a 'name' key, got keys {sorted(config)}.")
    arguments = dict(config)
    name = arguments.pop("name")
    if not isinstance(name, str):
        raise TypeError(f"A config's 'name' must be a string, got {name!r}.")
    spec = get_spec(name)
    parameters = [p for p in inspect.signature(spec.cls.__init__).parameters if p != "self"]
    for key in arguments:
        if key not in parameters:
            raise _unknown(f"argument of {spec.name!r}", key, parameters)
    missing = [
        p.name
        for p in inspect.signature(spec.cls.__init__).parameters.values()
        if p.name in parameters
        and p.default is p.empty
        and p.name not in arguments
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if missing:
        raise ValueError(
            f"{spec.name!r} needs the argument{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}, which {'have' if len(missing) > 1 else 'has'} no default; "
            f"for example {_example_config(spec)}."
        )
    for key, value in arguments.items():
        if isinstance(value, Mapping) and "name" in value:
            arguments[key] = build(value)
    return spec.cls(**arguments)


def _example_config(spec: Spec) -> dict[str, Any]:
    """A configuration of ``spec``'s method with its required arguments, from its
    ``example_args`` (nested methods written by name only)."""
    example: dict[str, Any] = {"name": spec.name}
    if spec.example_args is None:
        return example
    parameters = inspect.signature(spec.cls.__init__).parameters
    for key, value in spec.example_args(5).items():
        if parameters[key].default is not parameters[key].empty:
            continue
        if isinstance(value, Configurable):
            example[key] = {"name": get_spec(value).name}
        else:
            example[key] = _to_json(value, key)
    return example


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, Configurable):
        return to_config(value)
    if isinstance(value, Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(item, where) for item in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v, where) for k, v in value.items()}
    raise TypeError(f"Cannot write {where}={value!r} of type {type(value).__name__} to a config.")


def to_config(obj: Configurable) -> dict[str, Any]:
    """Return the JSON-serialisable configuration of a registered aggregator or weighting.

    Every constructor argument is written, defaults included; tensors become lists.

    Examples:
        >>> import jdoptim
        >>> jdoptim.to_config(jdoptim.MGDA())
        {'name': 'mgda', 'solver': 'active_set', 'epsilon': 0.001, 'max_iters': 100}
    """
    spec = get_spec(obj)
    config: dict[str, Any] = {"name": spec.name}
    for key, value in obj.constructor_args().items():
        config[key] = _to_json(value, key)
    return config
