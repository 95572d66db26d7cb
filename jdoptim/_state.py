"""The state a step may change outside ``.grad``, kept so that a step that does not happen
changes none of it, and checked before a checkpoint replaces it.

- `MethodState`: the state of an aggregator or scalarizer and of every module inside it (its
  buffers, and the extra state of its ``state_dict()``: counters, moving averages, the state of
  the random generators it owns), restorable exactly. It needs nothing from the methods beyond
  what ``state_dict()`` already asks of them: state that round-trips through ``state_dict()``
  is restored.
- `GlobalGenerators`: torch's global random generators of some devices, which methods without a
  seed draw from.
- `check_method_state` and `check_optimizer_state`: everything that can be checked of a saved
  state before loading it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer


def _clone(value: Any) -> Any:
    """A copy of ``value`` whose tensors are new tensors (containers are copied too)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(item) for item in value)
    return copy.deepcopy(value)


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).get_extra_state is not nn.Module.get_extra_state


class MethodState:
    """The state of a method and of its submodules at one moment.

    Taking it copies the state (as large as the method's ``state_dict()``); `restore` puts it
    back, so that the method then behaves exactly as when it was taken.

    Args:
        method: The aggregator or scalarizer.
    """

    def __init__(self, method: nn.Module) -> None:
        self._saved = [
            (
                module,
                {name: (buffer, _clone(buffer)) for name, buffer in module._buffers.items()},
                _clone(module.get_extra_state()) if _has_extra_state(module) else None,
            )
            for module in method.modules()
        ]

    def restore(self) -> None:
        """Put the state back (the same buffer tensors, with their values). It can be restored
        once."""
        with torch.no_grad():
            for module, buffers, extra in self._saved:
                for name, (buffer, values) in buffers.items():
                    if buffer is not None:
                        buffer.copy_(values)
                    module._buffers[name] = buffer
                if _has_extra_state(module):
                    module.set_extra_state(extra)
        self._saved = []


class GlobalGenerators:
    """The states of torch's global random generators on ``devices`` (always including the CPU).

    Args:
        devices: The devices whose generators to keep.
    """

    def __init__(self, devices: Iterable[torch.device]) -> None:
        self._states: list[tuple[torch.device, Tensor]] = [
            (torch.device("cpu"), torch.random.get_rng_state())
        ]
        for device in dict.fromkeys(devices):
            backend = getattr(torch, device.type, None)
            if device.type != "cpu" and hasattr(backend, "get_rng_state"):
                self._states.append((device, backend.get_rng_state(device)))

    def restore(self) -> None:
        """Put the generators back where they were."""
        for device, state in self._states:
            if device.type == "cpu":
                torch.random.set_rng_state(state)
            else:
                getattr(torch, device.type).set_rng_state(state, device)


# --- checks of saved state ---------------------------------------------------------------------


def _tensors(value: Any, where: str) -> Iterable[tuple[str, Tensor]]:
    """Every tensor in a nested state, with where it is."""
    if isinstance(value, Tensor):
        yield where, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{where}[{i}]")


def _kind(tensor: Tensor) -> str:
    if tensor.is_floating_point():
        return "floating"
    if tensor.is_complex():
        return "complex"
    return "boolean" if tensor.dtype == torch.bool else "integer"


def _check_like(saved: Any, current: Any, where: str) -> None:
    """Raise unless ``saved`` has the structure of ``current`` where both hold something: the
    same keys in a mapping, a tensor of the same kind of dtype and number of dimensions where
    ``current`` holds a tensor (its size may differ: the number of objectives may). ``None``
    stands for state not created yet, on either side."""
    if saved is None or current is None:
        return
    if isinstance(current, Mapping):
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where} should be a mapping, got {type(saved).__name__}.")
        if set(saved) != set(current):
            raise ValueError(
                f"{where} has the keys {sorted(map(str, saved))}, expected "
                f"{sorted(map(str, current))}."
            )
        for key in current:
            _check_like(saved[key], current[key], f"{where}[{key!r}]")
    elif isinstance(current, Tensor):
        if not isinstance(saved, Tensor):
            raise ValueError(f"{where} should be a tensor, got {type(saved).__name__}.")
        if _kind(saved) != _kind(current) or saved.ndim != current.ndim:
            raise ValueError(
                f"{where} should be a {current.ndim}-D {_kind(current)} tensor, got a "
                f"{saved.ndim}-D tensor of {saved.dtype}."
            )


