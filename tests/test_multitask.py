"""Multi-task learning with ``shared_params``: gramian mode, jacobian mode and a per-task loop
give the same step, in float64, on a zoo of models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as nnf
from torch.optim import SGD

import jdoptim
from jdoptim import JDOptimizer, Mean, NonFiniteError, UPGrad
from tests.gramian._reference import assert_close

pytestmark = pytest.mark.usefixtures("float64")

B, T = 6, 3


class Heads(nn.Module):
    """A trunk and one head per task; ``forward`` returns the heads' outputs ``[B, T]``."""

    def __init__(self, trunk: nn.Module, d: int, head: Callable[[], nn.Module] | None = None):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList((head or (lambda: nn.Linear(d, 1)))() for _ in range(T))

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


class Skip(nn.Module):
    """A trunk whose heads read its output and, directly, an intermediate layer's."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.second = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))
        self.skips = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))

    def forward(self, x: Tensor) -> Tensor:
        middle = self.first(x)
        features = self.second(middle)
        pairs = zip(self.heads, self.skips, strict=True)
        outputs = [head(features) + skip(middle) for head, skip in pairs]
        return torch.cat(outputs, dim=1)


class ResidualHead(nn.Module):
    """A head whose first node and a later one both read the features."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.out = nn.Linear(d, 1)

    def forward(self, features: Tensor) -> Tensor:
        return self.out(torch.relu(self.inner(features)) + features)


def mlp_trunk() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh())


def conv_trunk() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class TaskTokens(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(T, d))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1)


