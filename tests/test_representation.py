"""rep_grad=True: Jacobian descent on the gradients with respect to the shared representation,
checked against the same computation done by hand with autograd."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.optim import SGD

import jdoptim
from jdoptim import JDOptimizer, Mean, NonFiniteError, UPGrad

pytestmark = pytest.mark.usefixtures("float64")

M = 3


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(M))

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def _data(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(12, 4, generator=generator)
    return x, torch.randn(12, M, generator=generator) * torch.tensor([1.0, 3.0, 0.5])


def _losses(model: nn.Module, step: int) -> Tensor:
    x, y = _data(step)
    return ((model(x) - y) ** 2).mean(dim=0)


def _by_hand(model: _Net, step: int, aggregate) -> dict[str, Tensor]:
    """J_Z from one autograd call per task, the aggregated gradient sent through the encoder,
    the heads' ordinary gradients."""
    x, y = _data(step)
    z = model.encoder(x)
    losses = ((torch.cat([head(z) for head in model.heads], dim=1) - y) ** 2).mean(dim=0)
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses])
    d_z = aggregate(rows.reshape(M, -1), losses.detach())
    encoder = list(model.encoder.parameters())
    grads = torch.autograd.grad(z, encoder, d_z.view_as(z), retain_graph=True)
    heads = list(model.heads.parameters())
    grads += torch.autograd.grad(losses.sum(), heads)
    names = [name for name, _ in model.named_parameters()]
    return dict(zip(names, grads, strict=True))


def _step(model: _Net, aggregator, step: int = 0, **options) -> dict[str, Tensor]:
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1),
        aggregator,
        shared_params=model.encoder,
        rep_grad=True,
        **options,
    )
    optimizer.backward(_losses(model, step))
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "make",
    [UPGrad, jdoptim.MGDA, lambda: jdoptim.CAGrad(c=0.4), jdoptim.IMTLG, jdoptim.ConFIG],
    ids=["upgrad", "mgda", "cagrad", "imtlg", "config"],
)
def test_the_aggregated_representation_gradient_goes_through_the_encoder(make):
    expected = _by_hand(_Net(), 0, lambda J, losses: make()(J))
    for name, grad in _step(_Net(), make()).items():
        torch.testing.assert_close(grad, expected[name])


def test_weights_from_the_representation_give_the_parameters_their_weighted_gradient():
    # For a weighted aggregator the encoder's update is J_θᵀ w, w from J_Z: MGDA-UB's bound.
    model = _Net()
    x, y = _data(0)
    z = model.encoder(x)
    losses = ((torch.cat([head(z) for head in model.heads], dim=1) - y) ** 2).mean(dim=0)
    rows = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses])
    J_z = rows.reshape(M, -1)
    weights = jdoptim.MGDAWeighting()(J_z @ J_z.T)
    encoder = list(model.encoder.parameters())
    J_theta = torch.stack(
        [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(loss, encoder, retain_graph=True)]
            )
            for loss in losses
        ]
    )
    grads = _step(_Net(), jdoptim.MGDA())
    update = torch.cat(
        [grads[f"encoder.{i}.{k}"].reshape(-1) for i in (0, 2) for k in ("weight", "bias")]
    )
    torch.testing.assert_close(update, weights @ J_theta)


def test_mean_is_exact_and_equals_jacobian_mode():
    rep, plain = _Net(), _Net()
    representation = _step(rep, Mean())
    optimizer = JDOptimizer(SGD(plain.parameters(), lr=0.1), Mean(), shared_params=plain.encoder)
    optimizer.backward(_losses(plain, 0))
    for name, p in plain.named_parameters():
        torch.testing.assert_close(representation[name], p.grad)


def test_gramian_mode_gives_the_same_step_and_needs_a_gramian_based_aggregator():
    jacobian = _step(_Net(), UPGrad())
    gramian = _step(_Net(), UPGrad(), mode="gramian")
    for name, grad in jacobian.items():
        torch.testing.assert_close(gramian[name], grad)
    model = _Net()
    with pytest.raises(ValueError, match="needs a Gramian-based aggregator"):
        JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            jdoptim.ConFIG(),
            shared_params=model.encoder,
            rep_grad=True,
            mode="gramian",
        )
    auto = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=model.encoder, rep_grad=True
    )
    assert auto.resolved_mode == "jacobian"


