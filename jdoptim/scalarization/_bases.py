"""The base class of the loss scalarizers, and the checks they share.

A scalarizer maps the vector of losses ``[m]`` to one scalar loss; one ordinary backward pass of
that scalar then gives every parameter its gradient. Its constructor arguments are stored under
their own names, so ``repr`` and `jdoptim.to_config` work as for the aggregators.

Some scalarizers learn their number of objectives ``m`` at their first call. Their per-objective
state is then a buffer that is ``None`` until that call (listed in ``_lazy_buffers``), or a
``torch.nn.parameter.UninitializedParameter``; `Scalarizer` saves and loads such state so that
``load_state_dict`` into a fresh instance works.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter, is_lazy

from jdoptim.aggregation._bases import (
    Argument,
    Configurable,
    as_weight_tensor,
    check_positive_int,
    optional,
    solve_dtype,
)


def check_losses(losses: Tensor, owner: str) -> None:
    """Raise unless ``losses`` is a non-empty 1-D floating-point tensor."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"{owner} expects the losses as a torch.Tensor, got {type(losses).__name__}."
        )
    if losses.ndim != 1:
        raise ValueError(
            f"{owner} expects a 1-D tensor of losses, got shape {tuple(losses.shape)}; "
            "flatten it first with losses.reshape(-1)."
        )
    if not losses.is_floating_point():
        raise TypeError(f"{owner} expects losses with a floating dtype, got {losses.dtype}.")
    if losses.shape[0] == 0:
        raise ValueError(f"{owner} needs at least one loss, got an empty tensor.")


def check_count(expected: int, losses: Tensor, owner: str, what: str) -> None:
    """Raise unless there are ``expected`` losses (one per entry of ``what``)."""
    if losses.shape[0] != expected:
        raise ValueError(f"{owner} has {expected} {what} but got {losses.shape[0]} losses.")


def as_preference_tensor(values: Tensor | Sequence[float], name: str) -> Tensor:
    """Check a preference vector: finite, non-negative, not all zero."""
    tensor = as_weight_tensor(values, name)
    if (tensor < 0).any() or not (tensor > 0).any():
        raise ValueError(
            f"Invalid {name} value: {tensor.tolist()}; expected non-negative numbers, at least "
            "one positive."
        )
    return tensor


optional_m = optional(check_positive_int)
"""The check of a number of objectives that may be left to the first call."""


def stable_norm(x: Tensor) -> Tensor:
    """The Euclidean norm of ``x``, differentiable, without overflow or underflow of the squares
    (``torch.linalg.vector_norm`` of float32 entries above about 1e19 is ``inf``)."""
    scale = x.detach().abs().max()
    scale = torch.where(scale > 0, scale, 1.0)
    return scale * torch.linalg.vector_norm(x / scale)


def state_dtype(losses: Tensor) -> torch.dtype:
    """The dtype of state created from ``losses``: theirs, but at least the default dtype."""
    return torch.promote_types(losses.dtype, torch.get_default_dtype())


class Scalarizer(Configurable):
    """Maps a vector of losses ``[m]`` to one scalar loss, to be minimised by one ordinary
    backward pass.

    Subclasses implement ``_scalarize``; `forward` validates the losses first, and hands over
    half-precision losses (bfloat16, float16) in float32. The scalar has the losses' dtype and
    device and is differentiable with respect to them (and to the scalarizer's own parameters,
    where it has some).
    """

    registry_kind: ClassVar[str] = "scalarizer"
    _lazy_buffers: ClassVar[tuple[str, ...]] = ()
    """Buffers that are ``None`` until the first call (or after `reset`) fixes their shape."""

    def forward(self, losses: Tensor) -> Tensor:
        """Scalarise the losses.

        Args:
            losses: The losses, shape ``[m]``, floating point.

        Returns:
            The scalar loss, shape ``[]``, with the losses' dtype and device.
        """
        check_losses(losses, type(self).__name__)
        # Half precision is computed in float32, so that no intermediate term overflows.
        return self._scalarize(losses.to(solve_dtype(losses.dtype))).to(losses.dtype)

    @abstractmethod
    def _scalarize(self, losses: Tensor) -> Tensor: ...

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # A parameter whose size is only known at the first call has nothing to save yet.
        lazy = {name: p for name, p in self._parameters.items() if p is not None and is_lazy(p)}
        for name in lazy:
            self._parameters[name] = None
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._parameters.update(lazy)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Give state whose size is learnt at the first call the size of the saved state, and
        # forget such state that the saved instance had not created yet.
        for name, param in self._parameters.items():
            if param is not None and is_lazy(param) and prefix + name in state_dict:
                param.materialize(state_dict[prefix + name].shape)
        devices = [buffer.device for buffer in self.buffers(recurse=False)]
        for name in self._lazy_buffers:
            saved = state_dict.get(prefix + name)
            current = self._buffers[name]
            if saved is not None and current is None:
                device = devices[0] if devices else saved.device
                self._buffers[name] = torch.empty_like(saved, device=device)
            elif saved is None and current is not None:
                self._buffers[name] = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class LearnedPerObjective(Scalarizer):
    """A scalarizer with one trainable parameter per objective, zero at the start.

    With ``m=None`` the parameter is an ``UninitializedParameter`` that takes its size, and the
    losses' device, at the first call; it can be handed to an optimizer before that call.
    """

    _parameter_name = ""
    m = Argument(optional_m, fixed=True)

    def __init__(self, m: int | None = None) -> None:
        super().__init__()
        self.m = m
        parameter = UninitializedParameter() if m is None else nn.Parameter(torch.zeros(m))
        self.register_parameter(self._parameter_name, parameter)

    def _parameter(self, losses: Tensor) -> Tensor:
        parameter = getattr(self, self._parameter_name)
        if is_lazy(parameter):
            with torch.no_grad():
                parameter.materialize(losses.shape, device=losses.device)
                parameter.zero_()
        check_count(parameter.shape[0], losses, type(self).__name__, "objectives")
        return parameter.to(losses.dtype)

    def reset(self) -> None:
        """Set the learnt parameters back to zero (their number ``m`` is kept)."""
        parameter = getattr(self, self._parameter_name)
        if not is_lazy(parameter):
            with torch.no_grad():
                parameter.zero_()