class Encoder(nn.Module):
    """A transformer encoder layer over task tokens and embedded inputs; head ``t`` reads the
    output at token ``t``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.task_tokens = TaskTokens(d)
        self.layer = nn.TransformerEncoderLayer(
            d, 2, dim_feedforward=12, dropout=0.0, batch_first=True
        )
        self.heads = nn.ModuleList(nn.Linear(d, 1) for _ in range(T))

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(self.task_tokens(self.embed(x)))
        return torch.cat([head(h[:, t]) for t, head in enumerate(self.heads)], dim=1)


class Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.ModuleDict({"embed": nn.Embedding(11, 6, padding_idx=0)})
        self.trunk["mix"] = nn.Linear(6, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))

    def forward(self, x: Tensor) -> Tensor:
        features = torch.tanh(self.trunk["mix"](self.trunk["embed"](x).mean(dim=1)))
        return torch.cat([head(features) for head in self.heads], dim=1)


def _inputs(kind: str) -> Tensor:
    generator = torch.Generator().manual_seed(3)
    if kind == "conv":
        return torch.randn(B, 3, 7, 7, generator=generator)
    if kind == "encoder":
        return torch.randn(B, 4, 4, generator=generator)
    if kind == "text":
        x = torch.randint(0, 11, (B, 5), generator=generator)
        x[0, :2] = 0
        x[1] = x[2]
        return x
    return torch.randn(B, 5, generator=generator)


def _targets() -> Tensor:
    return torch.randn(B, T, generator=torch.Generator().manual_seed(4))


def task_losses(model: nn.Module, x: Tensor) -> Tensor:
    return ((model(x) - _targets()) ** 2).mean(dim=0)  # [T]


def sample_task_losses(model: nn.Module, x: Tensor) -> Tensor:
    return (model(x) - _targets()) ** 2  # [B, T]


def sample_losses(model: nn.Module, x: Tensor) -> Tensor:
    return ((model(x) - _targets()) ** 2).mean(dim=1)  # [B]: every head in each loss


def separate_losses(model: nn.Module, x: Tensor) -> Tensor:
    """Each task's loss from its own head, stacked (as TorchJD's users write them)."""
    features = model.trunk(x)
    y = _targets()
    return torch.stack(
        [nnf.mse_loss(head(features).squeeze(1), y[:, t]) for t, head in enumerate(model.heads)]
    )


ZOO: dict[str, tuple[Callable[[], nn.Module], str, Callable[[nn.Module], list[nn.Module]]]] = {
    # name: (model, inputs, shared modules)
    "mlp": (lambda: Heads(mlp_trunk(), 8), "mlp", lambda m: [m.trunk]),
    "residual heads": (
        lambda: Heads(mlp_trunk(), 8, lambda: ResidualHead(8)),
        "mlp",
        lambda m: [m.trunk],
    ),
    "conv with group norm": (lambda: Heads(conv_trunk(), 6), "conv", lambda m: [m.trunk]),
    "heads reading two depths": (Skip, "mlp", lambda m: [m.first, m.second]),
    "encoder, task tokens of their own": (
        Encoder,
        "encoder",
        lambda m: [m.embed, m.layer],
    ),
    "encoder, shared task tokens": (
        Encoder,
        "encoder",
        lambda m: [m.embed, m.task_tokens, m.layer],
    ),
    "shared embedding": (Text, "text", lambda m: [m.trunk]),
    "one head for all tasks": (
        lambda: nn.ModuleDict({"trunk": mlp_trunk(), "head": nn.Linear(8, T)}),
        "mlp",
        lambda m: [m["trunk"]],
    ),
}


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    if isinstance(model, nn.ModuleDict):
        return model["head"](model["trunk"](x))
    return model(x)


class _Wrapped(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return _forward(self.model, x)


def _build(name: str, seed: int = 0) -> tuple[nn.Module, list[Tensor], Tensor]:
    make, kind, shared = ZOO[name]
    torch.manual_seed(seed)
    model = _Wrapped(make())
    params = [p for module in shared(model.model) for p in module.parameters()]
    return model, params, _inputs(kind)


def per_task_loop(
    model: nn.Module,
    losses: Tensor,
    shared: list[Tensor],
    aggregator,
    gramian_params: list[Tensor] | None = None,
) -> dict[int, Tensor]:
    """The reference: one backward pass per loss for the shared Jacobian ``J``; the weights
    from the Gramian of ``gramian_params`` (all shared parameters by default), the update
    ``Jᵀ w`` for the shared parameters, the gradient of the sum for the others."""
    flat = losses.reshape(-1)
    rows = []
    for loss in flat:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros_like(p).flatten() if g is None else g.flatten()
                    for p, g in zip(shared, grads, strict=True)
                ]
            )
        )
    J = torch.stack(rows)
    chosen = gramian_params if gramian_params is not None else shared
    ids = {id(p) for p in chosen}
    mask = torch.cat([torch.full((p.numel(),), id(p) in ids) for p in shared])
    Jg = J[:, mask]
    weights = aggregator.weighting(Jg @ Jg.T)
    update = weights @ J
    pieces = torch.split(update, [p.numel() for p in shared])
    expected = {id(p): g.view_as(p) for p, g in zip(shared, pieces, strict=True)}
    others = [p for p in model.parameters() if id(p) not in {id(q) for q in shared}]
    grads = torch.autograd.grad(flat.sum(), others, allow_unused=True)
    expected.update({id(p): g for p, g in zip(others, grads, strict=True) if g is not None})
    return expected


def _check(model: nn.Module, expected: dict[int, Tensor]) -> None:
    scale = torch.cat([g.flatten() for g in expected.values()]).norm().item()
    for name, p in model.named_parameters():
        if id(p) not in expected:
            assert p.grad is None, f"{name} should have no .grad"
            continue
        assert p.grad is not None, f"{name} has no .grad"
        assert_close(p.grad, expected[id(p)].view_as(p), name, scale=scale)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize(
    "losses_fn", [task_losses, sample_task_losses, sample_losses], ids=["[T]", "[B, T]", "[B]"]
)
@pytest.mark.parametrize("mode", ["gramian", "jacobian"])
@pytest.mark.parametrize("name", list(ZOO))
def test_gramian_and_jacobian_mode_equal_a_per_task_loop(name, mode, losses_fn):
    model, shared, x = _build(name)
    reference, reference_shared, _ = _build(name)
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1),
        UPGrad(),
        mode=mode,
        shared_params=shared,
        modules=model,
    )
    assert optimizer.resolved_mode == mode
    existing = {}
    for p in list(model.parameters())[::2]:
        existing[id(p)] = torch.randn_like(p)
        p.grad = existing[id(p)].clone()
    optimizer.backward(losses_fn(model, x))
    expected = per_task_loop(reference, losses_fn(reference, x), reference_shared, UPGrad())
    expected = {
        id(p): expected[id(q)] + existing.get(id(p), 0)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        if id(q) in expected
    }
    _check(model, expected)


@pytest.mark.parametrize("mode", ["gramian", "jacobian"])
def test_losses_computed_head_by_head_and_mean(mode):
    model, shared, x = _build("mlp")
    reference, reference_shared, _ = _build("mlp")
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), Mean(), mode=mode, shared_params=shared, modules=model
    )
    optimizer.backward(separate_losses(model.model, x))
    expected = per_task_loop(
        reference, separate_losses(reference.model, x), reference_shared, Mean()
    )
    by_param = {
        id(p): expected[id(q)]
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    }
    _check(model, by_param)


def test_partial_jd_takes_the_weights_from_the_hooked_layers():
    model, shared, x = _build("mlp")
    reference, reference_shared, _ = _build("mlp")
    last = model.model.trunk[2]
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1),
        UPGrad(),
        mode="gramian",
        shared_params=shared,
        modules=last,
    )
    optimizer.backward(task_losses(model, x))
    expected = per_task_loop(
        reference,
        task_losses(reference, x),
        reference_shared,
        UPGrad(),
        gramian_params=list(reference.model.trunk[2].parameters()),
    )
    _check(
        model,
        {
            id(p): expected[id(q)]
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        },
    )


def test_task_specific_parameters_inside_the_trunk_get_their_ordinary_gradient():
    # The first trunk layer is not shared: the graph's shared part starts above it.
    for mode in ("gramian", "jacobian"):
        model, _, x = _build("mlp")
        reference, _, _ = _build("mlp")
        shared = list(model.model.trunk[2].parameters())
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            UPGrad(),
            mode=mode,
            shared_params=shared,
            modules=model,
        )
        optimizer.backward(task_losses(model, x))
        expected = per_task_loop(
            reference,
            task_losses(reference, x),
            list(reference.model.trunk[2].parameters()),
            UPGrad(),
        )
        _check(
            model,
            {
                id(p): expected[id(q)]
                for p, q in zip(model.parameters(), reference.parameters(), strict=True)
            },
        )


def test_a_loss_without_a_head_and_an_unreached_head():
    def losses(model: nn.Module, x: Tensor) -> Tensor:
        features = model.model.trunk(x)
        model.model.heads[2](features)  # computed, but no loss uses it
        head = nnf.mse_loss(model.model.heads[0](features).squeeze(1), _targets()[:, 0])
        return torch.stack([head, features.pow(2).mean(), (features * 0.0).sum()])

    for mode in ("gramian", "jacobian"):
        model, shared, x = _build("mlp")
        reference, reference_shared, _ = _build("mlp")
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            UPGrad(),
            mode=mode,
            shared_params=shared,
            modules=model,
        )
        optimizer.backward(losses(model, x))
        expected = per_task_loop(reference, losses(reference, x), reference_shared, UPGrad())
        by_param = {
            id(p): expected[id(q)]
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
            if id(q) in expected
        }
        _check(model, by_param)
        assert all(p.grad is None for p in model.model.heads[2].parameters())


@pytest.mark.parametrize("case", ["zero", "duplicated", "tiny", "huge"])
def test_degenerate_tasks(case):
    """Tasks with a zero gradient, duplicated tasks, and losses scaled by 1e-30 or 1e30."""
    scale = {"tiny": 1e-30, "huge": 1e30}.get(case, 1.0)

    def losses(model: nn.Module, x: Tensor) -> Tensor:
        out = task_losses(model, x) * scale
        if case == "zero":
            return out * torch.tensor([1.0, 0.0, 1.0])
        if case == "duplicated":
            return torch.cat([out, out[:1]])
        return out

    for mode in ("gramian", "jacobian"):
        model, shared, x = _build("mlp")
        reference, reference_shared, _ = _build("mlp")
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            UPGrad(),
            mode=mode,
            shared_params=shared,
            modules=model,
        )
        optimizer.backward(losses(model, x))
        expected = per_task_loop(reference, losses(reference, x), reference_shared, UPGrad())
        _check(
            model,
            {
                id(p): expected[id(q)]
                for p, q in zip(model.parameters(), reference.parameters(), strict=True)
            },
        )


def test_auto_chooses_gramian_mode_where_every_shared_layer_has_a_closed_form():
    def resolved(name, aggregator=None, **options):
        model, shared, _ = _build(name)
        sgd = SGD(model.parameters(), lr=0.1)
        options.setdefault("modules", model)
        return JDOptimizer(
            sgd, aggregator or UPGrad(), mode="auto", shared_params=shared, **options
        ).resolved_mode

    for name in ("mlp", "conv with group norm", "shared embedding", "one head for all tasks"):
        assert resolved(name) == "gramian", name
    assert resolved("mlp", jdoptim.build("config")) == "jacobian"  # ConFIG needs J
    assert resolved("encoder, shared task tokens") == "jacobian"  # attention: no closed form
    assert resolved("mlp", modules=None) == "jacobian"  # parameters, but no model to hook
    model, _, _ = _build("mlp")
    hooked = model.model.trunk[2]  # misses shared parameters: partial JD is not automatic
    assert resolved("mlp", modules=hooked) == "jacobian"
    trunk = model.model.trunk  # a shared module is the model to hook
    sgd = SGD(model.parameters(), lr=0.1)
    assert JDOptimizer(sgd, UPGrad(), mode="auto", shared_params=trunk).resolved_mode == "gramian"


def test_gramian_mode_refuses_a_module_mixing_its_own_shared_parameters_with_heads():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))
            self.trunk = mlp_trunk()
            self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))

        def forward(self, x: Tensor) -> Tensor:
            features = self.trunk(x) * self.scale
            return torch.cat([head(features) for head in self.heads], dim=1)

    model = Mixed()
    shared = [model.scale, *model.trunk.parameters()]
    sgd = SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"holds shared parameters of its own \(scale\)"):
        JDOptimizer(sgd, UPGrad(), mode="gramian", shared_params=shared, modules=model)
    auto = JDOptimizer(sgd, UPGrad(), mode="auto", shared_params=shared, modules=model)
    assert auto.resolved_mode == "jacobian"
    with pytest.raises(ValueError, match="no module among modules holds only shared"):
        JDOptimizer(sgd, UPGrad(), mode="gramian", shared_params=shared, modules=model.heads)
    with pytest.raises(ValueError, match="pass modules=model"):
        JDOptimizer(sgd, UPGrad(), mode="gramian", shared_params=shared)


def test_gramian_mode_refuses_other_shared_params_than_those_it_hooked():
    model, shared, _ = _build("mlp")
    sgd = SGD(model.parameters(), lr=0.1)
    optimizer = JDOptimizer(sgd, UPGrad(), mode="gramian", shared_params=shared, modules=model)
    optimizer.shared_params = list(shared)  # the same parameters: nothing changes
    with pytest.raises(ValueError, match="build a new JDOptimizer to change shared_params"):
        optimizer.shared_params = shared[:2]
    with pytest.raises(ValueError, match="build a new JDOptimizer to change shared_params"):
        optimizer.shared_params = None
    assert optimizer.shared_params == shared and optimizer._path.shared_params == shared
    plain = JDOptimizer(sgd, UPGrad(), mode="gramian", modules=model)
    with pytest.raises(ValueError, match="build a new JDOptimizer to change shared_params"):
        plain.shared_params = shared
    assert plain.shared_params is None


def test_non_finite_losses_change_nothing_and_the_engine_recovers():
    model, shared, x = _build("mlp")
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1),
        UPGrad(),
        mode="gramian",
        shared_params=shared,
        modules=model,
    )
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError, match=r"indices \[1\]"):
        optimizer.step(task_losses(model, x) * torch.tensor([1.0, float("nan"), 1.0]))
    assert all(p.grad is None for p in model.parameters())
    optimizer.nonfinite = "skip"
    with pytest.warns(UserWarning, match="Skipping"):
        optimizer.step(task_losses(model, x) * float("inf"))
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b) and b.grad is None
    optimizer.zero_grad()
    optimizer.step(task_losses(model, x))
    assert all(p.grad is not None for p in model.parameters())


def test_grad_scaler_and_diagnostics_match_the_plain_jacobian_step():
    reports = []
    for mode in ("gramian", "jacobian"):
        model, shared, x = _build("mlp")
        scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
        optimizer = JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            UPGrad(),
            mode=mode,
            shared_params=shared,
            modules=model,
            scaler=scaler,
            diagnostics=True,
        )
        optimizer.backward(scaler.scale(task_losses(model, x)))
        scaler.step(optimizer)
        scaler.update()
        reports.append(
            (optimizer.last_diagnostics, [p.detach().clone() for p in model.parameters()])
        )
    (gramian, gramian_params), (jacobian, jacobian_params) = reports
    for field in ("weights", "gradient_norms", "cosine_similarities", "update_norm"):
        torch.testing.assert_close(getattr(gramian, field), getattr(jacobian, field))
    for a, b in zip(gramian_params, jacobian_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _NoVmap(torch.autograd.Function):
    """Data-dependent control flow in backward: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 if grad.abs().sum() >= 0 else grad


