"""JDOptimizer with a loss scalarizer in place of an aggregator: one ordinary backward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim import SGD, Adam

from jdoptim import JDOptimizer, NonFiniteError
from jdoptim.scalarization import FAMO, STCH, UW, Mean

pytestmark = pytest.mark.usefixtures("float64")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 3, generator=generator)


def _losses(model, x, y):
    return ((model(x) - y) ** 2).mean(dim=0)


def test_mean_scalarizer_is_sgd_on_the_mean_loss():
    x, y = _data()
    model, reference = _model(), _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1, momentum=0.9), Mean())
    plain = SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        optimizer.step(_losses(model, x, y))
        plain.zero_grad()
        _losses(reference, x, y).mean().backward()
        plain.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_trainable_scalarizer_parameters_are_optimised_with_the_model():
    x, y = _data()
    model = _model()
    scalarizer = UW(m=3)
    optimizer = JDOptimizer(
        Adam([*model.parameters(), *scalarizer.parameters()], lr=0.05), scalarizer
    )
    before = [p.detach().clone() for p in scalarizer.parameters()]
    optimizer.step(_losses(model, x, y))
    assert all(not torch.equal(a, b) for a, b in zip(before, scalarizer.parameters(), strict=True))


def test_famo_protocol_and_bit_exact_resume():
    x, y = _data()

    def run(model, optimizer, scalarizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            optimizer.step(_losses(model, x, y))
            with torch.no_grad():
                scalarizer.update(_losses(model, x, y))

    model, scalarizer = _model(), FAMO()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.05), scalarizer)
    run(model, optimizer, scalarizer, 2)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})
    assert checkpoint["opt"]["jdoptim"]["aggregator"]["name"] == "scalarization.famo"
    run(model, optimizer, scalarizer, 2)

    resumed, resumed_scalarizer = _model(seed=5), FAMO()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = JDOptimizer(SGD(resumed.parameters(), lr=0.05), resumed_scalarizer)
    resumed_optimizer.load_state_dict(checkpoint["opt"])
    run(resumed, resumed_optimizer, resumed_scalarizer, 2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_losses_are_refused_before_the_scalarizer_records_them():
    x, y = _data()
    model, scalarizer = _model(), FAMO()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.05), scalarizer)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match=r"indices \[2\]"):
        optimizer.step(_losses(model, x, y) * torch.tensor([1.0, 1.0, float("inf")]))
    assert scalarizer.pending_losses is None
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_from_config_builds_a_scalarizer():
    model = _model()
    optimizer = JDOptimizer.from_config(
        SGD(model.parameters(), lr=0.1), {"aggregator": {"name": "scalarization.stch", "mu": 0.5}}
    )
    assert isinstance(optimizer.aggregator, STCH)


def test_with_a_grad_scaler_the_scalarizer_sees_the_unscaled_losses():
    x, y = _data()
    model, reference = _model(), _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), STCH(mu=0.3), scaler=scaler)
    optimizer.backward(scaler.scale(_losses(model, x, y)))
    scaler.unscale_(optimizer)
    JDOptimizer(SGD(reference.parameters(), lr=0.1), STCH(mu=0.3)).backward(
        _losses(reference, x, y)
    )
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
