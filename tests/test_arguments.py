"""Constructor arguments, over the whole registry: an object computes with what it reports.

For every registered aggregator, weighting and scalarizer and every constructor argument:
assigning a valid new value changes ``repr``, `jdoptim.to_config` and the computation together
(a rebuild from the reported arguments computes the same); assigning an invalid value raises an
error that names the argument and the value, and leaves the object as it was. A weighted
aggregator has no copy of its weighting's arguments: it reads and writes them there.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
from typing import Any

import pytest
import torch
from torch import Tensor

import jdoptim
from jdoptim import build, get_spec, to_config
from jdoptim.aggregation import (
    Aggregator,
    CAGrad,
    GramianWeightedAggregator,
    MeanWeighting,
    MGDAWeighting,
    UPGradWeighting,
    WeightedAggregator,
    Weighting,
)
from jdoptim.aggregation._bases import Configurable, constructor_parameters
from jdoptim.aggregation._excessmtl import ExcessMTLWeighting
from jdoptim.registry import _to_json

M = 5
NAMES = jdoptim.list_aggregators() + jdoptim.list_weightings() + jdoptim.list_scalarizers()

NEW_VALUES: dict[str, list[Any]] = {
    "alpha": [0.25],
    "beta": [0.25],
    "c": [2.0],
    "eps": [1e-3],
    "epsilon": [0.1],
    "f": [torch.sqrt],
    "gamma": [0.5],
    "initial_weights": [[0.1, 0.2, 0.3, 0.2, 0.2]],
    "lambda_": [0.5],
    "leak": [[0.5, 0.0, 1.0, 0.25, 0.5]],
    "lr": [0.5],
    "max_iters": [50],
    "max_norm": [0.5],
    "min_losses": [[0.1, 0.2, 0.0, 0.3, 0.1]],
    "momentum": [0.25],
    "mu": [0.5],
    "n_byzantine": [0],
    "n_iter": [5],
    "n_selected": [2],
    "n_warmup_steps": [0],
    "norm_eps": [1e-3],
    "optim_niter": [5],
    "pref_vector": [[1.0, 2.0, 3.0, 1.0, 0.5]],
    "reference": [[0.1, 0.0, -0.2, 0.3, 0.1]],
    "reg_eps": [0.1],
    "rho": [0.5],
    "robust_step_size": [0.5],
    "scale_mode": ["median"],
    "seed": [7],
    "solver": ["quadprog", "frank_wolfe"],
    "tau": [0.5],
    "temperature": [1.0],
    "theta": [1.0],
    "trim_number": [2],
    "update_weights_every": [2],
    "weight_decay": [0.01],
    "weighting": [MGDAWeighting()],
    "weights": [[0.5, 1.0, 1.0, 1.0, 2.0]],
}
"""Candidates for a valid new value of each argument; the first one the argument accepts is
used (an argument none of them suits fails the test: add one)."""

INVALID_VALUES: list[Any] = ["abc", -1.0, float("nan"), True, [None], {"name": "mean"}]
"""Values that no argument accepts."""

EMPTY = inspect.Parameter.empty

FIXED: set[tuple[str, str]] = {
    ("crmogm", "weighting"),  # the CRMOGMWeighting it builds; its argument is weighting.weighting
    ("scalarization.famo", "m"),  # the size of its state
    ("scalarization.imtll", "m"),
    ("scalarization.uw", "m"),
}
"""Arguments fixed at construction: assigning them raises."""


def _cases() -> list[tuple[str, str]]:
    return [(name, arg) for name in NAMES for arg in constructor_parameters(get_spec(name).cls)]


def _make(name: str) -> Configurable:
    return get_spec(name).example(M)


def _compute(obj: Configurable, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    J = torch.randn(M, 8, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed)
    if isinstance(obj, Aggregator):
        return obj(J)
    if isinstance(obj, Weighting):
        return obj(J if obj.needs_jacobian else J @ J.T)
    losses = torch.rand(M, generator=generator, dtype=torch.float64) + 0.5
    return obj(losses)


def _same(value: Any, expected: Any) -> bool:
    if isinstance(value, Tensor) or isinstance(expected, Tensor):
        as_float64 = {"dtype": torch.float64}
        return torch.equal(
            torch.as_tensor(value, **as_float64), torch.as_tensor(expected, **as_float64)
        )
    if isinstance(value, Configurable):
        return repr(value) == repr(expected)
    return value is expected or value == expected


def _serialisable(obj: Configurable) -> bool:
    try:
        to_config(obj)
    except TypeError:
        return False
    return True


def _state(obj: Configurable) -> str:
    return repr(obj)  # every constructor argument, nested ones included


@pytest.mark.parametrize(("name", "argument"), _cases())
def test_assignment_is_what_the_object_computes_with(name: str, argument: str):
    obj = _make(name)
    if (name, argument) in FIXED:
        before = _state(obj)
        with pytest.raises(AttributeError, match=f"{type(obj).__name__}.{argument}"):
            setattr(obj, argument, NEW_VALUES.get(argument, [None])[0])
        assert _state(obj) == before
        return
    for candidate in NEW_VALUES[argument]:
        try:
            setattr(obj, argument, copy.deepcopy(candidate))
        except (ValueError, TypeError):
            continue
        break
    else:
        pytest.fail(f"No candidate in NEW_VALUES[{argument!r}] suits {name}")
    value = getattr(obj, argument)
    assert _same(value, candidate)
    assert _same(obj.constructor_args()[argument], candidate)
    if isinstance(obj, WeightedAggregator) and argument != "weighting":
        # No shadow copy: the aggregator's argument is its weighting's.
        assert argument not in obj.__dict__
        assert getattr(obj.weighting, argument) is value
    after = _compute(obj)
    rebuilt = type(obj)(**copy.deepcopy(obj.constructor_args()))
    assert repr(rebuilt) == repr(obj)
    torch.testing.assert_close(_compute(rebuilt), after, rtol=0, atol=0)
    if _serialisable(obj):
        config = to_config(obj)
        assert config[argument] == _to_json(candidate, argument)
        from_config = build(json.loads(json.dumps(config)))
        assert repr(from_config) == repr(obj)
        torch.testing.assert_close(_compute(from_config), after, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "argument"), _cases())
def test_invalid_assignment_names_the_argument_and_value_and_changes_nothing(
    name: str, argument: str
):
    obj = _make(name)
    expected = _compute(_make(name))
    before = _state(obj)
    for value in INVALID_VALUES:
        with pytest.raises((ValueError, TypeError, AttributeError)) as error:
            setattr(obj, argument, value)
        message = str(error.value)
        assert argument in message, message
        if error.type is not AttributeError:
            assert repr(value) in message or str(value) in message, message
        assert _state(obj) == before
    torch.testing.assert_close(_compute(obj), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "argument"), _cases())
def test_invalid_construction_names_the_argument_and_value(name: str, argument: str):
    spec = get_spec(name)
    arguments = {} if spec.example_args is None else spec.example_args(M)
    for value in INVALID_VALUES:
        with pytest.raises((ValueError, TypeError)) as error:
            spec.cls(**{**arguments, argument: value})
        message = str(error.value)
        assert argument in message and (repr(value) in message or str(value) in message), message


@pytest.mark.parametrize("name", NAMES)
def test_required_arguments_are_named_with_an_example(name: str):
    spec = get_spec(name)
    signature = inspect.signature(spec.cls.__init__).parameters
    required = [p for p in constructor_parameters(spec.cls) if signature[p].default is EMPTY]
    if not required:
        assert repr(build(name)) == repr(spec.cls())
        return
    with pytest.raises(ValueError) as error:
        build(name)
    message = str(error.value)
    assert all(argument in message for argument in required), message
    example = eval(re.search(r"for example (\{.*\})\.$", message).group(1))
    assert type(build(example)) is spec.cls


def test_weighted_aggregators_read_and_write_their_weightings_arguments():
    aggregator = CAGrad(c=0.5)
    aggregator.c = 2.0
    assert aggregator.weighting.c == 2.0 and "c" not in aggregator.__dict__
    aggregator.weighting.c = 1.0
    assert aggregator.c == 1.0
    assert repr(aggregator) == "CAGrad(c=1.0, norm_eps=0.0, max_iters=100)"
    J = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(aggregator(J), CAGrad(c=1.0)(J), rtol=0, atol=0)


def test_the_weighting_of_a_method_cannot_be_replaced():
    aggregator = CAGrad(c=0.5)
    with pytest.raises(AttributeError, match=r"CAGrad\.weighting is the CAGradWeighting"):
        aggregator.weighting = MGDAWeighting()
    assert type(aggregator.weighting).__name__ == "CAGradWeighting"


def test_a_generic_aggregator_checks_a_new_weighting():
    aggregator = GramianWeightedAggregator(MeanWeighting())
    aggregator.weighting = UPGradWeighting()
    J = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(aggregator(J), jdoptim.UPGrad()(J))
    with pytest.raises(ValueError, match="ExcessMTLWeighting needs the Jacobian"):
        aggregator.weighting = ExcessMTLWeighting()
    with pytest.raises(TypeError, match="Invalid weighting value: 'abc'"):
        aggregator.weighting = "abc"
    assert isinstance(aggregator.weighting, UPGradWeighting)


def test_a_gramian_weighting_given_the_jacobian_is_refused():
    # It would read J = [[1, 0, 0], [-1, 1, 0], [0, 0, 2]] as a Gramian and return
    # [0.333, 0.333, 0.667] instead of UPGrad's [0.167, 0.5, 0.667].
    with pytest.raises(TypeError, match=r"GramianWeightedAggregator\(UPGradWeighting"):
        WeightedAggregator(UPGradWeighting())
    aggregator = WeightedAggregator(MeanWeighting())  # its weights depend on m only
    J = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    torch.testing.assert_close(aggregator(J), J.mean(dim=0))


def test_a_wrapped_weighting_that_changes_kind_is_refused_at_the_call():
    aggregator = jdoptim.CRMOGM(UPGradWeighting())
    aggregator.weighting.weighting = ExcessMTLWeighting()
    with pytest.raises(ValueError, match="needs the Jacobian"):
        aggregator(torch.ones(2, 3))