@pytest.mark.parametrize("mode", ["gramian", "jacobian"])
def test_graphs_vmap_cannot_batch_are_differentiated_one_task_at_a_time(mode):
    def losses(model: nn.Module, x: Tensor) -> Tensor:
        features = _NoVmap.apply(model.model.trunk(x))  # in the shared part
        outputs = torch.cat([head(features) for head in model.model.heads], dim=1)
        return ((_NoVmap.apply(outputs) - _targets()) ** 2).mean(dim=0)  # above the heads

    model, shared, x = _build("mlp")
    reference, reference_shared, _ = _build("mlp")
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), mode=mode, shared_params=shared, modules=model
    )
    with pytest.warns(UserWarning, match="one backward pass per") as caught:
        optimizer.backward(losses(model, x))
    if mode == "jacobian":  # the warning points to the caller's line
        assert caught[0].filename == __file__
    expected = per_task_loop(reference, losses(reference, x), reference_shared, UPGrad())
    _check(
        model,
        {
            id(p): expected[id(q)]
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        },
    )


class _Gate(nn.Module):
    def forward(self, features: Tensor, gate: Tensor) -> Tensor:
        return features * gate


class _Hooked(nn.Module):
    """A trunk and three two-layer heads, with a hook that doubles a gradient at ``where``."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in range(T)
        )
        if where == "head module":  # a full backward hook on a head's first layer
            self.heads[1][0].register_full_backward_hook(lambda m, g_in, g_out: (2 * g_in[0],))
        if where == "trunk module":
            self.trunk[3].register_full_backward_hook(lambda m, g_in, g_out: (2 * g_in[0],))
        if where == "trunk module pre":
            self.trunk[3].register_full_backward_pre_hook(lambda m, g_out: (2 * g_out[0],))
        # Gates each head's features by a parameter of its own: a hook on the gate is a hook on
        # a node that reads the trunk and a head's parameter.
        self.gates = nn.ParameterList(nn.Parameter(torch.ones(6)) for _ in range(T))
        self.gate = _Gate()
        if where == "module reading the trunk and a head":
            self.gate.register_full_backward_hook(lambda m, g_in, g_out: (2 * g_in[0], g_in[1]))

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.trunk[1](self.trunk[0](x))
        if self.where == "inside the trunk":
            hidden.register_hook(lambda g: 2 * g)
        features = self.trunk[3](self.trunk[2](hidden))
        if self.where == "shared features":
            features.register_hook(lambda g: 2 * g)
        outputs = []
        for k, head in enumerate(self.heads):
            first = head[0](self.gate(features, self.gates[k]))
            if self.where == "a head's first layer" and k == 1:
                first.register_hook(lambda g: 2 * g)
            output = head[2](head[1](first))
            if self.where == "a head's output" and k == 1:
                output.register_hook(lambda g: 2 * g)
            outputs.append(output)
        return torch.cat(outputs, dim=1)


HOOKS = [
    "inside the trunk",
    "shared features",
    "a head's first layer",
    "a head's output",
    "head module",
    "trunk module",
    "trunk module pre",
    "module reading the trunk and a head",
]


@pytest.mark.parametrize("mode", ["gramian", "jacobian"])
@pytest.mark.parametrize("where", HOOKS)
def test_hooks_on_tensors_and_modules_are_honoured(where, mode):
    """Hooks registered on tensors or modules, on the shared or the task side, change the
    gradients as they change those of a per-task loop of ordinary backward passes."""

    def losses(model: nn.Module) -> Tensor:
        generator = torch.Generator().manual_seed(3)
        x, y = torch.randn(B, 5, generator=generator), torch.randn(B, T, generator=generator)
        return ((model(x) - y.to(torch.get_default_dtype())) ** 2).mean(dim=0)

    torch.manual_seed(0)
    model = _Hooked(where)
    torch.manual_seed(0)
    reference = _Hooked(where)
    optimizer = JDOptimizer(
        SGD(model.parameters(), lr=0.1), UPGrad(), mode=mode, shared_params=model.trunk
    )
    optimizer.backward(losses(model))
    shared = list(reference.trunk.parameters())
    expected = per_task_loop(reference, losses(reference), shared, UPGrad())
    _check(
        model,
        {
            id(p): expected[id(q)]
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
        },
    )
    torch.manual_seed(0)
    plain = _Hooked("none")
    unhooked = per_task_loop(plain, losses(plain), list(plain.trunk.parameters()), UPGrad())
    assert not all(  # the hook changes the step
        torch.allclose(expected[id(q)], unhooked[id(r)])
        for q, r in zip(reference.parameters(), plain.parameters(), strict=True)
    )
