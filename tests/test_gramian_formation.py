"""Gramians formed from float32 and half-precision Jacobians at extreme scales: every place that
forms one (aggregators, the functional API, diagnostics, jacobian and gramian mode) gives the
update of the same Jacobian in float64, scaled back, and UPGrad's update does not conflict."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.optim import SGD

from jdoptim import MGDA, DualProj, JDOptimizer, Mean, UPGrad
from jdoptim.aggregation import GramianWeightedAggregator
from jdoptim.diagnostics import diagnose
from jdoptim.functional import aggregate, jacobian
from jdoptim.gramian import GramianEngine
from jdoptim.linalg import gramian

METHODS = [UPGrad, DualProj, MGDA, Mean]
SCALES = [1e20, 1e-20]
HALF = [torch.bfloat16, torch.float16]


def _jacobian(scale: float | str, seed: int = 0) -> Tensor:
    """``randn(5, 7)`` in float32 times ``scale``; ``"span"``: rows scaled from 1e-20 to 1e20."""
    J = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed))
    if scale == "span":
        return J * torch.logspace(-20, 20, 5)[:, None]
    return J * scale


def _exact_gramian(J: Tensor) -> Tensor:
    J64 = J.double()
    return J64 @ J64.T


def _worst_cosine(J: Tensor, update: Tensor) -> float:
    J64, d = J.double(), update.double()
    return ((J64 @ d) / (J64.norm(dim=1) * d.norm())).min().item()


def _assert_close_update(update: Tensor, reference: Tensor, dtype: torch.dtype) -> None:
    """Within rounding of ``dtype`` (float32: 2e-3 relative, as issue's bound; half precision:
    a few units of its eps, from rounding the update itself)."""
    assert update.dtype == dtype and torch.isfinite(update).all()
    tolerance = 2e-3 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    error = (update.double() - reference).norm() / reference.norm()
    assert error <= tolerance, error


@pytest.mark.parametrize("scale", [*SCALES, "span", 1.0])
def test_gramian_is_exact_at_any_float32_scale(scale):
    J = _jacobian(scale)
    G, exact = gramian(J), _exact_gramian(J)
    norms = exact.diagonal().sqrt()
    assert torch.isfinite(G).all()
    relative = (G.double() - exact).abs() / torch.outer(norms, norms)
    assert relative.max() <= 8 * J.shape[1] * torch.finfo(torch.float32).eps


def test_gramian_stays_in_the_input_dtype_in_the_normal_case():
    for dtype in (torch.float32, torch.float64):
        J = _jacobian(1.0).to(dtype)
        assert gramian(J).dtype == dtype
        assert UPGrad()._weighting_input(J).dtype == dtype


@pytest.mark.parametrize("scale", [*SCALES, "span"])
def test_out_of_range_float32_gramian_is_formed_in_float64(scale):
    assert gramian(_jacobian(scale)).dtype == torch.float64


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_gramian_is_formed_in_float32(dtype):
    J = _jacobian(1.0).to(dtype)
    G = gramian(J)
    assert G.dtype == torch.float32
    torch.testing.assert_close(G.double(), _exact_gramian(J), rtol=1e-6, atol=1e-6)


def test_bfloat16_gramian_out_of_float32_range_is_formed_in_float64():
    J = _jacobian(1e20).to(torch.bfloat16)
    G = gramian(J)
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, _exact_gramian(J), rtol=1e-6, atol=0.0)


def test_gramian_of_float64_is_formed_as_it_is():
    J = _jacobian(1.0).double() * 1e100
    assert torch.equal(gramian(J), J @ J.T)


def test_gramian_of_zero_rows_and_empty_matrices():
    J = torch.zeros(3, 4)
    J[1] = 1e-30
    G = gramian(J)
    assert G.dtype == torch.float64 and G[1, 1] == pytest.approx(4e-60, rel=1e-6)
    assert G[0].abs().sum() == 0 and G[2].abs().sum() == 0
    assert gramian(torch.zeros(3, 0)).shape == (3, 3)


def test_gramian_rejects_what_is_not_a_floating_matrix():
    with pytest.raises(TypeError, match="floating-point tensor"):
        gramian(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D matrix"):
        gramian(torch.ones(2, 2, 2))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [*SCALES, "span"])
def test_aggregators_on_extreme_float32_scales(method, scale):
    J = _jacobian(scale)
    update = method()(J)
    _assert_close_update(update, method()(J.double()), torch.float32)
    if method in (UPGrad, DualProj, MGDA):
        assert _worst_cosine(J, update) >= -1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", SCALES)
def test_aggregators_scale_with_the_jacobian(method, scale):
    J = _jacobian(1.0)
    update = method()(J * scale).double() / scale
    _assert_close_update(update.float(), method()(J.double()), torch.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", HALF)
def test_aggregators_on_half_precision(method, dtype):
    J = _jacobian(1.0).to(dtype)
    update = method()(J)
    _assert_close_update(update, method()(J.double()), dtype)
    if method is UPGrad:
        # The update is exact in float32 before its rounding to the input's dtype.
        assert _worst_cosine(J, update) >= -4 * torch.finfo(dtype).eps


def test_weights_meet_the_jacobian_in_the_dtype_of_the_gramian():
    J = _jacobian(1e20)
    seen = []
    aggregator = UPGrad()
    aggregator.weighting.register_forward_hook(lambda module, args, out: seen.append(out))
    aggregator(J)
    assert seen[0].dtype == torch.float64


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [*SCALES, "span"])
def test_functional_aggregate(method, scale):
    J = _jacobian(scale)
    first, second = aggregate([J[:, :3], J[:, 3:].reshape(5, 2, 2)], method())
    update = torch.cat([first, second.reshape(-1)])
    _assert_close_update(update, method()(J.double()), torch.float32)


@pytest.mark.parametrize("scale", [*SCALES, "span"])
def test_diagnostics_are_finite_and_exact(scale):
    J = _jacobian(scale)
    update = UPGrad()(J)
    report = diagnose(J, update)
    exact = diagnose(J.double(), update.double())
    for name in ("gradient_norms", "cosine_similarities", "alignments"):
        value = getattr(report, name)
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(value.double(), getattr(exact, name), rtol=1e-5, atol=1e-6)
    assert not report.update_conflicts


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _losses(model: nn.Module, scale: float) -> Tensor:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, generator=generator), torch.randn(6, 3, generator=generator)
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean(dim=1) * scale


def _step_grads(method, mode: str, scale: float, dtype=torch.float32) -> tuple[list, object]:
    model = _model().to(dtype)
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.0),
        method(),
        mode=mode,
        modules=model if mode == "gramian" else None,
        diagnostics=True,
    )
    optimizer.backward(_losses(model, scale))
    return [p.grad for p in model.parameters()], optimizer.last_diagnostics


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", SCALES)
def test_optimizer_on_extreme_loss_scales(mode, method, scale):
    grads, report = _step_grads(method, mode, scale)
    reference, _ = _step_grads(method, "jacobian", 1.0, torch.float64)
    update = torch.cat([g.reshape(-1) for g in grads]).double() / scale
    expected = torch.cat([g.reshape(-1) for g in reference])
    _assert_close_update(update.float(), expected, torch.float32)
    assert torch.isfinite(report.cosine_similarities).all()
    if method is UPGrad:
        assert not report.update_conflicts
        assert report.alignments.min() >= -1e-5


@pytest.mark.parametrize("scale", [*SCALES, 1.0])
def test_gramian_mode_forms_the_gramian_in_float64_only_out_of_range(scale):
    model = _model()
    with GramianEngine(model) as engine:
        G = engine.gramian(_losses(model, scale))
        engine.reset()
    assert G.dtype == (torch.float32 if scale == 1.0 else torch.float64)
    params = list(model.parameters())
    J = torch.cat([j.flatten(1) for j in jacobian(_losses(model, scale), params)], dim=1)
    exact = _exact_gramian(J)
    norms = exact.diagonal().sqrt()
    assert ((G.double() - exact).abs() / torch.outer(norms, norms)).max() <= 1e-5


def test_gramian_weighted_aggregator_hands_the_true_gramian_to_its_weighting():
    J = _jacobian(1e20)
    seen = []
    aggregator = GramianWeightedAggregator(UPGrad().weighting)
    aggregator.weighting.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    aggregator(J)
    torch.testing.assert_close(seen[0], _exact_gramian(J), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", HALF)
def test_gramian_mode_forms_half_precision_gramians_in_float32(dtype):
    model = _model().to(dtype)
    with GramianEngine(model) as engine:
        G = engine.gramian(_losses(model, 1.0))
        engine.reset()
    assert G.dtype == torch.float32
    params = list(model.parameters())
    J = torch.cat([j.flatten(1) for j in jacobian(_losses(model, 1.0), params)], dim=1)
    torch.testing.assert_close(G.double(), _exact_gramian(J), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_weights_beyond_float32_range_on_a_subnormal_gradient(mode: str):
    # Sample 1's gradient (about 1e-41, subnormal in float32) conflicts with sample 0's: the
    # exact projection of sample 0's gradient puts a weight near 1e41 on it, out of float32's
    # range, for an update component of order 1. The update must be that of the float64
    # computation on the same float32 values, with no conflict.
    # The small factor is the loss's (the layer's output gradient), as for a sample classified
    # with a large margin.
    x = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    factors = torch.tensor([1.0, 1e-41])
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=1.0), UPGrad(), mode=mode, modules=model)
    optimizer.step(model(x).squeeze(1) * factors)
    update = model.weight.grad.squeeze(0).double()
    J = x.double() * factors.double().unsqueeze(1)
    expected = UPGrad()(J)
    assert torch.isfinite(update).all()
    torch.testing.assert_close(update, expected, rtol=1e-6, atol=0)
    assert bool((J @ update >= 0).all())
