"""The Gramian engine's API: construction errors, use errors, hooks' lifetime, options."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as nnf

from jdoptim import MeanWeighting, UPGrad
from jdoptim.functional import jacobian
from jdoptim.gramian import GramianEngine, find_problems, gramian_backward, is_supported
from tests.gramian._reference import assert_close


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def per_sample_losses(model: nn.Module, B: int = 5) -> torch.Tensor:
    x, y = torch.randn(B, 3), torch.randint(0, 2, (B,))
    return nnf.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize(
    ("module", "batch_dim", "match"),
    [
        (nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)), 0, r"'1' \(BatchNorm1d\).*batch"),
        (nn.LSTM(2, 3), 0, r"\(root\) \(LSTM\) has batch_first=False"),
        (nn.GRU(2, 3, batch_first=True), 1, "batch_first=True"),
        (nn.TransformerEncoderLayer(4, 2), 0, r"'self_attn' \(MultiheadAttention\)"),
        (nn.Sequential(nn.Conv2d(1, 1, 1)), 1, r"'0' \(Conv2d\).*batch_dim=0"),
        (nn.Embedding(3, 2, sparse=True), 0, "sparse=True"),
        (nn.Embedding(3, 2, scale_grad_by_freq=True), 0, "scale_grad_by_freq"),
    ],
)
def test_refused_modules(module: nn.Module, batch_dim: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GramianEngine(module, batch_dim=batch_dim)
    assert find_problems(module, batch_dim=batch_dim)
    assert not is_supported(module, batch_dim=batch_dim)


def test_batch_norm_is_accepted_in_eval_mode_or_without_batch_dim() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    GramianEngine(model, batch_dim=None).close()
    model.eval()
    with GramianEngine(model) as engine:
        assert engine.supports
        model.train()
        with pytest.raises(ValueError, match="BatchNorm1d"):
            model(torch.randn(4, 2))


@pytest.mark.parametrize(
    ("modules", "batch_dim", "error"),
    [
        ([], 0, ValueError),
        ([nn.Linear(2, 2), "linear"], 0, TypeError),
        (nn.Linear(2, 2), -1, ValueError),
        (nn.Linear(2, 2), True, ValueError),
        (nn.Linear(2, 2), 0.0, ValueError),
    ],
)
def test_bad_arguments(modules, batch_dim, error) -> None:
    with pytest.raises(error):
        GramianEngine(modules, batch_dim=batch_dim)


def test_supports_and_fallback_modules() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.GRU(3, 3, batch_first=True))
    with GramianEngine(model) as engine:
        assert not engine.supports
        assert engine.fallback_modules == ["'1'"]
    assert is_supported(mlp())


def test_bad_losses_and_weights() -> None:
    model = mlp()
    with GramianEngine(model) as engine:
        with pytest.raises(TypeError, match="tensor"):
            engine.gramian([per_sample_losses(model)])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least one dimension"):
            engine.gramian(per_sample_losses(model).sum())
        with pytest.raises(ValueError, match="no grad_fn"):
            engine.gramian(torch.ones(3))
        with pytest.raises(RuntimeError, match="gramian"):
            engine.backward(torch.ones(5))
        engine.gramian(per_sample_losses(model))
        with pytest.raises(ValueError, match=r"shape \(5,\)"):
            engine.backward(torch.ones(4))


def test_losses_computed_before_the_engine_existed() -> None:
    model = mlp()
    losses = per_sample_losses(model)
    with GramianEngine(model) as engine, pytest.raises(ValueError, match="reach none"):
        engine.gramian(losses)


def test_input_without_the_batch_dimension() -> None:
    class Text(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(7, 4)
            self.positions = nn.Embedding(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.tokens(x) + self.positions(torch.arange(x.shape[1]))
            return self.head(h.mean(dim=1))

    model = Text()
    with GramianEngine(model) as engine:
        logits = model(torch.randint(0, 7, (5, 3)))
        losses = nnf.cross_entropy(logits, torch.zeros(5, dtype=torch.long), reduction="none")
        with pytest.raises(ValueError, match="'positions'"):
            engine.gramian(losses)


def test_hooked_parameter_used_outside_its_module() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + nnf.linear(x, self.a.weight)

    model = Leaky()
    with GramianEngine(model) as engine:
        losses = model(torch.randn(4, 3)).sum(dim=1)
        with pytest.raises(ValueError, match=r"module 'a' \(Linear"):
            engine.gramian(losses)


def test_input_modified_in_place() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[1].weight.requires_grad_(False)  # so that autograd itself does not object
    with GramianEngine(model) as engine:
        h = model[0](torch.randn(4, 3))
        out = model[1](h)
        h.mul_(2)
        with pytest.raises(ValueError, match="modified in place"):
            engine.gramian(out.squeeze(1))


def test_dropout_inside_a_fallback_module() -> None:
    attention = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)
    with GramianEngine(attention) as engine:
        x = torch.randn(3, 2, 4)
        out, _ = attention(x, x, x, need_weights=False)
        with pytest.raises(ValueError, match="dropout"):
            engine.gramian(out.sum(dim=(1, 2)))


def test_dropout_inside_a_module_replayed_one_sample_at_a_time() -> None:
    # torch.func cannot vectorise a GRU, so its per-sample gradients come from replays, which
    # would draw other dropout masks than the forward pass did.
    class Recurrent(nn.Module):
        def __init__(self, dropout: float) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 4, num_layers=2, dropout=dropout, batch_first=True)
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1]).squeeze(1)

    x = torch.randn(5, 4, 3)
    with_dropout = Recurrent(dropout=0.5)
    engine = GramianEngine(with_dropout)
    with (
        pytest.warns(UserWarning, match="one sample at a time"),
        pytest.raises(ValueError, match="draws random numbers"),
    ):
        engine.gramian(with_dropout(x) ** 2)
    with_dropout.eval()  # no dropout in eval mode: the replays are exact
    engine = GramianEngine(with_dropout)
    with pytest.warns(UserWarning, match="one sample at a time"):
        assert engine.gramian(with_dropout(x) ** 2).shape == (5, 5)


def test_hooks_are_removed_by_close_and_garbage_collection() -> None:
    model = mlp()
    engine = GramianEngine(model)
    assert all(len(m._forward_hooks) == 1 for m in (model[0], model[2]))
    engine.close()
    assert all(len(m._forward_hooks) == 0 for m in (model[0], model[2]))
    engine = GramianEngine(model)
    del engine
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in (model[0], model[2]))


def test_records_live_as_long_as_the_graph() -> None:
    model = mlp()
    with GramianEngine(model) as engine:
        out = model(torch.randn(4, 3))
        (entries,) = [value for value in out.grad_fn.metadata.values()]
        record = weakref.ref(entries[0][0])
        del entries
        assert record() is not None
        del out
        gc.collect()
        assert record() is None
        with torch.no_grad():
            out = model(torch.randn(4, 3))
        assert out.grad_fn is None
        assert engine._index == 2  # the two layers of the first forward only


def test_records_are_released_after_a_step() -> None:
    model = mlp()
    with GramianEngine(model) as engine:
        out = model(torch.randn(4, 3))
        (entries,) = [value for value in out.grad_fn.metadata.values()]
        record = weakref.ref(entries[0][0])
        del entries
        losses = (out**2).sum(dim=1)
        engine.backward(MeanWeighting()(engine.gramian(losses)))
        del losses, out
        gc.collect()
        assert record() is None


def test_retain_graph() -> None:
    model = mlp()
    with GramianEngine(model) as engine:
        losses = per_sample_losses(model)
        engine.backward(MeanWeighting()(engine.gramian(losses)))
        with pytest.raises(RuntimeError, match="second time"):
            losses.sum().backward()
        losses = per_sample_losses(model)
        engine.backward(MeanWeighting()(engine.gramian(losses, retain_graph=True)))
        losses.sum().backward()


def test_params_restricts_writes_and_grads_accumulate() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(6, 3)
    with GramianEngine(model[2]) as engine:
        for _ in range(2):  # two micro-batches: gradients add up
            losses = (model(x) ** 2).sum(dim=1)
            engine.gramian(losses)
            engine.backward(torch.ones(6), params=[model[0].weight, model[2].bias])
    expected = torch.autograd.grad((model(x) ** 2).sum(), [model[0].weight, model[2].bias])
    assert model[0].bias.grad is None and model[2].weight.grad is None
    assert_close(model[0].weight.grad, 2 * expected[0], "trunk weight", rtol=1e-5)
    assert_close(model[2].bias.grad, 2 * expected[1], "head bias", rtol=1e-5)


def test_gramian_backward_and_mixed_dtypes() -> None:
    model = mlp()
    params = list(model.parameters())
    with GramianEngine(model) as engine:
        losses = per_sample_losses(model).double()
        jacobians = jacobian(losses, params, retain_graph=True)
        J = torch.cat([j.reshape(5, -1) for j in jacobians], dim=1).double()
        G = engine.gramian(losses)
        assert G.dtype == torch.float64
        assert_close(G, J @ J.T, "Gramian", rtol=1e-6)
        weights = UPGrad().weighting(G)
        engine.backward(weights)
    assert weights.dtype == torch.float64
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    update = torch.cat([p.grad.reshape(-1) for p in params]).double()
    assert_close(update, weights @ J, "update", rtol=1e-6)


def test_gramian_backward_returns_the_weights() -> None:
    model = mlp()
    with GramianEngine(model) as engine:
        weights = gramian_backward(per_sample_losses(model), engine, MeanWeighting())
    assert_close(weights, torch.full((5,), 0.2), "weights")


def test_mean_weighting_matches_autograd_in_float32() -> None:
    model = mlp()
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    with GramianEngine(model) as engine:
        losses = nnf.cross_entropy(model(x), y, reduction="none")
        gramian_backward(losses, engine, MeanWeighting())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    nnf.cross_entropy(model(x), y).backward()
    for grad, p in zip(grads, model.parameters(), strict=True):
        assert_close(grad, p.grad, "mean gradient", rtol=1e-6)


def test_training_loop_reduces_the_losses() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(8, 3)
    y = x.sum(dim=1, keepdim=True).sin()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    weighting = UPGrad().weighting
    with GramianEngine(model) as engine:
        initial = ((model(x) - y) ** 2).squeeze(1).detach()
        for _ in range(30):
            optimizer.zero_grad()
            gramian_backward(((model(x) - y) ** 2).squeeze(1), engine, weighting)
            optimizer.step()
        final = ((model(x) - y) ** 2).squeeze(1).detach()
    assert final.mean() < 0.5 * initial.mean()
