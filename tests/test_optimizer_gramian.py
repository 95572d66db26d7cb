"""JDOptimizer in gramian mode: the same step as jacobian mode, without the Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import SGD

import jdoptim
from jdoptim import JDOptimizer, Mean, NonFiniteError, UPGrad

pytestmark = pytest.mark.usefixtures("float64")


def _mlp(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, outputs)
    )


def _data(batch: int = 12):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 5, generator=generator), torch.randn(batch, 3, generator=generator)


def _per_sample(model, x, y):
    return ((model(x) - y) ** 2).mean(dim=1)  # [B]


def _per_sample_and_task(model, x, y):
    return (model(x) - y) ** 2  # [B, T]


def _task(model, x, y):
    return ((model(x) - y) ** 2).mean(dim=0)  # [T]


@pytest.mark.parametrize("losses", [_per_sample, _per_sample_and_task, _task])
@pytest.mark.parametrize("aggregator", [UPGrad, Mean])
def test_gramian_mode_steps_like_jacobian_mode(losses, aggregator):
    x, y = _data()
    gramian_model, jacobian_model = _mlp(), _mlp()
    gramian = JDOptimizer(
        SGD(gramian_model.parameters(), lr=0.1), aggregator(), mode="gramian", modules=gramian_model
    )
    jacobian = JDOptimizer(SGD(jacobian_model.parameters(), lr=0.1), aggregator())
    assert gramian.resolved_mode == "gramian" and jacobian.resolved_mode == "jacobian"
    for _ in range(3):
        gramian.zero_grad()
        gramian.backward(losses(gramian_model, x, y))
        jacobian.zero_grad()
        jacobian.backward(losses(jacobian_model, x, y))
        for a, b in zip(gramian_model.parameters(), jacobian_model.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        gramian.step()
        jacobian.step()


def test_auto_mode_chooses_gramian_only_where_it_applies():
    model = _mlp()

    def resolved(aggregator, **options):
        optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), aggregator, mode="auto", **options)
        return optimizer.resolved_mode

    assert resolved(UPGrad(), modules=model) == "gramian"
    assert resolved(UPGrad()) == "jacobian"  # no model to hook
    assert resolved(jdoptim.build("config"), modules=model) == "jacobian"  # needs J
    assert resolved(UPGrad(), modules=model, shared_params=model[0]) == "gramian"
    with_batch_norm = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    assert resolved(UPGrad(), modules=with_batch_norm) == "jacobian"  # mixes samples


def test_gramian_mode_refuses_what_it_cannot_do():
    model = _mlp()
    sgd = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="needs a Gramian-based aggregator"):
        JDOptimizer(sgd, jdoptim.build("config"), mode="gramian", modules=model)
    with pytest.raises(ValueError, match="pass modules=model"):
        JDOptimizer(sgd, UPGrad(), mode="gramian")
    batch_norm = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="BatchNorm"):
        JDOptimizer(
            SGD(batch_norm.parameters(), lr=0.1), UPGrad(), mode="gramian", modules=batch_norm
        )
    optimizer = JDOptimizer(sgd, UPGrad(), mode="gramian", modules=model)
    x, y = _data()
    with pytest.raises(ValueError, match="accumulate micro-batches with mode='jacobian'"):
        optimizer.backward(_per_sample(model, x, y), aggregate=False)


def test_non_finite_losses_in_gramian_mode_change_nothing():
    x, y = _data()
    model = _mlp()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), mode="gramian", modules=model
    )
    before = [p.detach().clone() for p in model.parameters()]
    bad = _per_sample(model, x, y) * torch.cat([torch.ones(11), torch.tensor([float("nan")])])
    with pytest.raises(NonFiniteError, match=r"indices \[11\]"):
        optimizer.step(bad)
    assert all(p.grad is None for p in model.parameters())
    optimizer.nonfinite = "skip"
    with pytest.warns(UserWarning, match="Skipping"):
        optimizer.step(_per_sample(model, x, y) * float("inf"))
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    optimizer.zero_grad()
    optimizer.step(_per_sample(model, x, y))  # the engine still works after refusals
    assert all(p.grad is not None for p in model.parameters())


def test_gramian_mode_diagnostics_match_jacobian_mode():
    x, y = _data()
    reports = []
    for mode in ("gramian", "jacobian"):
        model = _mlp()
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.1), UPGrad(), mode=mode, modules=model, diagnostics=True
        )
        optimizer.backward(_per_sample(model, x, y))
        reports.append(optimizer.last_diagnostics)
    for field in ("weights", "gradient_norms", "cosine_similarities", "alignments", "update_norm"):
        torch.testing.assert_close(getattr(reports[0], field), getattr(reports[1], field))
    assert int(reports[0].conflicting_pairs) == int(reports[1].conflicting_pairs)


def test_gramian_mode_with_a_grad_scaler_matches_the_unscaled_step():
    x, y = _data()
    scaled_model, model = _mlp(), _mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    scaled = JDOptimizer(
        SGD(scaled_model.parameters(), lr=0.1),
        UPGrad(),
        mode="gramian",
        modules=scaled_model,
        scaler=scaler,
    )
    scaled.backward(scaler.scale(_per_sample(scaled_model, x, y)))
    scaler.step(scaled)
    scaler.update()
    plain = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad(), mode="gramian", modules=model)
    plain.step(_per_sample(model, x, y))
    for a, b in zip(scaled_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_from_config_takes_the_model_as_an_object():
    model = _mlp()
    optimizer = JDOptimizer.from_config(
        SGD(model.parameters(), lr=0.1),
        {"aggregator": "upgrad", "mode": "auto", "batch_dim": 0},
        modules=model,
    )
    assert optimizer.resolved_mode == "gramian"
    assert optimizer.to_config()["batch_dim"] == 0
    with pytest.raises(TypeError, match="Unknown arguments"):
        JDOptimizer.from_config(SGD(model.parameters(), lr=0.1), {"aggregator": "upgrad"}, lr=1)
