"""The cut of a multi-task graph at its shared part (``jdoptim._split``), alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from jdoptim._split import jacobian_matrix, split, through_shared, vjp_rows
from jdoptim.functional import jacobian, stack_jacobians

pytestmark = pytest.mark.usefixtures("float64")


class _Gate(torch.autograd.Function):
    """``features * weight`` with data-dependent control flow in backward: vmap cannot batch
    it, so a consumer built from it is called one row at a time."""

    @staticmethod
    def forward(ctx, features, weight):
        ctx.save_for_backward(features, weight)
        return features * weight

    @staticmethod
    def backward(ctx, grad):
        features, weight = ctx.saved_tensors
        if grad.abs().sum() >= 0:
            return grad * weight, (grad * features).sum(dim=0)
        return None, None


def _model():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(3))
    gate = nn.Parameter(torch.randn(5))
    return trunk, heads, gate


def _losses(trunk, heads, gate, x):
    features = trunk(x)
    outputs = [heads[0](features), heads[1](features), heads[2](_Gate.apply(features, gate))]
    both = heads[0](_Gate.apply(features, gate))  # a consumer that tasks 0 and 2 reach
    return torch.stack(
        [
            (outputs[0] ** 2).mean() + both.mean(),
            (outputs[1] - 1).abs().mean(),
            torch.sin(outputs[2]).mean() + both.pow(2).mean(),
        ]
    )


def test_the_boundary_gradients_are_the_tasks_gradients_at_the_features():
    x = torch.randn(7, 4)
    trunk, heads, gate = _model()
    shared = list(trunk.parameters())
    others = [*heads.parameters(), gate]
    losses = _losses(trunk, heads, gate, x)
    cut = split(losses, torch.eye(3), shared, others)
    assert len(cut.boundary) == 1  # the trunk's output
    features_edge = cut.boundary[0]
    assert cut.is_shared(features_edge)
    r_trunk, r_heads, r_gate = _model()
    r_features = r_trunk(x)
    r_features.retain_grad()
    outputs = [
        r_heads[0](r_features),
        r_heads[1](r_features),
        r_heads[2](_Gate.apply(r_features, r_gate)),
    ]
    both = r_heads[0](_Gate.apply(r_features, r_gate))
    r_losses = torch.stack(
        [
            (outputs[0] ** 2).mean() + both.mean(),
            (outputs[1] - 1).abs().mean(),
            torch.sin(outputs[2]).mean() + both.pow(2).mean(),
        ]
    )
    per_task = torch.stack(
        [torch.autograd.grad(loss, r_features, retain_graph=True)[0] for loss in r_losses]
    )
    torch.testing.assert_close(cut.cotangents[0], per_task, rtol=1e-12, atol=1e-14)
    own = torch.autograd.grad(r_losses.sum(), [*r_heads.parameters(), r_gate], retain_graph=True)
    for p, g in zip(others, own, strict=True):
        torch.testing.assert_close(cut.own[p], g, rtol=1e-12, atol=1e-14)
    jacobians = through_shared(cut, shared, retain_graph=False)
    expected = jacobian(r_losses, list(r_trunk.parameters()), batched=False)
    for got, want in zip(jacobians, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_losses_that_reach_no_shared_parameter_only_give_the_others_their_gradients():
    trunk, heads, _ = _model()
    x = torch.randn(7, 5)
    losses = torch.stack([head(x).mean() for head in heads])
    cut = split(losses, torch.eye(3), list(trunk.parameters()), list(heads.parameters()))
    assert cut.boundary == [] and set(cut.own) == set(heads.parameters())


def test_losses_without_other_parameters_are_their_own_boundary():
    trunk, _, _ = _model()
    losses = trunk(torch.randn(7, 4)).mean(dim=0)
    rows = torch.eye(5)
    cut = split(losses, rows, list(trunk.parameters()), [])
    assert len(cut.boundary) == 1 and cut.cotangents[0] is rows and cut.own == {}


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
@pytest.mark.parametrize("batched", [True, False])
def test_jacobian_matrix_writes_the_concatenated_jacobians(chunk_size, batched):
    trunk, heads, _ = _model()
    x = torch.randn(7, 4)
    unused = nn.Parameter(torch.zeros(2))
    params = [*trunk.parameters(), unused, *heads[0].parameters()]
    losses = torch.cat([trunk(x).mean(dim=0), heads[0](trunk(x)).mean(dim=0)])  # [6]
    expected = jacobian(losses, params, retain_graph=True)
    matrix, reached = jacobian_matrix(
        [losses], params, [torch.eye(6)], retain_graph=True, batched=batched, chunk_size=chunk_size
    )
    assert reached == [j is not None for j in expected] and not reached[2]
    torch.testing.assert_close(matrix, stack_jacobians([j for j in expected if j is not None]))
    none, flags = jacobian_matrix([losses], [unused], [torch.eye(6)], retain_graph=False)
    assert none is None and flags == [False]


def test_vjp_rows_from_graph_edges_in_chunks():
    trunk, _, _ = _model()
    out = trunk(torch.randn(7, 4))
    edge = get_gradient_edge(out)
    rows = torch.randn(4, 7, 5)
    params = list(trunk.parameters())
    whole = vjp_rows([edge], params, [rows], retain_graph=True)
    chunked = vjp_rows([out], params, [rows], retain_graph=True, chunk_size=3)
    looped = vjp_rows([out], params, [rows], retain_graph=False, batched=False)
    for a, b, c in zip(whole, chunked, looped, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize(
    ("entries", "rows_per_pass"),
    [(10**9, [6]), (3 - 1 / 8, [2, 2, 2]), (4, [4, 2]), (1 / 2, [1] * 6)],
)
def test_jacobian_matrix_puts_as_many_rows_in_a_pass_as_fit_in_pass_entries(
    monkeypatch, entries, rows_per_pass
):
    """``entries``: `PASS_ENTRIES` as a multiple of the parameters' size."""
    import jdoptim._split as split_module

    trunk, _, _ = _model()
    params = list(trunk.parameters())
    n = sum(p.numel() for p in params)
    monkeypatch.setattr(split_module, "PASS_ENTRIES", int(entries * n))
    out = trunk(torch.randn(7, 4))
    losses = torch.cat([out.mean(dim=0), out[0]])[:6]
    passes = []
    grad = torch.autograd.grad

    def counted(outputs, inputs, grad_outputs, **options):
        passes.append(grad_outputs[0].shape[0] if options.get("is_grads_batched") else 1)
        return grad(outputs, inputs, grad_outputs, **options)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    matrix, _ = jacobian_matrix([losses], params, [torch.eye(6)], retain_graph=True)
    monkeypatch.undo()
    assert passes == rows_per_pass
    expected = jacobian(losses, params, retain_graph=True)
    torch.testing.assert_close(matrix, stack_jacobians(expected))