def test_the_heads_receive_the_methods_head_weights_and_the_method_its_losses():
    model = _Net()
    aggregator = jdoptim.GradNorm(lr=0.1)
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1),
        aggregator,
        shared_params=model.encoder,
        rep_grad=True,
        diagnostics=True,
    )
    for step in range(2):
        optimizer.zero_grad()
        optimizer.step(_losses(model, step))
    weights = aggregator.weighting.loss_weights
    optimizer.zero_grad()
    losses = _losses(model, 2)
    optimizer.backward(losses, retain_graph=True)
    heads = list(model.heads.parameters())
    expected = torch.autograd.grad(weights @ losses, heads)
    for p, g in zip(heads, expected, strict=True):
        torch.testing.assert_close(p.grad, g)
    assert set(optimizer.last_diagnostics.method_state) == {"loss_weights", "gradient_norm_targets"}


def test_a_grad_scaler_changes_nothing():
    def run(scaled: bool) -> list[Tensor]:
        model = _Net()
        scaler = torch.amp.GradScaler("cpu", init_scale=512.0) if scaled else None
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            jdoptim.GradNorm(lr=0.05),
            shared_params=model.encoder,
            rep_grad=True,
            scaler=scaler,
        )
        for step in range(3):
            optimizer.zero_grad()
            losses = _losses(model, step)
            if scaler is None:
                optimizer.step(losses)
            else:
                optimizer.backward(scaler.scale(losses))
                scaler.step(optimizer)
                scaler.update()
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b)


def test_several_forward_passes_of_the_encoder_are_one_representation():
    # Each task on its own input (LibMTL's multi_input): the encoder runs once per task.
    model = _Net()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=model.encoder, rep_grad=True
    )
    inputs = [_data(step)[0] for step in range(M)]
    features = [model.encoder(x) for x in inputs]
    losses = torch.stack([model.heads[k](features[k]).pow(2).mean() for k in range(M)])
    optimizer.backward(losses)
    twin = _Net()
    features = [twin.encoder(x) for x in inputs]
    twin_losses = torch.stack([twin.heads[k](features[k]).pow(2).mean() for k in range(M)])
    rows = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(
                        loss, features, retain_graph=True, allow_unused=True, materialize_grads=True
                    )
                ]
            )
            for loss in twin_losses
        ]
    )
    d_z = UPGrad()(rows).split([f.numel() for f in features])
    encoder = list(twin.encoder.parameters())
    expected = torch.autograd.grad(
        features, encoder, [d.view_as(f) for d, f in zip(d_z, features, strict=True)]
    )
    for p, g in zip(model.encoder.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_retain_graph_allows_a_second_backward_pass():
    model = _Net()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=model.encoder, rep_grad=True
    )
    losses = _losses(model, 0)
    optimizer.backward(losses, retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    optimizer.backward(losses)
    for p, g in zip(model.parameters(), first, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_a_failed_step_changes_nothing_and_the_next_step_is_normal():
    model = _Net()
    aggregator = jdoptim.GradNorm(lr=0.1)
    optimizer = JDOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01),
        aggregator,
        shared_params=model.encoder,
        rep_grad=True,
    )
    optimizer.step(_losses(model, 0))
    optimizer.zero_grad()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(aggregator.state_dict())
    inner = copy.deepcopy(optimizer.optimizer.state_dict())
    handle = aggregator.weighting.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(NonFiniteError):
        optimizer.step(_losses(model, 1))
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert repr(aggregator.state_dict()) == repr(state)
    assert repr(optimizer.optimizer.state_dict()) == repr(inner)
    optimizer.step(_losses(model, 1))
    reference = _Net()
    twin = JDOptimizer(
        torch.optim.Adam(reference.parameters(), lr=0.01),
        jdoptim.GradNorm(lr=0.1),
        shared_params=reference.encoder,
        rep_grad=True,
    )
    for step in (0, 1):
        twin.zero_grad()
        twin.step(_losses(reference, step))
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True)
    )


