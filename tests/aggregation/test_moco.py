"""MoCo: Algorithm 1 of the paper, and LibMTL's variant, computed independently step by step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from jdoptim import JDOptimizer, MoCo

pytestmark = pytest.mark.usefixtures("float64")


def _simplex_projection(v: Tensor) -> Tensor:
    """argmin_{w in the simplex} |w - v|: w = max(v - θ, 0) with Σ w = 1, θ found by bisection
    (the sum decreases in θ)."""
    low, high = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        theta = (low + high) / 2
        if (v - theta).clamp(min=0).sum() > 1:
            low = theta
        else:
            high = theta
    return (v - (low + high) / 2).clamp(min=0)


def _paper(jacobians, beta, beta_sigma, gamma, gamma_sigma, rho) -> list[Tensor]:
    m = jacobians[0].shape[0]
    y = [torch.zeros_like(jacobians[0][i]) for i in range(m)]
    weights = torch.full((m,), 1.0 / m)
    updates = []
    for t, J in enumerate(jacobians, start=1):
        beta_t, gamma_t = beta / t**beta_sigma, gamma / t**gamma_sigma
        y = [y[i] - beta_t * (y[i] - J[i]) for i in range(m)]
        products = torch.tensor([[float(a @ b) for b in y] for a in y])
        weights = _simplex_projection(weights - gamma_t * (products + rho * torch.eye(m)) @ weights)
        updates.append(sum(weights[i] * y[i] for i in range(m)))
    return updates


def _libmtl(jacobians, losses, beta, beta_sigma, gamma, gamma_sigma, rho) -> list[Tensor]:
    """LibMTL's MoCo: each gradient rescaled to the norm of its loss, a softmax for the
    weights."""
    m = jacobians[0].shape[0]
    y = torch.zeros_like(jacobians[0])
    weights = torch.full((m,), 1.0 / m)
    updates = []
    for t, (J, values) in enumerate(zip(jacobians, losses, strict=True), start=1):
        grads = torch.stack([J[i] / J[i].norm() * values[i] for i in range(m)])
        y = y - beta / t**beta_sigma * (y - grads)
        step = gamma / t**gamma_sigma
        weights = torch.softmax(weights - step * (y @ y.T + rho * torch.eye(m)) @ weights, dim=0)
        updates.append(y.T @ weights)
    return updates


def _jacobians(count: int, m: int = 3, n: int = 5, seed: int = 0) -> Tensor:
    return torch.randn(count, m, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "arguments",
    [
        {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.0},
        {"beta": 0.9, "beta_sigma": 0.0, "gamma": 0.5, "gamma_sigma": 0.0, "rho": 0.3},
    ],
)
def test_matches_algorithm_1(arguments: dict):
    jacobians = _jacobians(6)
    aggregator = MoCo(**arguments)
    for J, expected in zip(jacobians, _paper(jacobians, **arguments), strict=True):
        torch.testing.assert_close(aggregator(J), expected)
        assert aggregator.weights.min() >= 0 and aggregator.weights.sum() == pytest.approx(1.0)


def test_matches_libmtl_with_its_options():
    jacobians = _jacobians(5, seed=1)
    losses = torch.rand(5, 3, generator=torch.Generator().manual_seed(2)) + 0.2
    arguments = {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "rho": 0.1}
    aggregator = MoCo(**arguments, weight_update="softmax", normalization="loss")
    expected = _libmtl(jacobians, losses, **arguments)
    for J, values, update in zip(jacobians, losses, expected, strict=True):
        torch.testing.assert_close(aggregator(J, losses=values), update)


def test_the_weights_are_in_the_diagnostics_and_need_no_second_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MoCo(), diagnostics=True)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    for _ in range(3):
        optimizer.zero_grad()
        optimizer.step(((model(x) - y) ** 2).mean(dim=0))
        weights = optimizer.last_diagnostics.method_state["lambda"]
        torch.testing.assert_close(weights, optimizer.aggregator.weights)
    assert list(optimizer.aggregator.parameters()) == []


def test_a_zero_gradient_stays_zero_under_the_loss_normalisation():
    J = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    update = MoCo(beta=1.0, gamma=0.0, normalization="loss")(J, losses=torch.tensor([10.0, 1.0]))
    torch.testing.assert_close(update, torch.tensor([3.0, 4.0]))  # (6, 8) and 0, weights 1/2


def test_large_gradients_give_finite_weights():
    J = torch.tensor([[1e30, 0.0], [0.0, 1e30]], dtype=torch.float32)
    aggregator = MoCo()
    for _ in range(3):
        assert torch.isfinite(aggregator(J)).all()
    assert torch.isfinite(aggregator.weights).all()


def test_state_dict_resumes_bit_exactly_and_reset_restarts():
    jacobians = _jacobians(4, seed=3)
    original = MoCo(weight_update="softmax")
    first = original(jacobians[0])
    original(jacobians[1])
    restored = MoCo(weight_update="softmax")
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    for J in jacobians[2:]:
        torch.testing.assert_close(restored(J), original(J), rtol=0, atol=0)
    original.reset()
    torch.testing.assert_close(original(jacobians[0]), first, rtol=0, atol=0)
