"""JDOptimizer hands the methods that need them the values of the losses (unscaled, reduced over
micro-batches), the layout of the Jacobian's columns and the heads' weights, and reports what
they learn in the diagnostics."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.optim import SGD

import jdoptim
from jdoptim import DBMTL, IMTL, GradNorm, GradVac, JDOptimizer, MoCo, UPGrad

pytestmark = pytest.mark.usefixtures("float64")

M = 3


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(M))

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def _data(step: int, batch: int = 16) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(batch, 4, generator=generator), torch.randn(batch, M, generator=generator)


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).mean(dim=0) + 0.1


METHODS = {
    "gradnorm": lambda: GradNorm(lr=0.05),
    "dbmtl": DBMTL,
    "moco-libmtl": lambda: MoCo(normalization="loss", weight_update="softmax"),
    "imtl": lambda: IMTL(lr=0.1),
    "mgda-loss": lambda: jdoptim.MGDA(normalization="loss+"),
}


@pytest.mark.parametrize("make", list(METHODS.values()), ids=list(METHODS))
def test_a_grad_scaler_changes_nothing(make):
    def run(scaled: bool) -> list[Tensor]:
        model = _Net()
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaled else None
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.05), make(), shared_params=model.trunk, scaler=scaler
        )
        for step in range(3):
            optimizer.zero_grad()
            losses = _losses(model, *_data(step))
            if scaler is None:
                optimizer.step(losses)
            else:
                optimizer.backward(scaler.scale(losses))
                scaler.step(optimizer)
                scaler.update()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gradnorm", "imtl", "moco-libmtl", "mgda-loss"])
def test_summed_micro_batches_are_one_step_on_the_whole_batch(name: str):
    def run(micro_batches: int) -> list[Tensor]:
        model = _Net()
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.05), METHODS[name](), shared_params=model.trunk
        )
        for step in range(3):
            x, y = _data(step)
            optimizer.zero_grad()
            size = len(x) // micro_batches
            for k in range(micro_batches):
                part = slice(k * size, (k + 1) * size)
                losses = ((model(x[part]) - y[part]) ** 2).mean(dim=0) / micro_batches
                optimizer.backward(losses + 0.1 / micro_batches, aggregate=k == micro_batches - 1)
            optimizer.step()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(2), run(1), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_heads_receive_the_methods_head_weights():
    model = _Net()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), DBMTL(), shared_params=model.trunk)
    losses = _losses(model, *_data(0))
    optimizer.backward(losses)
    heads = list(model.heads.parameters())
    expected = torch.autograd.grad(torch.log(_losses(model, *_data(0)) + 1e-8).sum(), heads)
    for p, g in zip(heads, expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_diagnostics_report_the_method_state_in_gramian_mode_too():
    model = _Net()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1),
        GradNorm(lr=0.05),
        mode="gramian",
        modules=model,
        batch_dim=None,
        diagnostics=True,
    )
    optimizer.step(_losses(model, *_data(0)))
    report = optimizer.last_diagnostics
    torch.testing.assert_close(report.weights, torch.ones(M))
    torch.testing.assert_close(
        report.method_state["loss_weights"], optimizer.aggregator.weighting.loss_weights
    )
    plain = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad(), diagnostics=True)
    plain.step(_losses(model, *_data(1)))
    assert plain.last_diagnostics.method_state == {}


def test_a_method_that_needs_the_columns_is_refused_in_gramian_mode_even_by_assignment():
    model = _Net()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), mode="gramian", modules=model, batch_dim=None
    )
    with pytest.raises(TypeError, match="needs the Jacobian's columns"):
        optimizer.aggregator = GradVac(granularity="layer")
    with pytest.raises(ValueError, match="needs the Jacobian"):
        JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            GradNorm(lr=0.1, layer=-1),
            mode="gramian",
            modules=model,
        )
    optimizer.aggregator = GradNorm(lr=0.1)  # norms over every parameter: from the Gramian


@pytest.mark.parametrize("make", list(METHODS.values()), ids=list(METHODS))
def test_a_non_finite_loss_is_skipped_under_the_skip_policy(make):
    model = _Net()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.05), make(), shared_params=model.trunk, nonfinite="skip"
    )
    optimizer.step(_losses(model, *_data(0)))
    state = repr(optimizer.aggregator.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    losses = _losses(model, *_data(1)) * torch.tensor([1.0, float("nan"), 1.0])
    with pytest.warns(UserWarning, match="Skipping the step: losses at indices \\[1\\]"):
        optimizer.step(losses)
    assert repr(optimizer.aggregator.state_dict()) == state
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["gradnorm", "imtl", "mgda-loss"])
def test_multi_task_gramian_mode_steps_like_jacobian_mode(name: str):
    def run(mode: str) -> list[Tensor]:
        model = _Net()
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.05),
            METHODS[name](),
            shared_params=model.trunk,
            mode=mode,
            modules=model,
        )
        assert optimizer.resolved_mode == mode
        for step in range(3):
            optimizer.zero_grad()
            optimizer.step(_losses(model, *_data(step)))
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run("gramian"), run("jacobian"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