def _heads_losses(trunk, heads, x, stacked):
    features = trunk(x)
    per_task = [(head(features) ** 2).mean() + head(features).sin().mean() for head in heads]
    if stacked:
        return features, torch.stack(per_task)
    return features, torch.cat([loss.unsqueeze(0) for loss in per_task])


def test_stacked_losses_that_each_reach_their_own_heads_are_cut_in_one_ordinary_pass(monkeypatch):
    """With one loss per head (each head called twice), the boundary gradients and the heads'
    gradients come from one ordinary backward pass; they are those of the general route (losses
    not stacked) and of one backward pass per task."""
    trunk, heads, _ = _model()
    x = torch.randn(7, 4)
    shared, others = list(trunk.parameters()), list(heads.parameters())
    passes = []
    grad = torch.autograd.grad

    def counted(outputs, inputs, grad_outputs=None, **options):
        passes.append(bool(options.get("is_grads_batched")))
        return grad(outputs, inputs, grad_outputs, **options)

    monkeypatch.setattr(torch.autograd, "grad", counted)
    features, losses = _heads_losses(trunk, heads, x, stacked=True)
    cut = split(losses, torch.eye(3), shared, others)
    assert passes == [False]
    _, general_losses = _heads_losses(trunk, heads, x, stacked=False)
    general = split(general_losses, torch.eye(3), shared, others)
    assert True in passes[1:]  # the general route runs a batched pass
    monkeypatch.undo()
    per_task = torch.stack(
        [torch.autograd.grad(loss, features, retain_graph=True)[0] for loss in losses]
    )
    assert len(cut.boundary) == 1 and cut.boundary[0].node is features.grad_fn
    torch.testing.assert_close(cut.cotangents[0], per_task, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(general.cotangents[0], per_task, rtol=1e-12, atol=1e-14)
    heads_grads = torch.autograd.grad(losses.sum(), others, retain_graph=True)
    for p, g in zip(others, heads_grads, strict=True):
        torch.testing.assert_close(cut.own[p], g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(general.own[p], g, rtol=1e-12, atol=1e-14)
    expected = jacobian(losses, shared, batched=False, retain_graph=True)
    jacobians = through_shared(cut, shared, retain_graph=False)
    for got, want in zip(jacobians, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_one_pass_cut_runs_the_hooks_of_the_heads_nodes():
    trunk, heads, _ = _model()
    features = trunk(torch.randn(7, 4))
    outputs = [head(features) for head in heads]
    seen = []
    outputs[1].grad_fn.register_prehook(lambda grads: seen.append("pre") or None)
    outputs[1].grad_fn.register_hook(lambda inputs, grads: seen.append("post") or None)
    losses = torch.stack([out.pow(2).mean() for out in outputs])
    split(losses, torch.eye(3), list(trunk.parameters()), list(heads.parameters()))
    assert seen == ["pre", "post"]


def test_rows_other_than_one_per_loss_take_the_general_route():
    trunk, heads, _ = _model()
    x = torch.randn(7, 4)
    shared, others = list(trunk.parameters()), list(heads.parameters())
    features, losses = _heads_losses(trunk, heads, x, stacked=True)
    rows = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, -1.0]])
    cut = split(losses, rows, shared, others)
    per_task = torch.stack(
        [torch.autograd.grad(loss, features, retain_graph=True)[0] for loss in losses]
    )
    torch.testing.assert_close(cut.cotangents[0], torch.einsum("rk,k...->r...", rows, per_task))


