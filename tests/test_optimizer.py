from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.optim import SGD, Adam

import jdoptim
from jdoptim import JDOptimizer, Mean, NonFiniteError, UPGrad
from jdoptim.functional import jacobian


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 3, generator=generator)


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)  # one loss per output: m = 3


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return params, grads, copy.deepcopy(optimizer.state_dict())


def _assert_same_snapshot(first, second):
    for a, b in zip(first[0], second[0], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first[1], second[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert str(first[2]) == str(second[2])


pytestmark = pytest.mark.usefixtures("float64")


def test_mean_aggregator_is_sgd_on_the_mean_loss():
    x, y = _data()
    jd_model, sgd_model = _model(), _model()
    jd = JDOptimizer(SGD(jd_model.parameters(), lr=0.1, momentum=0.9), Mean())
    sgd = SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(5):
        jd.zero_grad()
        jd.step(_losses(jd_model, x, y))
        sgd.zero_grad()
        _losses(sgd_model, x, y).mean().backward()
        sgd.step()
    for a, b in zip(jd_model.parameters(), sgd_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_step_equals_jacobian_by_hand_then_aggregator_then_sgd():
    x, y = _data()
    model, reference = _model(), _model()
    aggregator = UPGrad()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.05), aggregator)
    optimizer.step(_losses(model, x, y)[:2])

    losses = _losses(reference, x, y)[:2]
    params = list(reference.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    update = aggregator(torch.stack(rows))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector(params) - 0.05 * update, params
        )
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_upgrad_step_decreases_every_loss_with_a_small_learning_rate():
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=1e-3), UPGrad())
    for _ in range(3):
        before = _losses(model, x, y)
        optimizer.zero_grad()
        optimizer.step(before)
        assert (_losses(model, x, y) < before).all()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 10])
def test_chunked_and_per_loss_jacobians_match_the_batched_one(chunk_size):
    x, y = _data()
    batched, chunked = _model(), _model()
    JDOptimizer(SGD(batched.parameters(), lr=0.1), UPGrad()).backward(_losses(batched, x, y))
    optimizer = JDOptimizer(SGD(chunked.parameters(), lr=0.1), UPGrad(), chunk_size=chunk_size)
    optimizer.backward(_losses(chunked, x, y))
    for a, b in zip(batched.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "losses",
    [
        lambda m, x, y: _losses(m, x, y),
        lambda m, x, y: list(_losses(m, x, y)),
        lambda m, x, y: ((m(x) - y) ** 2)[:4],  # a [batch, tasks] tensor, flattened to 12
    ],
    ids=["vector", "sequence", "matrix"],
)
def test_losses_may_be_a_vector_a_sequence_or_any_shape(losses):
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), Mean())
    optimizer.backward(losses(model, x, y))
    reference = _model()
    value = losses(reference, x, y)
    vector = torch.stack(value) if isinstance(value, list) else value
    vector.mean().backward()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_backward_accumulates_into_grad_like_autograd():
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad())
    optimizer.backward(_losses(model, x, y))
    once = [p.grad.clone() for p in model.parameters()]
    optimizer.backward(_losses(model, x, y))
    for grad, p in zip(once, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 2 * grad)


def test_parameters_no_loss_reaches_keep_grad_none_and_frozen_ones_are_ignored():
    model = _model()
    unused = nn.Parameter(torch.ones(3))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    optimizer = JDOptimizer(SGD([*model.parameters(), unused, frozen], lr=0.1), UPGrad())
    x, y = _data()
    optimizer.step(_losses(model, x, y))
    assert unused.grad is None and frozen.grad is None
    assert torch.equal(unused, torch.ones(3))
    assert all(p.grad is not None for p in model.parameters())


def test_wrapper_shares_param_groups_and_state_and_schedulers_drive_the_inner_lr():
    model = _model()
    inner = Adam(model.parameters(), lr=0.1)
    optimizer = JDOptimizer(inner, UPGrad())
    assert optimizer.param_groups is inner.param_groups
    assert optimizer.defaults is inner.defaults
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            optimizer.zero_grad()
            optimizer.step(_losses(model, x, y))
            scheduler.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    assert optimizer.state is inner.state and len(inner.state) == 4


def test_step_without_losses_delegates_and_step_hooks_run():
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad())
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    x, y = _data()
    optimizer.backward(_losses(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert calls == ["pre", "post"]
    for old, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), old - 0.1 * p.grad)


