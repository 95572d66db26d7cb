"""DB-MTL: the paper's two balances, computed independently with autograd on the log-losses, and
the state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from jdoptim import DBMTL, JDOptimizer
from tests.aggregation._multitask import M, task_losses
from tests.aggregation._multitask import TinyMultiTask as _Net

pytestmark = pytest.mark.usefixtures("float64")


def _losses(model: nn.Module, step: int) -> Tensor:
    return task_losses(model, step, (1.0, 30.0, 0.1))


def _reference(steps: int, beta: float, sigma: float, eps: float, lr: float) -> nn.Module:
    """The trunk steps along Σ_i (max_j |ĝ_j| / |ĝ_i|) ĝ_i, with ĝ_i the moving average of the
    trunk's gradients of log(L_i + eps), each found by its own autograd call; the heads descend
    Σ_i log(L_i + eps)."""
    model = _Net()
    trunk, heads = list(model.trunk.parameters()), list(model.heads.parameters())
    average = None
    for step in range(steps):
        logs = torch.log(_losses(model, step) + eps)
        rows = torch.stack(
            [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(logs[i], trunk, retain_graph=True)]
                )
                for i in range(M)
            ]
        )
        head_grads = torch.autograd.grad(logs.sum(), heads)
        rate = beta / (step + 1) ** sigma
        average = (1 - rate) * rows if average is None else rate * average + (1 - rate) * rows
        norms = average.norm(dim=1)
        update = sum(norms.max() / norms[i] * average[i] for i in range(M))
        with torch.no_grad():
            start = 0
            for p in trunk:
                p -= lr * update[start : start + p.numel()].view_as(p)
                start += p.numel()
            for p, g in zip(heads, head_grads, strict=True):
                p -= lr * g
    return model


@pytest.mark.parametrize(("beta", "sigma", "eps"), [(0.9, 0.0, 1e-8), (0.6, 0.5, 0.0)])
def test_training_follows_the_paper(beta: float, sigma: float, eps: float):
    reference = _reference(4, beta, sigma, eps, lr=0.05)
    model = _Net()
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        DBMTL(beta=beta, beta_sigma=sigma, eps=eps),
        shared_params=model.trunk,
        diagnostics=True,
    )
    for step in range(4):
        optimizer.zero_grad()
        optimizer.step(_losses(model, step))
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    scales = optimizer.last_diagnostics.method_state["scales"]
    assert scales.shape == (M,) and scales.min() == 1.0


def test_a_zero_average_contributes_nothing_and_the_scale_is_exact():
    J = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 1e-12]])
    losses = torch.ones(3)
    update = DBMTL(beta=0.0, eps=0.0)(J, losses=losses)
    torch.testing.assert_close(update, torch.tensor([3.0, 9.0]))  # (3, 4) + 5 (0, 1)
    # LibMTL divides by |ĝ_i| + 1e-8, which would shrink the tiny row to 1e-4 of its share.
    for scale in (1e-30, 1e30):
        torch.testing.assert_close(
            DBMTL(beta=0.0, eps=0.0)(J * scale, losses=losses), update * scale
        )


def test_summed_micro_batches_are_refused_and_nothing_changes():
    model = _Net()
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), DBMTL(), shared_params=model.trunk
    )
    with pytest.raises(ValueError, match="DBMTL weights the heads' gradients"):
        optimizer.backward(_losses(model, 0), aggregate=False)
    assert optimizer._pending == [] and all(p.grad is None for p in model.parameters())
    optimizer.accumulation = "concat"
    optimizer.backward(_losses(model, 0), aggregate=False)  # different objectives: exact
    optimizer.backward(_losses(model, 1))


def test_non_positive_losses_and_non_finite_input():
    aggregator = DBMTL(eps=0.0)
    with pytest.raises(ValueError, match="logarithm of the losses"):
        aggregator(torch.eye(2), losses=torch.tensor([1.0, 0.0]))
    assert aggregator.average is None
    update = aggregator(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), losses=torch.ones(2))
    assert torch.isnan(update).all() and aggregator.average is None


def test_state_dict_resumes_bit_exactly_and_reset_restarts():
    generator = torch.Generator().manual_seed(2)
    jacobians = torch.randn(4, M, 5, generator=generator)
    losses = torch.rand(4, M, generator=generator) + 0.1
    original = DBMTL(beta=0.7, beta_sigma=0.3)
    first = original(jacobians[0], losses=losses[0])
    original(jacobians[1], losses=losses[1])
    restored = DBMTL(beta=0.7, beta_sigma=0.3)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    for J, values in zip(jacobians[2:], losses[2:], strict=True):
        expected = original(J, losses=values)
        torch.testing.assert_close(restored(J, losses=values), expected, rtol=0, atol=0)
    original.reset()
    torch.testing.assert_close(original(jacobians[0], losses=losses[0]), first, rtol=0, atol=0)
