"""GradNorm: Algorithm 1 of the paper, computed independently with autograd (the gradient of
L_grad with respect to the weights, through the norms of the weighted losses' gradients), and the
choices it leaves open."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from jdoptim import Columns, GradNorm, GradNormWeighting, JDOptimizer
from tests.aggregation._multitask import M, task_losses, trained_in_mode
from tests.aggregation._multitask import TinyMultiTask as _Net

pytestmark = pytest.mark.usefixtures("float64")


def _losses(model: nn.Module, step: int) -> Tensor:
    return task_losses(model, step, (1.0, 3.0, 0.3))


def _reference(steps: int, lr: float, alpha: float, net_lr: float, last_layer: bool):
    """Algorithm 1 of the paper: L = Σ w_i L_i trains the whole network; the weights take a
    gradient step on L_grad = Σ |G_i - Ḡ r_i^α| (targets constant), found by autograd through
    G_i = ‖∇_W (w_i L_i)‖, and are renormalised to sum to m."""
    model = _Net()
    layer = model.trunk[2] if last_layer else model.trunk
    W = list(layer.parameters())
    weights = torch.ones(M)
    initial = None
    history = []
    for step in range(steps):
        losses = _losses(model, step)
        if initial is None:
            initial = losses.detach()
        w = weights.clone().requires_grad_()
        norms = torch.stack(
            [
                torch.cat(
                    [
                        g.reshape(-1)
                        for g in torch.autograd.grad(
                            w[i] * losses[i], W, retain_graph=True, create_graph=True
                        )
                    ]
                ).norm()
                for i in range(M)
            ]
        )
        ratios = losses.detach() / initial
        targets = (norms.mean() * (ratios / ratios.mean()) ** alpha).detach()
        (weight_gradient,) = torch.autograd.grad((norms - targets).abs().sum(), w)
        grads = torch.autograd.grad((weights * losses).sum(), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= net_lr * g
        history.append(weights)
        stepped = weights - lr * weight_gradient
        assert (stepped > 0).all()  # the floor at 0 is not reached here
        weights = M * stepped / stepped.sum()
    return model, history, weights


@pytest.mark.parametrize(("alpha", "last_layer"), [(1.5, True), (0.5, False), (0.0, True)])
def test_training_follows_algorithm_1(alpha: float, last_layer: bool):
    lr, net_lr, steps = 0.05, 0.1, 4
    reference, history, final = _reference(steps, lr, alpha, net_lr, last_layer)
    model = _Net()
    aggregator = GradNorm(lr=lr, alpha=alpha, layer=-1 if last_layer else None)
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=net_lr),
        aggregator,
        shared_params=model.trunk,
        diagnostics=True,
    )
    for step in range(steps):
        optimizer.zero_grad()
        optimizer.step(_losses(model, step))
        # The step's weights, and those of the next step, are in the diagnostics.
        torch.testing.assert_close(optimizer.last_diagnostics.weights, history[step])
    torch.testing.assert_close(aggregator.weighting.loss_weights, final)
    torch.testing.assert_close(optimizer.last_diagnostics.method_state["loss_weights"], final)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the heads descended w_i L_i too


def test_the_weights_stay_at_one_during_the_warm_up_and_l0_is_its_mean():
    G = torch.tensor([[1.0, 0.0], [0.0, 9.0]])
    first, second = torch.tensor([2.0, 1.0]), torch.tensor([4.0, 3.0])
    weighting = GradNormWeighting(lr=0.1, alpha=1.0, n_warmup_steps=2)
    for losses in (first, second):
        torch.testing.assert_close(weighting(G, losses=losses), torch.ones(2))
        torch.testing.assert_close(weighting.loss_weights, torch.ones(2))
    torch.testing.assert_close(weighting.initial_losses, (first + second) / 2)
    # Third call: norms (1, 3), Ḡ = 2, L̃ = (1, 1.5) / (3, 2) = (1/3, 3/4)... by hand:
    losses = torch.tensor([1.0, 1.5])
    ratios = losses / torch.tensor([3.0, 2.0])
    targets = 2.0 * ratios / ratios.mean()
    gradient = torch.sign(torch.tensor([1.0, 3.0]) - targets) * torch.tensor([1.0, 3.0])
    expected = (torch.ones(2) - 0.1 * gradient) * 2 / (torch.ones(2) - 0.1 * gradient).sum()
    torch.testing.assert_close(weighting(G, losses=losses), torch.ones(2))
    torch.testing.assert_close(weighting.loss_weights, expected)


def test_a_weight_pushed_below_zero_is_floored_and_grows_back():
    G = torch.diag(torch.tensor([1.0, 100.0]))
    weighting = GradNormWeighting(lr=1.0, alpha=0.0)
    weighting(G, losses=torch.ones(2))
    # n = (1, 10), Ḡ = 5.5: w2 = 1 - 10 falls below 0 and is floored; w1 = 2 after renormalising.
    torch.testing.assert_close(weighting.loss_weights, torch.tensor([2.0, 0.0]))
    weighting(G, losses=torch.ones(2))  # G_W = (2, 0), targets 1: w1 shrinks, w2 grows back
    torch.testing.assert_close(weighting.loss_weights, torch.tensor([2.0 / 11.0, 20.0 / 11.0]))


def test_weights_all_floored_restart_at_one():
    weighting = GradNormWeighting(lr=10.0, alpha=0.5)
    weighting(torch.eye(2), losses=torch.ones(2))  # L(0) = (1, 1); equal norms: no step
    torch.testing.assert_close(weighting.loss_weights, torch.ones(2))
    # Norms (1, 3), Ḡ = 2, rates (0.2, 1.8): targets 2 √r = (0.89, 2.68) are both below G_W,
    # so both weights step below 0.
    weighting(torch.diag(torch.tensor([1.0, 9.0])), losses=torch.tensor([0.2, 1.8]))
    torch.testing.assert_close(weighting.loss_weights, torch.ones(2))


def test_the_norms_are_taken_at_the_chosen_layer_and_the_update_uses_every_column():
    generator = torch.Generator().manual_seed(3)
    J = torch.randn(M, 7, generator=generator)
    losses = torch.tensor([1.0, 2.0, 0.5])
    columns = Columns((3, 2, 2), layers=("a", "a", "b"))
    by_layer = GradNorm(lr=0.2, layer=-1)
    whole = GradNorm(lr=0.2)
    for _ in range(3):
        update = by_layer(J, losses=losses, columns=columns)
        direct = whole.weighting(J[:, 5:] @ J[:, 5:].T, losses=losses)
        torch.testing.assert_close(update, direct @ J)
        losses = losses * torch.tensor([0.9, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"GradNorm\(layer=2\) asks for a layer"):
        GradNorm(lr=0.1, layer=2)(J, losses=losses, columns=columns)


def test_losses_and_positive_initial_losses_are_required():
    J = torch.eye(2)
    with pytest.raises(ValueError, match="GradNorm needs the values of the losses"):
        GradNorm(lr=0.1)(J)
    aggregator = GradNorm(lr=0.1)
    with pytest.raises(ValueError, match=r"L\(0\) = \[0.0, 1.0\]"):
        aggregator(J, losses=torch.tensor([0.0, 1.0]))
    assert aggregator.weighting.loss_weights is None  # the failed call changed nothing


def test_gramian_mode_steps_like_jacobian_mode():
    def method():
        return GradNorm(lr=0.05)

    gramian = trained_in_mode(method, "gramian", 0.1, _losses)
    jacobian = trained_in_mode(method, "jacobian", 0.1, _losses)
    for a, b in zip(gramian, jacobian, strict=True):
        torch.testing.assert_close(a, b)


def test_state_dict_resumes_bit_exactly():
    generator = torch.Generator().manual_seed(4)
    jacobians = torch.randn(5, M, 4, generator=generator)
    losses = torch.rand(5, M, generator=generator) + 0.5
    original = GradNorm(lr=0.3, n_warmup_steps=1)
    original(jacobians[0], losses=losses[0])
    original(jacobians[1], losses=losses[1])
    restored = GradNorm(lr=0.3, n_warmup_steps=1)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    for J, values in zip(jacobians[2:], losses[2:], strict=True):
        torch.testing.assert_close(
            restored(J, losses=values), original(J, losses=values), rtol=0, atol=0
        )