def test_state_dict_round_trip_resumes_bit_exactly():
    x, y = _data()

    def run(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            optimizer.step(_losses(model, x, y))

    model = _model()
    optimizer = JDOptimizer(Adam(model.parameters(), lr=0.01), jdoptim.Random(seed=4))
    run(model, optimizer, 3)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict()})
    assert checkpoint["opt"]["jdoptim"]["aggregator"] == {"name": "random", "seed": 4}
    run(model, optimizer, 3)

    resumed = _model(seed=9)
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = JDOptimizer(Adam(resumed.parameters(), lr=0.01), jdoptim.Random(seed=4))
    resumed_optimizer.load_state_dict(checkpoint["opt"])
    run(resumed, resumed_optimizer, 3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loading_a_state_saved_with_another_aggregator_raises_before_changing_anything():
    model = _model()
    state = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad()).state_dict()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.5), Mean())
    with pytest.raises(ValueError, match=r"saved with the aggregator .*'upgrad'"):
        optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] == 0.5
    # A plain torch state dict loads too.
    optimizer.load_state_dict(SGD(model.parameters(), lr=0.2).state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.2


def test_from_config_and_to_config_round_trip():
    model = _model()
    config = {"aggregator": {"name": "upgrad", "reg_eps": 0.01}, "mode": "auto", "chunk_size": 2}
    optimizer = JDOptimizer.from_config(SGD(model.parameters(), lr=0.1), config)
    assert isinstance(optimizer.aggregator, UPGrad)
    assert optimizer.mode == "auto" and optimizer.chunk_size == 2
    assert optimizer.to_config()["aggregator"]["reg_eps"] == 0.01
    again = JDOptimizer.from_config(SGD(model.parameters(), lr=0.1), optimizer.to_config())
    assert repr(again) == repr(optimizer)
    with pytest.raises(ValueError, match=r"Unknown JDOptimizer config keys \['lr'\]"):
        JDOptimizer.from_config(SGD(model.parameters(), lr=0.1), {"aggregator": "mean", "lr": 1})
    with pytest.raises(ValueError, match="needs an 'aggregator' key"):
        JDOptimizer.from_config(SGD(model.parameters(), lr=0.1), {"mode": "auto"})
    with pytest.raises(TypeError, match="not an Aggregator"):
        JDOptimizer.from_config(SGD(model.parameters(), lr=0.1), {"aggregator": "meanweighting"})


def test_repr_shows_the_inner_optimizer_and_the_aggregator():
    text = repr(JDOptimizer(SGD(_model().parameters(), lr=0.1), UPGrad()))
    assert text.startswith("JDOptimizer(\n  optimizer=SGD (")
    assert "aggregator=UPGrad(pref_vector=None" in text


def test_the_optimizer_pickles_and_deep_copies():
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad())
    clone = pickle.loads(pickle.dumps(optimizer))
    assert repr(clone) == repr(optimizer)
    assert copy.deepcopy(optimizer).aggregator is not optimizer.aggregator


