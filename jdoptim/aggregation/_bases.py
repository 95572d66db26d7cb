"""Base classes: aggregators map a Jacobian to an update, weightings map it to weights.

Every concrete class stores each constructor argument under the same public name (a tensor as a
non-persistent buffer, so that ``.to()`` moves it). ``repr`` and `jdoptim.to_config` read
the arguments back from the constructor's signature, here, once.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


def _format_arg(value: Any) -> str:
    if isinstance(value, Tensor):
        return repr(value.tolist())
    return repr(value)


class Configurable(nn.Module, ABC):
    """An ``nn.Module`` whose ``repr`` and configuration come from its constructor signature."""

    registry_kind: ClassVar[str] = ""
    """The registry listing that subclasses belong to (``"aggregator"``, ``"weighting"``...)."""

    def constructor_args(self) -> dict[str, Any]:
        """Return the constructor arguments this object was built with, by parameter name."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {
            name: self._constructor_arg(name)
            for name, parameter in parameters.items()
            if name != "self"
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        }

    def _constructor_arg(self, name: str) -> Any:
        return getattr(self, name)

    def reset(self) -> None:
        """Forget any state accumulated over calls. Stateless methods do nothing."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_format_arg(v)}" for k, v in self.constructor_args().items())
        return f"{type(self).__name__}({args})"


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


class Weighting(Configurable):
    """Maps a Gramian ``G = J Jᵀ`` of shape ``[m, m]`` (or, if `needs_jacobian`, the
    Jacobian ``J`` of shape ``[m, n]``) to a weight vector of shape ``[m]``."""

    registry_kind: ClassVar[str] = "weighting"
    needs_jacobian: ClassVar[bool] = False
    """``True`` when the weighting needs ``J`` itself, so it cannot run from a Gramian."""
    uses_matrix: ClassVar[bool] = True
    """``False`` when the weights depend only on the number of objectives ``m``, so callers may
    pass any ``[m, m]`` tensor (such as a zero-stride view) instead of computing the Gramian."""

    def forward(self, matrix: Tensor) -> Tensor:
        """Compute the weights.

        Args:
            matrix: The Gramian ``[m, m]``, or the Jacobian ``[m, n]`` if
                `needs_jacobian`.

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
        return self._weights(matrix)

    @abstractmethod
    def _weights(self, matrix: Tensor) -> Tensor: ...


class Aggregator(Configurable):
    """Maps a Jacobian ``J`` of shape ``[m, n]`` (one row per objective) to an update ``[n]``."""

    registry_kind: ClassVar[str] = "aggregator"

    def forward(self, matrix: Tensor) -> Tensor:
        """Aggregate the rows of ``matrix``.

        Args:
            matrix: The Jacobian, shape ``[m, n]``.

        Returns:
            The update, shape ``[n]``, with ``matrix``'s dtype and device.
        """
        check_matrix(matrix, "Jacobian")
        if matrix.shape[0] == 0:
            raise ValueError(f"{type(self).__name__} needs at least one row, got shape (0, n).")
        return self._aggregate(matrix)

    @abstractmethod
    def _aggregate(self, matrix: Tensor) -> Tensor: ...


class WeightedAggregator(Aggregator):
    """Aggregates as ``Jᵀ w`` with weights ``w = weighting(J)``.

    Args:
        weighting: A weighting with ``needs_jacobian = True`` (or any weighting, for
            `GramianWeightedAggregator`).

    Examples:
        >>> import torch
        >>> from jdoptim.aggregation import ConstantWeighting, GramianWeightedAggregator
        >>> aggregator = GramianWeightedAggregator(ConstantWeighting([0.25, 0.75]))
        >>> aggregator(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))
        tensor([1., 3.])
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting):
            raise TypeError(
                f"Expected a jdoptim Weighting, got {weighting!r} of type "
                f"{type(weighting).__name__}."
            )
        self.weighting = weighting

    def __getattr__(self, name: str) -> Any:
        # A method that builds its own weighting stores its arguments there: expose them here,
        # so that `UPGrad(reg_eps=0.1).reg_eps` reads as it was written.
        try:
            return super().__getattr__(name)
        except AttributeError:
            weighting = self.__dict__["_modules"].get("weighting")
            parameters = inspect.signature(type(self).__init__).parameters
            if weighting is None or name not in parameters or name == "weighting":
                raise
            return getattr(weighting, name)

    def reset(self) -> None:
        self.weighting.reset()

    def _weighting_input(self, matrix: Tensor) -> Tensor:
        return matrix

    def _aggregate(self, matrix: Tensor) -> Tensor:
        weights = self.weighting(self._weighting_input(matrix))
        return weights @ matrix


class GramianWeightedAggregator(WeightedAggregator):
    """Aggregates as ``Jᵀ w`` with weights ``w = weighting(J Jᵀ)``.

    Only the Gramian reaches the weighting, so such an aggregator can also run from a Gramian
    computed without the Jacobian.
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__(weighting)
        if weighting.needs_jacobian:
            raise ValueError(
                f"{type(weighting).__name__} needs the Jacobian, so it cannot be used in a "
                "GramianWeightedAggregator; use WeightedAggregator instead."
            )

    def _weighting_input(self, matrix: Tensor) -> Tensor:
        if not self.weighting.uses_matrix:
            m = matrix.shape[0]
            return matrix.new_zeros(()).expand(m, m)
        return matrix @ matrix.T


def as_weight_tensor(values: Tensor | list[float] | tuple[float, ...], name: str) -> Tensor:
    """Validate and convert a 1-D sequence of finite weights to a float tensor."""
    tensor = torch.as_tensor(values)
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(
            f"Expected {name} to be a non-empty 1-D sequence, got shape {tuple(tensor.shape)}."
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"Expected {name} to be finite, got {tensor.tolist()}.")
    return tensor.detach().clone()


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


def check_non_negative(value: float, name: str) -> float:
    """Raise unless ``value`` is a finite real number ≥ 0; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a number >= 0.")
    if value == float("inf"):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number.")
    return float(value)


def check_positive(value: float, name: str) -> float:
    """Raise unless ``value`` is a finite real number > 0; return it as a float."""
    value = check_non_negative(value, name)
    if value == 0:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a number > 0.")
    return value


def check_positive_int(value: int, name: str) -> int:
    """Raise unless ``value`` is an integer ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} value: {value!r}; expected an integer >= 1.")
    return value


def check_seed(seed: int | None) -> int | None:
    """Raise unless ``seed`` is ``None`` or an integer that ``torch.Generator.manual_seed``
    accepts (from ``-2**63`` to ``2**64 - 1``)."""
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64
    ):
        raise ValueError(
            f"Invalid seed value: {seed!r}; expected an integer from -2**63 to 2**64 - 1, or None."
        )
    return seed


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
    """Mixin of the randomised methods: a ``seed`` argument, an owned `RandomSource` in
    ``self._random`` (set it in ``__init__``), its generator state in ``state_dict()``, and
    `reset` restarting it."""

    _random: RandomSource

    @property
    def seed(self) -> int | None:
        """The seed of the owned generator, or ``None`` for torch's global generator."""
        return self._random.seed

    def reset(self) -> None:
        """Restart the owned generator from ``seed``."""
        self._random.reset()

    def get_extra_state(self) -> Any:
        return self._random.state()

    def set_extra_state(self, state: Any) -> None:
        self._random.load_state(state, type(self).__name__)