@pytest.mark.parametrize("minimum", [0, 10**9])
def test_through_shared_in_passes_releases_the_boundary_and_gives_the_same_gradients(
    minimum: int, monkeypatch: pytest.MonkeyPatch
):
    # Above `SHARED_PASS_MIN` entries the rows go through in `SHARED_PASSES` passes (here of 3,
    # 3 and 1 rows), and `release` lets the boundary's gradients go before the parts are
    # joined: the gradients are those of one pass, and ``cut.cotangents`` is empty after.
    from jdoptim import _split

    monkeypatch.setattr(_split, "SHARED_PASS_MIN", minimum)
    calls: list[int] = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return grad(*args, **kwargs)

    x = torch.randn(6, 4)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(7))
    shared = list(trunk.parameters())
    features = trunk(x)
    losses = torch.stack([head(features).pow(2).mean() for head in heads])
    cut = split(losses, torch.eye(7), shared, list(heads.parameters()))
    expected = through_shared(cut, shared, retain_graph=True, chunk_size=7)
    monkeypatch.setattr(torch.autograd, "grad", counting)
    found = through_shared(cut, shared, retain_graph=False, release=True)
    assert len(calls) == (1 if minimum else _split.SHARED_PASSES)
    assert cut.cotangents == []
    for got, want in zip(found, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