class _NoVmap(torch.autograd.Function):
    """Data-dependent control flow in backward: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 if grad.abs().sum() >= 0 else grad


def test_graphs_vmap_cannot_batch_fall_back_to_one_backward_per_loss():
    x, y = _data()
    model, reference = _model(), _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad(), chunk_size=3)
    with pytest.warns(UserWarning, match="one backward pass per loss"):
        optimizer.step(((_NoVmap.apply(model(x)) - y) ** 2).mean(dim=0))
    optimizer.zero_grad()
    optimizer.step(((_NoVmap.apply(model(x)) - y) ** 2).mean(dim=0))  # no second warning

    reference_optimizer = JDOptimizer(SGD(reference.parameters(), lr=0.1), UPGrad())
    for _ in range(2):
        losses = ((_NoVmap.apply(reference(x)) - y) ** 2).mean(dim=0)
        params = list(reference.parameters())
        J = torch.cat([j.reshape(3, -1) for j in jacobian(losses, params, batched=False)], 1)
        reference_optimizer.zero_grad()
        for p, g in zip(params, torch.split(UPGrad()(J), [p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p)
        reference_optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --- bad input: a clear error, and nothing changed -------------------------------------------


def _prepared():
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(Adam(model.parameters(), lr=0.1), UPGrad())
    optimizer.step(_losses(model, x, y))  # creates Adam state and .grad
    return model, optimizer, x, y


@pytest.mark.parametrize(
    ("make_losses", "error", "match"),
    [
        (lambda m, x, y: torch.zeros(0, requires_grad=True), ValueError, "empty"),
        (lambda m, x, y: [], ValueError, "empty"),
        (lambda m, x, y: _losses(m, x, y).sum(), ValueError, "0-d"),
        (lambda m, x, y: torch.ones(3, requires_grad=False), ValueError, "do not require grad"),
        (
            lambda m, x, y: torch.ones(3, requires_grad=True) * 2,
            ValueError,
            "None of the 4 parameters",
        ),
        (lambda m, x, y: "losses", TypeError, "got str"),
        (lambda m, x, y: [1.0, 2.0], TypeError, "sequence of float"),
        (lambda m, x, y: [_losses(m, x, y)], ValueError, "one-element tensors"),
        (
            lambda m, x, y: _losses(m, x, y) * torch.tensor([1.0, float("inf"), 1.0]),
            NonFiniteError,
            r"indices \[1\]",
        ),
        (
            lambda m, x, y: torch.stack([_losses(m, x, y)[0], (m(x) * 0).sum().sqrt()]),
            NonFiniteError,
            "Jacobian is not finite",
        ),
    ],
    ids=[
        "empty",
        "empty-sequence",
        "0-d",
        "no-grad",
        "not-connected",
        "string",
        "floats",
        "non-scalar-items",
        "inf-loss",
        "nan-jacobian",
    ],
)
def test_bad_losses_raise_and_change_nothing(make_losses, error, match):
    model, optimizer, x, y = _prepared()
    before = _snapshot(model, optimizer)
    with pytest.raises(error, match=match):
        optimizer.step(make_losses(model, x, y))
    _assert_same_snapshot(before, _snapshot(model, optimizer))


def test_skip_policy_warns_and_leaves_everything_unchanged():
    model, optimizer, x, y = _prepared()
    optimizer.nonfinite = "skip"
    before = _snapshot(model, optimizer)
    with pytest.warns(UserWarning, match="Skipping the step: losses at indices"):
        assert optimizer.step(_losses(model, x, y) * float("nan")) is None
    _assert_same_snapshot(before, _snapshot(model, optimizer))
    # A skipped backward also cancels the following step().
    with pytest.warns(UserWarning, match="Skipping"):
        optimizer.backward(_losses(model, x, y) * float("inf"))
    optimizer.step()
    _assert_same_snapshot(before, _snapshot(model, optimizer))


def test_a_non_finite_update_from_the_aggregator_is_refused():
    class Broken(jdoptim.Aggregator):
        def _aggregate(self, matrix):
            return matrix.sum(dim=0) * float("nan")

    model, optimizer, x, y = _prepared()
    optimizer.aggregator = Broken()
    before = _snapshot(model, optimizer)
    with pytest.raises(NonFiniteError, match=r"Broken.*non-finite update"):
        optimizer.step(_losses(model, x, y))
    _assert_same_snapshot(before, _snapshot(model, optimizer))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer": "sgd"}, TypeError, "Expected a torch.optim.Optimizer"),
        ({"aggregator": jdoptim.MeanWeighting()}, TypeError, "Expected a jdoptim Aggregator"),
        ({"aggregator": torch.mean}, TypeError, "Expected a jdoptim Aggregator"),
        ({"mode": "gramain"}, ValueError, "Invalid mode value: 'gramain'"),
        ({"chunk_size": 0}, ValueError, "Invalid chunk_size value: 0"),
        ({"nonfinite": "ignore"}, ValueError, "Invalid nonfinite value: 'ignore'"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    arguments = {"optimizer": SGD(_model().parameters(), lr=0.1), "aggregator": UPGrad()}
    arguments.update(kwargs)
    optimizer = arguments.pop("optimizer")
    aggregator = arguments.pop("aggregator")
    with pytest.raises(error, match=match):
        JDOptimizer(optimizer, aggregator, **arguments)


def test_wrapping_a_jdoptimizer_is_refused():
    inner = JDOptimizer(SGD(_model().parameters(), lr=0.1), UPGrad())
    with pytest.raises(TypeError, match="not a JDOptimizer"):
        JDOptimizer(inner, UPGrad())


def test_closure_for_optimizers_that_reevaluate():
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), UPGrad())

    def closure():
        optimizer.zero_grad()
        return _losses(model, x, y)

    first = _losses(model, x, y).detach()
    value = optimizer.step(closure=closure)
    assert value == pytest.approx(first.sum().item())
    assert (_losses(model, x, y) < first).all()
    with pytest.raises(ValueError, match="either losses or a closure"):
        optimizer.step(_losses(model, x, y), closure=closure)


def test_a_closure_returning_none_only_steps_as_lightning_expects():
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad())
    optimizer.backward(_losses(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.step(closure=lambda: None) is None
    for old, p in zip(before, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), old - 0.1 * p.grad)