def check_method_state(method: nn.Module, state: Any, where: str) -> None:
    """Raise a `ValueError` naming what is wrong unless ``method`` can load ``state``.

    The state must have the keys of the method's own state dict, hold tensors of the same kinds
    and dimensions where the method has some, be finite, and load into a copy of the method.
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} should be a mapping, got {type(state).__name__}.")
    current = method.state_dict()
    for key in current.keys() & state.keys():  # torch's strict loading checks the key sets
        _check_like(state[key], current[key], f"{where}[{key!r}]")
    for place, tensor in _tensors(state, where):
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(
            torch.isfinite(tensor).all()
        ):
            raise ValueError(f"{place} is not finite: a method's saved state must be.")
    try:
        copy.deepcopy(method).load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{where} does not fit {method!r}: {error}") from error


_PARAMETER_SHAPED = tuple(
    getattr(torch.optim, name)
    for name in (
        "ASGD",
        "Adadelta",
        "Adagrad",
        "Adam",
        "AdamW",
        "Adamax",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "SGD",
        "SparseAdam",
    )
    if hasattr(torch.optim, name)
)
"""torch's optimizers whose per-parameter state tensors are scalars or shaped like the
parameter."""


def check_optimizer_state(optimizer: Optimizer, state: Mapping[str, Any]) -> None:
    """Raise a `ValueError` naming what is wrong unless ``optimizer`` can load ``state``.

    Checked: the ``"state"`` and ``"param_groups"`` entries, the number of parameter groups and
    of parameters in each, that every per-parameter state belongs to a saved parameter, and the
    shapes of the per-parameter state tensors: those of torch's built-in optimizers (other than
    LBFGS) hold one element or have their parameter's shape; those of other optimizers have the
    shape of the state the optimizer holds already, where it holds some.
    """
    for key in ("state", "param_groups"):
        if key not in state:
            raise ValueError(f"The optimizer state has no {key!r} entry: is it a state dict?")
    groups, saved_groups = optimizer.param_groups, state["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(group, Mapping) and isinstance(group.get("params"), (list, tuple))
        for group in saved_groups
    ):
        raise ValueError("The saved 'param_groups' should be a list of groups with 'params'.")
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"The saved state has {len(saved_groups)} parameter groups, this optimizer has "
            f"{len(groups)}."
        )
    params: dict[Any, Tensor] = {}
    for i, (group, saved) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"Parameter group {i} has {len(saved['params'])} parameters in the saved state "
                f"and {len(group['params'])} in this optimizer."
            )
        params.update(zip(saved["params"], group["params"], strict=True))
    if not isinstance(state["state"], Mapping):
        raise ValueError("The saved 'state' should map parameters to their state.")
    current_state = optimizer.state
    for key, saved_state in state["state"].items():
        if key not in params:
            raise ValueError(
                f"The saved state has state for parameter {key!r}, which no group has."
            )
        param = params[key]
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"The saved state of parameter {key!r} should be a mapping.")
        for name, value in saved_state.items():
            if not isinstance(value, Tensor):
                continue
            held = current_state.get(param, {}).get(name)
            if type(optimizer) in _PARAMETER_SHAPED:
                expected = None if value.numel() == 1 else tuple(param.shape)
            else:
                expected = tuple(held.shape) if isinstance(held, Tensor) else None
            if expected is not None and tuple(value.shape) != expected:
                raise ValueError(
                    f"The saved {name!r} of parameter {key!r} has shape {tuple(value.shape)}, "
                    f"expected {expected} (the parameter has shape {tuple(param.shape)})."
                )
