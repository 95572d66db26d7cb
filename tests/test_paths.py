"""Each path from losses to ``.grad``, alone: what it computes, and that it writes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import UPGrad
from jdoptim._paths import (
    GramianPath,
    JacobianPath,
    Losses,
    Pieces,
    ScalarizedPath,
    combine,
)
from jdoptim.gramian import GramianEngine
from jdoptim.scalarization import STCH

pytestmark = pytest.mark.usefixtures("float64")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(10, 4, generator=generator), torch.randn(10, 3, generator=generator)


def _losses(model, tensor, *, scale: float = 1.0) -> Losses:
    params = list(model.parameters())
    return Losses(tensor, tensor.reshape(-1), params, retain_graph=False, scale=scale)


def _task_losses(model):
    x, y = _data()
    return ((model(x) - y) ** 2).mean(dim=0)


def _reference_jacobian(model, losses_fn, params=None) -> torch.Tensor:
    params = list(model.parameters()) if params is None else params
    losses = losses_fn(model).reshape(-1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in losses
    ]
    return torch.stack(rows)


def _no_grad_written(model):
    return all(p.grad is None for p in model.parameters())


def test_jacobian_path_gives_the_jacobian_and_the_aggregated_update():
    model = _model()
    path = JacobianPath(UPGrad())
    pieces = path.pieces(_losses(model, _task_losses(model)))
    J = _reference_jacobian(_model(), _task_losses)
    torch.testing.assert_close(pieces.matrix, J, rtol=1e-12, atol=1e-14)
    assert pieces.finite and pieces.own == {}
    update = path.aggregate(pieces, scale=1.0, diagnostics=True)
    expected = torch.split(UPGrad()(J), [p.numel() for p in model.parameters()])
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(update.grads[p], g.view_as(p), rtol=1e-12, atol=1e-14)
    report = update.diagnose()
    torch.testing.assert_close(report.weights, UPGrad().weighting(J @ J.T))
    assert _no_grad_written(model)


def test_jacobian_path_with_shared_params_gives_the_others_their_ordinary_gradient():
    model = _model()
    trunk, head = list(model[0].parameters()), list(model[2].parameters())
    path = JacobianPath(UPGrad(), shared_params=trunk)
    pieces = path.pieces(_losses(model, _task_losses(model)))
    reference = _model()
    J = _reference_jacobian(reference, _task_losses, list(reference[0].parameters()))
    torch.testing.assert_close(pieces.matrix, J, rtol=1e-12, atol=1e-14)
    assert pieces.shared == trunk and list(pieces.own) == head
    head_grads = torch.autograd.grad(_task_losses(reference).sum(), list(reference[2].parameters()))
    for p, g in zip(head, head_grads, strict=True):
        torch.testing.assert_close(pieces.own[p], g, rtol=1e-12, atol=1e-14)
    update = path.aggregate(pieces, scale=1.0, diagnostics=False)
    assert update.diagnose is None and set(update.grads) == set(model.parameters())
    assert _no_grad_written(model)


def test_jacobian_path_unscales_for_the_aggregator_and_scales_the_update_back():
    model, scaled_model = _model(), _model()
    path = JacobianPath(UPGrad())
    plain = path.aggregate(
        path.pieces(_losses(model, _task_losses(model))), scale=1.0, diagnostics=False
    )
    scaled_pieces = path.pieces(_losses(scaled_model, _task_losses(scaled_model) * 64.0, scale=64))
    scaled = path.aggregate(scaled_pieces, scale=64.0, diagnostics=False)
    for p, q in zip(model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(scaled.grads[q], 64.0 * plain.grads[p], rtol=1e-12, atol=1e-12)


def test_jacobian_path_reports_what_is_not_finite_and_unconnected_losses():
    model = _model()
    path = JacobianPath(UPGrad())
    losses = _task_losses(model) * torch.tensor([1.0, float("nan"), 1.0])
    pieces = path.pieces(_losses(model, losses))
    assert not pieces.finite and pieces.reason == "losses at indices [1] are not finite"
    with pytest.raises(ValueError, match="None of the 4 parameters"):
        path.pieces(_losses(model, torch.ones(2, requires_grad=True) * 2))

    class Broken(UPGrad):
        def forward(self, matrix):
            return super().forward(matrix) * float("inf")

    update = JacobianPath(Broken()).aggregate(
        path.pieces(_losses(model, _task_losses(model))), scale=1.0, diagnostics=False
    )
    assert not update.finite and "Broken" in update.reason and update.grads == {}
    assert _no_grad_written(model)


def _per_sample(model):
    x, y = _data()
    return ((model(x) - y) ** 2).mean(dim=1)


def test_gramian_path_gives_the_gramian_and_the_weighted_gradient_without_writing_grad():
    model = _model()
    engine = GramianEngine(model)
    path = GramianPath(UPGrad(), engine)
    existing = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, grad in zip(model.parameters(), existing, strict=True):
        p.grad = grad
    pieces = path.pieces(_losses(model, _per_sample(model)))
    J = _reference_jacobian(_model(), _per_sample)
    torch.testing.assert_close(pieces.gramian, J @ J.T, rtol=1e-10, atol=1e-12)
    update = path.aggregate(pieces, scale=1.0, diagnostics=True)
    expected = torch.split(UPGrad()(J), [p.numel() for p in model.parameters()])
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(update.grads[p], g.view_as(p), rtol=1e-10, atol=1e-12)
    for p, grad in zip(model.parameters(), existing, strict=True):
        assert p.grad is grad and bool((grad == 7.0).all())
    torch.testing.assert_close(update.diagnose().weights, UPGrad().weighting(J @ J.T))
    engine.close()


def test_gramian_path_discard_forgets_the_pending_gramian_and_non_finite_losses_skip_it():
    model = _model()
    engine = GramianEngine(model)
    path = GramianPath(UPGrad(), engine)
    pieces = path.pieces(_losses(model, _per_sample(model)))
    path.discard()
    with pytest.raises(RuntimeError, match="Call gramian"):
        path.aggregate(pieces, scale=1.0, diagnostics=False)
    bad = _per_sample(model) * torch.cat([torch.ones(9), torch.tensor([float("inf")])])
    pieces = path.pieces(_losses(model, bad))
    assert not pieces.finite and pieces.gramian is None and "[9]" in pieces.reason
    engine.close()


class _Counting(STCH):
    """STCH that counts its calls."""

    def __init__(self) -> None:
        super().__init__(mu=0.5)
        self.calls = 0

    def forward(self, losses):
        self.calls += 1
        return super().forward(losses)


def test_scalarized_path_backpropagates_the_scalarised_loss_and_checks_the_losses_first():
    model, reference = _model(), _model()
    scalarizer = _Counting()
    path = ScalarizedPath(scalarizer)
    pieces = path.pieces(_losses(model, _task_losses(model)))
    expected = torch.autograd.grad(STCH(mu=0.5)(_task_losses(reference)), reference.parameters())
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(pieces.own[p], g, rtol=1e-12, atol=1e-14)
    assert path.aggregate(pieces, scale=1.0, diagnostics=False).grads == pieces.own
    bad = _task_losses(model) * torch.tensor([float("inf"), 1.0, 1.0])
    pieces = path.pieces(_losses(model, bad))
    assert not pieces.finite and "[0]" in pieces.reason
    assert scalarizer.calls == 1
    assert _no_grad_written(model)


def test_combine_adds_or_stacks_the_queued_pieces():
    p = nn.Parameter(torch.zeros(2))
    head = nn.Parameter(torch.zeros(1))
    first = Pieces([p], torch.ones(3, 2), {head: torch.ones(1)})
    second = Pieces([p], 2 * torch.ones(3, 2), {head: torch.ones(1)}, finite=False, reason="x")
    summed = combine([first, second], "sum")
    torch.testing.assert_close(summed.matrix, 3 * torch.ones(3, 2))
    torch.testing.assert_close(summed.own[head], 2 * torch.ones(1))
    assert not summed.finite and summed.reason == "x"
    assert combine([first, second], "concat").matrix.shape == (6, 2)
    assert combine([first], "sum") is first
    with pytest.raises(ValueError, match=r"shapes \[\(2, 2\), \(3, 2\)\]"):
        combine([first, Pieces([p], torch.ones(2, 2))], "sum")
    with pytest.raises(ValueError, match="different shared parameters"):
        combine([first, Pieces([head], torch.ones(3, 1))], "concat")


def test_the_optimizer_chooses_the_path_and_hands_it_the_options_assigned_later():
    from jdoptim import JDOptimizer, Mean
    from jdoptim.scalarization import Mean as MeanScalarizer

    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer = JDOptimizer(sgd, UPGrad(), chunk_size=2)
    assert isinstance(optimizer._path, JacobianPath) and optimizer._path.chunk_size == 2
    optimizer.chunk_size = 3
    optimizer.shared_params = model[0]
    assert optimizer._path.chunk_size == 3
    assert optimizer._path.shared_params == list(model[0].parameters())
    with pytest.raises(ValueError, match="Invalid chunk_size value: 0"):
        optimizer.chunk_size = 0
    optimizer.aggregator = Mean()
    assert isinstance(optimizer._path.method, Mean)
    with pytest.raises(TypeError, match="takes a method of type Aggregator"):
        optimizer.aggregator = MeanScalarizer()
    assert isinstance(JDOptimizer(sgd, MeanScalarizer())._path, ScalarizedPath)
    gramian = JDOptimizer(sgd, UPGrad(), mode="gramian", modules=model)
    assert isinstance(gramian._path, GramianPath) and gramian.resolved_mode == "gramian"
    gramian._path.engine.close()
