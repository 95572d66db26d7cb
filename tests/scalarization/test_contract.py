"""Contracts every registered loss scalarizer must meet.

Parametrised over ``jdoptim.registry.list_scalarizers()``: a newly registered scalarizer is
tested here without anyone writing a test for it. Stateful scalarizers are driven through
their protocol (`_advance`): trainable parameters take an SGD step, ``update`` receives smaller
losses, ``step`` closes an epoch.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import Tensor

import jdoptim
import jdoptim.scalarization
from jdoptim import build, get_spec, to_config
from jdoptim.registry import list_scalarizers
from jdoptim.scalarization import Scalarizer

NAMES = list_scalarizers()
DTYPES = [torch.float32, torch.float64]
M = 4


def _make(name: str, m: int = M) -> Scalarizer:
    return get_spec(name).example(m)


def _losses(seed: int, m: int = M, dtype: torch.dtype = torch.float64) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(m, generator=generator, dtype=dtype) + 0.5


def _run(scalarizer: Scalarizer, losses: Tensor, seed: int = 0) -> Tensor:
    torch.manual_seed(seed)
    return scalarizer(losses)


def _advance(scalarizer: Scalarizer, losses: Tensor, seed: int = 0) -> Tensor:
    """One training step of the scalarizer's protocol on ``losses``; returns the scalar."""
    scalar = _run(scalarizer, losses, seed)
    parameters = list(scalarizer.parameters())
    if parameters:
        gradients = torch.autograd.grad(scalar, parameters)
        with torch.no_grad():
            for parameter, gradient in zip(parameters, gradients, strict=True):
                parameter.sub_(0.1 * gradient)
    if hasattr(scalarizer, "update"):
        scalarizer.update(losses * torch.linspace(0.6, 0.9, losses.shape[0], dtype=losses.dtype))
    if hasattr(scalarizer, "step"):
        scalarizer.step()
    return scalar.detach()


def _with_property(flag: str) -> list[str]:
    return [name for name in NAMES if getattr(get_spec(name), flag)]


def test_every_scalarizer_is_registered_under_the_scalarization_prefix():
    exported = {
        getattr(jdoptim.scalarization, name)
        for name in jdoptim.scalarization.__all__
        if name != "Scalarizer"
    }
    assert {get_spec(name).cls for name in NAMES} == exported
    for name in NAMES:
        spec = get_spec(name)
        assert name == "scalarization." + spec.cls.__name__.lower()
        assert spec.kind == "scalarizer"
        assert name not in jdoptim.list_aggregators() + jdoptim.list_weightings()
    assert len(NAMES) == 12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_output_is_a_finite_scalar_with_the_losses_dtype(name: str, dtype: torch.dtype):
    for m in (1, 2, M):
        losses = _losses(1, m, dtype)
        scalar = _make(name, m)(losses)
        assert scalar.shape == ()
        assert scalar.dtype == dtype
        assert scalar.device == losses.device
        assert torch.isfinite(scalar), scalar


@pytest.mark.parametrize("name", NAMES)
def test_gradient_flows_to_the_losses(name: str):
    losses = _losses(2).requires_grad_()
    _make(name)(losses).backward()
    assert losses.grad is not None and losses.grad.shape == (M,)
    assert torch.isfinite(losses.grad).all()
    assert (losses.grad != 0).any()


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name: str):
    original = _make(name)
    config = to_config(original)
    assert config["name"] == name
    rebuilt = build(json.loads(json.dumps(config)))
    assert type(rebuilt) is type(original)
    assert repr(rebuilt) == repr(original)
    assert to_config(rebuilt) == config
    losses = _losses(3)
    torch.testing.assert_close(_run(rebuilt, losses), _run(original, losses), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_into_a_fresh_instance(name: str):
    original = _make(name)
    _advance(original, _losses(4), seed=1)
    _advance(original, _losses(5), seed=2)
    _run(original, _losses(6), seed=3)  # leaves pending state (current epoch, FAMO's losses)
    state = copy.deepcopy(original.state_dict())
    assert all(value is None or isinstance(value, Tensor) for value in state.values()), state
    restored = _make(name)
    restored.load_state_dict(state)
    for seed in (7, 8, 9):
        expected = _advance(original, _losses(seed), seed=seed)
        torch.testing.assert_close(
            _advance(restored, _losses(seed), seed), expected, rtol=0, atol=0
        )


@pytest.mark.parametrize("name", NAMES)
def test_reset_restores_the_initial_behaviour(name: str):
    losses = _losses(10)
    scalarizer = _make(name)
    first = _run(scalarizer, losses)
    for seed in (11, 12, 13):
        _advance(scalarizer, _losses(seed), seed)
    scalarizer.reset()
    torch.testing.assert_close(_run(scalarizer, losses), first, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_determinism_under_a_seed(name: str):
    runs = []
    for _ in range(2):
        scalarizer = _make(name)
        runs.append([_advance(scalarizer, _losses(seed), seed=3) for seed in (14, 15, 16)])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_is_a_module_with_hooks_and_to(name: str):
    scalarizer = _make(name)
    assert isinstance(scalarizer, torch.nn.Module)
    seen = []
    handle = scalarizer.register_forward_hook(lambda module, args, out: seen.append(out))
    scalar = scalarizer(_losses(17, dtype=torch.float32))
    handle.remove()
    assert len(seen) == 1 and seen[0] is scalar
    assert scalarizer.to(torch.float64) is scalarizer
    assert scalarizer(_losses(18)).dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_bad_losses_are_rejected(name: str):
    scalarizer = _make(name, 3)
    with pytest.raises(ValueError, match="1-D"):
        scalarizer(torch.ones(3, 1))
    with pytest.raises(ValueError, match="1-D"):
        scalarizer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating"):
        scalarizer(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        scalarizer([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least one loss"):
        scalarizer(torch.ones(0))


@pytest.mark.parametrize("name", _with_property("permutation_invariant"))
def test_permutation_invariant(name: str):
    losses = _losses(19)
    permutation = torch.randperm(M, generator=torch.Generator().manual_seed(5))
    scalarizer = _make(name)
    torch.testing.assert_close(
        scalarizer(losses[permutation]), scalarizer(losses), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", _with_property("linear_under_scaling"))
def test_linear_scalarizers_weigh_the_losses_independently_of_their_values(name: str):
    # Then scaling an objective's loss (and so its gradient) scales its part of the update.
    gradients = []
    for seed, scale in ((20, 1.0), (21, 1e3)):
        losses = (_losses(seed) * scale).requires_grad_()
        _make(name)(losses).backward()
        gradients.append(losses.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-12, atol=0)