def test_config_round_trip():
    model = _Net()
    config = {"aggregator": {"name": "upgrad"}, "rep_grad": True}
    optimizer = JDOptimizer.from_config(
        SGD(model.parameters(), lr=0.1), config, shared_params=model.encoder
    )
    assert optimizer.rep_grad and optimizer.to_config()["rep_grad"] is True


class _Bypass(_Net):
    """The first encoder layer's weight is also read after the representation."""

    def forward(self, x: Tensor) -> Tensor:
        features = self.encoder(x)
        extra = self.encoder[0].weight.sum()
        return torch.cat([head(features) for head in self.heads], dim=1) + extra


def test_a_shared_parameter_read_after_the_trunk_is_part_of_the_representation():
    # With Mean the step is exact, whatever the representation: the gradient of the mean loss
    # for the encoder, and of the sum of the losses for the heads (their own task's gradient).
    for model_class in (_Net, _Bypass):
        rep, plain = model_class(), model_class()
        optimizer = JDOptimizer(
            SGD(rep.parameters(), lr=0.1), Mean(), shared_params=rep.encoder, rep_grad=True
        )
        optimizer.backward(_losses(rep, 0))
        losses = _losses(plain, 0)
        encoder, heads = list(plain.encoder.parameters()), list(plain.heads.parameters())
        expected = torch.autograd.grad(losses.mean(), encoder, retain_graph=True)
        expected += torch.autograd.grad(losses.sum(), heads)
        for a, b in zip(
            [*rep.encoder.parameters(), *rep.heads.parameters()], expected, strict=True
        ):
            torch.testing.assert_close(a.grad, b)


def test_shared_params_may_be_a_list_of_parameters():
    as_module = _step(_Net(), UPGrad())
    model = _Net()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1),
        UPGrad(),
        shared_params=list(model.encoder.parameters()),
        rep_grad=True,
    )
    optimizer.backward(_losses(model, 0))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, as_module[name])


def test_what_rep_grad_cannot_do_is_refused_clearly():
    model = _Net()
    sgd = SGD(model.parameters(), lr=0.1)

    def build(aggregator=None, **options):
        options.setdefault("shared_params", model.encoder)
        return JDOptimizer(sgd, aggregator or UPGrad(), rep_grad=True, **options)

    with pytest.raises(ValueError, match="rep_grad=True needs shared_params"):
        build(shared_params=None)
    with pytest.raises(ValueError, match="scalarizer has none"):
        build(jdoptim.scalarization.Mean())
    with pytest.raises(ValueError, match="keeps state per column"):
        build(jdoptim.MoCo())
    with pytest.raises(ValueError, match="treats blocks"):
        build(jdoptim.GradVac(granularity="layer"))
    optimizer = build()
    with pytest.raises(ValueError, match="keeps state per column"):
        optimizer.aggregator = jdoptim.DBMTL()
    with pytest.raises(ValueError, match="rep_grad=True needs shared_params"):
        optimizer.shared_params = None
    with pytest.raises(ValueError, match="rep_grad=True aggregates every backward pass"):
        optimizer.backward(_losses(model, 0), aggregate=False)
    everything = build(shared_params=model)  # no task heads: no representation
    with pytest.raises(ValueError, match="found no representation"):
        everything.backward(_losses(model, 0))
    assert all(p.grad is None for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(jdoptim.GradNorm(lr=0.1))  # a method that needs the losses is fine


def test_the_optimizer_pickles_and_a_copy_records_nothing():
    import pickle

    model = _Net()
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=model.encoder, rep_grad=True
    )
    clone = pickle.loads(pickle.dumps(optimizer))
    assert copy.deepcopy(optimizer).rep_grad and clone.rep_grad
    optimizer.backward(_losses(model, 0))  # the original still records
    assert all(p.grad is not None for p in model.parameters())
