"""FAMO: the scalar, and the logits' Adam step against the paper's algorithm run with
torch.optim.Adam on an autograd softmax."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from jdoptim.scalarization import FAMO

EPSILON = 1e-8


def _famo(values, logits, bounds):
    """The scalar in Python floats: c Σ z_i log(L_i - b_i + ε)."""
    exps = [math.exp(w) for w in logits]
    z = [e / sum(exps) for e in exps]
    shifted = [v - b + EPSILON for v, b in zip(values, bounds, strict=True)]
    c = 1 / sum(zi / s for zi, s in zip(z, shifted, strict=True))
    return c * sum(zi * math.log(s) for zi, s in zip(z, shifted, strict=True)), z, shifted, c


class ReferenceFAMO:
    """Algorithm 2 of the paper: logits in an nn.Parameter stepped by torch.optim.Adam, with
    the gradient taken through an autograd softmax."""

    def __init__(self, m, bounds, lr, weight_decay):
        self.w = torch.nn.Parameter(torch.zeros(m, dtype=torch.float64))
        self.bounds = torch.tensor(bounds, dtype=torch.float64)
        self.optimizer = torch.optim.Adam([self.w], lr=lr, weight_decay=weight_decay)

    def update(self, before, after):
        delta = (before - self.bounds + EPSILON).log() - (after - self.bounds + EPSILON).log()
        (gradient,) = torch.autograd.grad(torch.softmax(self.w, 0), self.w, grad_outputs=delta)
        self.optimizer.zero_grad()
        self.w.grad = gradient
        self.optimizer.step()


def test_scalar_and_its_gradient_follow_the_formula():
    values, logits, bounds = [0.9, 2.5, 0.4], [0.2, -0.3, 0.5], [0.1, 0.5, 0.0]
    famo = FAMO(3, min_losses=bounds).double()
    famo.logits.copy_(torch.tensor(logits, dtype=torch.float64))
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    scalar = famo(losses)
    expected, z, shifted, c = _famo(values, logits, bounds)
    assert scalar.item() == pytest.approx(expected, rel=1e-14)
    scalar.backward()
    convex = [c * zi / s for zi, s in zip(z, shifted, strict=True)]
    torch.testing.assert_close(
        losses.grad, torch.tensor(convex, dtype=torch.float64), rtol=1e-14, atol=0
    )
    assert losses.grad.sum().item() == pytest.approx(1.0, rel=1e-14)


@pytest.mark.parametrize(("lr", "weight_decay"), [(0.025, 0.001), (0.1, 0.0), (0.01, 0.5)])
def test_updates_match_adam_on_an_autograd_softmax(lr, weight_decay):
    bounds = [0.05, 0.0, 0.2]
    famo = FAMO(min_losses=bounds, lr=lr, weight_decay=weight_decay)
    reference = ReferenceFAMO(3, bounds, lr, weight_decay)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        before = torch.rand(3, generator=generator, dtype=torch.float64) + 0.3
        after = before * (0.5 + torch.rand(3, generator=generator, dtype=torch.float64))
        famo(before)
        famo.update(after)
        reference.update(before, after)
        torch.testing.assert_close(famo.logits, reference.w.detach(), rtol=1e-12, atol=1e-15)
    state = reference.optimizer.state[reference.w]
    torch.testing.assert_close(famo.exp_avg, state["exp_avg"], rtol=1e-12, atol=0)
    torch.testing.assert_close(famo.exp_avg_sq, state["exp_avg_sq"], rtol=1e-12, atol=0)


def test_the_task_whose_loss_falls_more_slowly_gains_weight():
    famo = FAMO(2)
    famo(torch.tensor([1.0, 1.0]))
    famo.update(torch.tensor([0.5, 0.9]))
    z = famo.weights()
    assert z[1] > 0.5 > z[0]


def test_update_needs_a_recorded_call_and_matching_losses():
    famo = FAMO()
    with pytest.raises(ValueError, match=r"needs the losses of a preceding call"):
        famo.update(torch.ones(2))
    famo(torch.ones(2))
    with pytest.raises(ValueError, match="has 2 pending losses but got 3"):
        famo.update(torch.ones(3))
    famo.update(torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"needs the losses of a preceding call"):
        famo.update(torch.full((2,), 0.5))
    famo.eval()
    famo(torch.ones(2))
    with pytest.raises(ValueError, match=r"needs the losses of a preceding call"):
        famo.update(torch.full((2,), 0.5))


def test_losses_below_their_bounds_and_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="must not be below min_losses"):
        FAMO(min_losses=[0.5, 0.0])(torch.tensor([0.4, 1.0]))
    with pytest.raises(ValueError, match="FAMO has 2 min_losses but got 3 losses"):
        FAMO(min_losses=[0.5, 0.0])(torch.ones(3))
    with pytest.raises(ValueError, match=r"Invalid min_losses value: \[0.5, 0.0\]; FAMO has m=3"):
        FAMO(3, min_losses=[0.5, 0.0])
    with pytest.raises(ValueError, match="FAMO has 2 objectives but got 3 losses"):
        FAMO(2)(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid lr value"):
        FAMO(lr=-1.0)
    with pytest.raises(ValueError, match="learns m at its first call"):
        FAMO().weights()


def test_a_lazy_instance_takes_m_and_dtype_from_the_first_losses_and_matches_an_eager_one():
    lazy, eager = FAMO(), FAMO(3).double()
    assert lazy.state_dict().keys() == {"steps"}
    for scale in (1.0, 0.7, 0.4):
        losses = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) * scale
        torch.testing.assert_close(lazy(losses), eager(losses), rtol=0, atol=0)
        lazy.update(losses * torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64))
        eager.update(losses * torch.tensor([0.9, 0.5, 0.8], dtype=torch.float64))
    assert lazy.logits.dtype == torch.float64
    torch.testing.assert_close(lazy.logits, eager.logits, rtol=0, atol=0)
    lazy.reset()
    assert lazy.logits is None
    lazy(torch.ones(2))  # another m after reset


def test_a_training_loop_resumed_from_state_dict_between_call_and_update_matches():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 16, 4), torch.randn(5, 16, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    famo = FAMO()

    def loop(model, optimizer, famo, batches, snapshot_at=None):
        snapshot = None
        for batch in batches:
            losses = ((model(x[batch]) - y[batch]) ** 2).mean(dim=0)
            optimizer.zero_grad()
            famo(losses).backward()
            optimizer.step()
            if batch == snapshot_at:
                snapshot = copy.deepcopy((model, optimizer.state_dict(), famo.state_dict()))
            with torch.no_grad():
                famo.update(((model(x[batch]) - y[batch]) ** 2).mean(dim=0))
        return snapshot

    snapshot = loop(model, optimizer, famo, range(5), snapshot_at=2)
    resumed_model, optimizer_state, famo_state = snapshot
    assert "pending_losses" in famo_state
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    resumed_optimizer.load_state_dict(optimizer_state)
    resumed = FAMO()
    resumed.load_state_dict(famo_state)
    with torch.no_grad():
        resumed.update(((resumed_model(x[2]) - y[2]) ** 2).mean(dim=0))
    loop(resumed_model, resumed_optimizer, resumed, range(3, 5))
    for trained, restarted in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(restarted, trained, rtol=0, atol=0)
    torch.testing.assert_close(resumed.logits, famo.logits, rtol=0, atol=0)
    assert resumed.steps == famo.steps == 5
