"""Contracts every registered aggregator and weighting must meet, on every library matrix.

The suite is parametrised over the registry: a newly registered method is tested here without
anyone writing a test for it. Each mathematical property is checked only for the methods whose
registry entry declares it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import Tensor

import jdoptim
from jdoptim import Aggregator, Weighting, build, get_spec, to_config
from tests.matrices import MATRICES, STRONGLY_STATIONARY, call, losses_for

AGGREGATORS = jdoptim.list_aggregators()
WEIGHTINGS = jdoptim.list_weightings()
DTYPES = [torch.float32, torch.float64]
# Tolerance of the mathematical properties, relative to the scale of the rows, loose enough for
# methods that solve to a tolerance of their own; the fuzz tests (tests/test_hypothesis.py) hold
# each method to its rounding level.
PROPERTY_RTOL = {torch.float32: 5e-3, torch.float64: 5e-3}


def _make(name: str, m: int) -> Aggregator | Weighting:
    return get_spec(name).example(m)


def _matrix(name: str, dtype: torch.dtype) -> Tensor:
    return MATRICES[name]().to(dtype)


def _run(aggregator: Aggregator | Weighting, matrix: Tensor, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)
    return call(aggregator, matrix)


def _with_property(flag: str) -> list[str]:
    return [name for name in AGGREGATORS if getattr(get_spec(name), flag)]


ROWS = {matrix_name: build_matrix().shape[0] for matrix_name, build_matrix in MATRICES.items()}


def _pairs(names: list[str], matrix_names=MATRICES) -> list[tuple[str, str]]:
    """(method, matrix) pairs where the matrix has enough rows for the method."""
    return [
        (name, matrix_name)
        for name in names
        for matrix_name in matrix_names
        if ROWS[matrix_name] >= get_spec(name).min_objectives
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "matrix_name"), _pairs(AGGREGATORS))
def test_output_shape_dtype_and_finiteness(name: str, matrix_name: str, dtype: torch.dtype):
    J = _matrix(matrix_name, dtype)
    update = call(_make(name, J.shape[0]), J)
    assert update.shape == (J.shape[1],)
    assert update.dtype == dtype
    assert update.device == J.device
    assert torch.isfinite(update).all(), update


@pytest.mark.parametrize(("name", "matrix_name"), _pairs(WEIGHTINGS))
def test_weighting_shape_and_finiteness(name: str, matrix_name: str):
    J = _matrix(matrix_name, torch.float64)
    weighting = _make(name, J.shape[0])
    weights = call(weighting, J if weighting.needs_jacobian else J @ J.T)
    assert weights.shape == (J.shape[0],)
    assert weights.dtype == torch.float64
    assert torch.isfinite(weights).all(), weights


@pytest.mark.parametrize("name", AGGREGATORS + WEIGHTINGS)
def test_config_round_trip(name: str):
    J = _matrix("normal_5x8", torch.float64)
    original = _make(name, J.shape[0])
    config = to_config(original)
    assert config["name"] == name
    rebuilt = build(json.loads(json.dumps(config)))
    assert type(rebuilt) is type(original)
    assert repr(rebuilt) == repr(original)
    assert to_config(rebuilt) == config
    matrix = J if isinstance(original, Aggregator) or original.needs_jacobian else J @ J.T
    torch.testing.assert_close(_run(rebuilt, matrix), _run(original, matrix), rtol=0, atol=0)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_state_dict_round_trip(name: str):
    J1 = _matrix("normal_5x8", torch.float64)
    J2 = _matrix("rank2_6x9", torch.float64)[:5]
    original = _make(name, 5)
    _run(original, J1, seed=1)
    state = copy.deepcopy(original.state_dict())
    restored = _make(name, 5)
    restored.load_state_dict(state)
    torch.testing.assert_close(_run(restored, J2, 2), _run(original, J2, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_reset_restores_the_initial_behaviour(name: str):
    J = _matrix("normal_5x8", torch.float64)
    aggregator = _make(name, 5)
    first = _run(aggregator, J)
    _run(aggregator, _matrix("spread_norms", torch.float64))
    aggregator.reset()
    torch.testing.assert_close(_run(aggregator, J), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_determinism(name: str):
    J = _matrix("normal_12x6", torch.float64)
    first = _run(_make(name, 12), J, seed=3)
    second = _run(_make(name, 12), J, seed=3)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("name", AGGREGATORS + WEIGHTINGS)
def test_inputs_that_require_grad_give_the_same_detached_result(name: str):
    # Aggregation is not differentiable (as in TorchJD): it runs under no_grad.
    J = _matrix("normal_5x8", torch.float64)
    method = _make(name, 5)
    matrix = J if isinstance(method, Aggregator) or method.needs_jacobian else J @ J.T
    expected = _run(_make(name, 5), matrix)
    leaf = matrix.clone().requires_grad_()
    for given in (leaf, leaf * 1.0):  # a leaf, and a tensor inside a graph
        result = _run(_make(name, 5), given)
        assert not result.requires_grad
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert leaf.grad is None


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", WEIGHTINGS)
def test_non_finite_matrices_give_nan_weights_and_change_no_state(name: str, value: float):
    J = _matrix("normal_5x8", torch.float64)
    weighting = _make(name, 5)
    matrix = J if weighting.needs_jacobian else J @ J.T
    _run(weighting, matrix)
    state = copy.deepcopy(weighting.state_dict())
    broken = matrix.clone()
    broken[1, 2] = value
    weights = _run(weighting, broken)
    if weighting.uses_matrix:
        assert torch.isnan(weights).all()
        after = weighting.state_dict()
        assert state.keys() == after.keys()
        for key, saved in state.items():
            assert repr(saved) == repr(after[key]), key


@pytest.mark.parametrize("name", AGGREGATORS)
def test_is_a_module_with_hooks_and_to(name: str):
    J = _matrix("normal_5x8", torch.float32)
    aggregator = _make(name, 5)
    assert isinstance(aggregator, torch.nn.Module)
    seen = []
    handle = aggregator.register_forward_hook(lambda module, args, out: seen.append(out))
    update = call(aggregator, J)
    handle.remove()
    assert len(seen) == 1 and seen[0] is update
    assert aggregator.to(torch.float64) is aggregator


@pytest.mark.parametrize(
    "name", [name for name in AGGREGATORS if get_spec(name).min_objectives > 1]
)
def test_too_few_objectives_raise_a_clear_error(name: str):
    spec = get_spec(name)
    J = _matrix("normal_5x8", torch.float64)[: spec.min_objectives - 1]
    with pytest.raises(ValueError, match=str(spec.min_objectives)):
        call(spec.example(spec.min_objectives), J)


@pytest.mark.parametrize("name", AGGREGATORS)
def test_bad_matrices_are_rejected(name: str):
    aggregator = _make(name, 3)
    with pytest.raises(ValueError, match="2-D"):
        aggregator(torch.ones(3))
    with pytest.raises(TypeError, match="floating"):
        aggregator(torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        aggregator([[1.0, 2.0]])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("name", "matrix_name"), _pairs(_with_property("non_conflicting")))
def test_non_conflicting(name: str, matrix_name: str, dtype: torch.dtype):
    J = _matrix(matrix_name, dtype)
    update = call(_make(name, J.shape[0]), J)
    products = J @ update
    bound = PROPERTY_RTOL[dtype] * J.norm(dim=1) * J.norm(dim=1).max()
    assert (products >= -bound).all(), (products, bound)


@pytest.mark.parametrize(
    ("name", "matrix_name"),
    _pairs(_with_property("linear_under_scaling"), sorted(set(MATRICES) - {"zero"})),
)
def test_linear_under_scaling(name: str, matrix_name: str):
    J = _matrix(matrix_name, torch.float64)
    m = J.shape[0]
    generator = torch.Generator().manual_seed(4)
    c1, c2 = torch.rand(2, m, generator=generator, dtype=torch.float64) + 0.1
    aggregator = _make(name, m)
    combined = call(aggregator, J * (c1 + c2)[:, None])
    separate = call(aggregator, J * c1[:, None]) + call(aggregator, J * c2[:, None])
    scale = J.norm(dim=1).max() * (c1 + c2).max()
    assert (combined - separate).norm() <= PROPERTY_RTOL[torch.float64] * scale


@pytest.mark.parametrize(("name", "matrix_name"), _pairs(_with_property("permutation_invariant")))
def test_permutation_invariant(name: str, matrix_name: str):
    J = _matrix(matrix_name, torch.float64)
    permutation = torch.randperm(J.shape[0], generator=torch.Generator().manual_seed(5))
    losses = losses_for(J.shape[0])
    # Fresh instances: a stateful method's second call would start from the first's state.
    permuted = call(_make(name, J.shape[0]), J[permutation], losses[permutation])
    original = call(_make(name, J.shape[0]), J, losses)
    # Absolute tolerance on the Jacobian's scale: with row norms spread over six orders of
    # magnitude, eigendecompositions (AlignedMTL) resolve the small directions only to about
    # ε times the largest, which the order of the rows can change.
    atol = 1e-9 * max(1.0, float(J.abs().max()))
    torch.testing.assert_close(permuted, original, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("name", _with_property("non_conflicting"))
def test_non_conflicting_methods_vanish_on_strongly_stationary_matrices(name: str):
    for matrix_name in STRONGLY_STATIONARY:
        J = _matrix(matrix_name, torch.float64)
        update = call(_make(name, J.shape[0]), J)
        assert update.norm() <= 1e-6 * (1 + J.norm()), (matrix_name, update)
