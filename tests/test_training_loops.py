"""The habits of real training loops: multi-task parameters, AMP, accumulation, param groups,
diagnostics and torch.compile."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim import SGD

import jdoptim
from jdoptim import JDOptimizer, Mean, UPGrad
from jdoptim.diagnostics import StepDiagnostics

pytestmark = pytest.mark.usefixtures("float64")


class MultiTask(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def _task_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean(dim=0)


def _data(batch: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, generator=generator), torch.randn(batch, 3, generator=generator)


def _model(seed: int = 0) -> MultiTask:
    torch.manual_seed(seed)
    return MultiTask()


def test_multi_task_aggregates_shared_parameters_and_gives_heads_their_own_gradient():
    x, y = _data()
    model, reference = _model(), _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=model.trunk)
    optimizer.backward(_task_losses(model, x, y))

    losses = _task_losses(reference, x, y)
    trunk = list(reference.trunk.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)])
        for loss in losses
    ]
    update = UPGrad()(torch.stack(rows))
    expected_trunk = torch.split(update, [p.numel() for p in trunk])
    for p, expected in zip(model.trunk.parameters(), expected_trunk, strict=True):
        torch.testing.assert_close(p.grad, expected.view_as(p), rtol=0, atol=1e-12)
    for t, (head, ref_head) in enumerate(zip(model.heads, reference.heads, strict=True)):
        expected = torch.autograd.grad(losses[t], list(ref_head.parameters()), retain_graph=True)
        for p, g in zip(head.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)


def test_shared_params_must_belong_to_the_optimizer():
    model = _model()
    with pytest.raises(ValueError, match=r"shape \(3, 3\) is not optimised"):
        JDOptimizer(
            SGD(model.parameters(), lr=0.1),
            UPGrad(),
            shared_params=[nn.Parameter(torch.ones(3, 3))],
        )
    with pytest.raises(TypeError, match="iterable of parameters or a module"):
        JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad(), shared_params=torch.ones(2))


def test_sum_accumulation_over_micro_batches_equals_one_step_on_the_whole_batch():
    x, y = _data(batch=16)
    whole, accumulated = _model(), _model()
    JDOptimizer(SGD(whole.parameters(), lr=0.1), UPGrad()).step(_task_losses(whole, x, y))
    optimizer = JDOptimizer(SGD(accumulated.parameters(), lr=0.1), UPGrad())
    optimizer.backward(_task_losses(accumulated, x[:8], y[:8]) / 2, aggregate=False)
    optimizer.backward(_task_losses(accumulated, x[8:], y[8:]) / 2, aggregate=False)
    assert all(p.grad is None for p in accumulated.parameters())  # nothing aggregated yet
    optimizer.step()
    for a, b in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_concat_accumulation_stacks_per_sample_objectives():
    x, y = _data(batch=12)
    whole, accumulated = _model(), _model()

    def per_sample(model, x, y):
        return ((model(x) - y) ** 2).mean(dim=1)

    JDOptimizer(SGD(whole.parameters(), lr=0.1), UPGrad()).step(per_sample(whole, x, y))
    optimizer = JDOptimizer(SGD(accumulated.parameters(), lr=0.1), UPGrad(), accumulation="concat")
    optimizer.backward(per_sample(accumulated, x[:5], y[:5]), aggregate=False)
    optimizer.step(per_sample(accumulated, x[5:], y[5:]))
    for a, b in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sum_accumulation_refuses_different_objectives():
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad())
    optimizer.backward(_task_losses(model, x, y), aggregate=False)
    with pytest.raises(ValueError, match="accumulation='concat'"):
        optimizer.backward(_task_losses(model, x, y)[:2])
    optimizer.zero_grad()  # forgets the accumulated Jacobian
    optimizer.backward(_task_losses(model, x, y)[:2])


def test_per_group_learning_rates_and_parameters_added_later():
    x, y = _data()
    model = _model()
    inner = SGD([{"params": model.trunk.parameters(), "lr": 0.0}], lr=0.1)
    optimizer = JDOptimizer(inner, UPGrad())
    trunk_before = [p.detach().clone() for p in model.trunk.parameters()]
    optimizer.step(_task_losses(model, x, y))  # heads are not optimised yet
    assert all(p.grad is None for p in model.heads.parameters())
    optimizer.add_param_group({"params": model.heads.parameters(), "lr": 0.1})
    heads_before = [p.detach().clone() for p in model.heads.parameters()]
    optimizer.zero_grad()
    optimizer.step(_task_losses(model, x, y))
    for before, p in zip(trunk_before, model.trunk.parameters(), strict=True):
        assert torch.equal(before, p)  # lr 0
    assert all(
        not torch.equal(before, p)
        for before, p in zip(heads_before, model.heads.parameters(), strict=True)
    )


def test_diagnostics_report_weights_conflicts_and_go_to_hooks():
    x, y = _data()
    model = _model()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad(), diagnostics=True)
    seen: list[StepDiagnostics] = []
    handle = optimizer.register_diagnostics_hook(lambda opt, report: seen.append(report))
    losses = _task_losses(model, x, y)
    params = list(model.parameters())
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in losses
    ]
    J = torch.stack(rows)
    optimizer.step(losses)
    report = optimizer.last_diagnostics
    assert seen == [report]
    G = J @ J.T
    torch.testing.assert_close(report.weights, UPGrad().weighting(G))
    torch.testing.assert_close(report.gradient_norms, J.norm(dim=1))
    torch.testing.assert_close(
        report.cosine_similarities[0, 1], G[0, 1] / (G[0, 0] * G[1, 1]).sqrt()
    )
    assert int(report.conflicting_pairs) == int((G < 0).triu(1).sum())
    assert not bool(report.update_conflicts)
    handle.remove()
    optimizer.step(_task_losses(model, x, y))
    assert len(seen) == 1


def test_mean_diagnostics_show_the_conflict_upgrad_avoids():
    J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
    w = nn.Parameter(torch.zeros(3))
    for aggregator, conflicts in [(Mean(), True), (UPGrad(), False)]:
        optimizer = JDOptimizer(SGD([w], lr=0.1), aggregator, diagnostics=True)
        optimizer.backward(J @ w)
        assert bool(optimizer.last_diagnostics.update_conflicts) is conflicts
        torch.testing.assert_close(
            optimizer.last_diagnostics.weights, aggregator.weighting(J @ J.T)
        )


class _Recorder(UPGrad):
    """UPGrad that remembers the matrices it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, matrix):
        self.seen.append(matrix.detach().clone())
        return super().forward(matrix)


def test_amp_with_grad_scaler_aggregates_the_unscaled_jacobian_and_steps_like_fp32():
    torch.set_default_dtype(torch.float32)
    x, y = _data()
    x, y = x.float(), y.float()
    model, reference = _model(), _model()
    model.float(), reference.float()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    aggregator = _Recorder()
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), aggregator, scaler=scaler)
    reference_aggregator = _Recorder()
    plain = JDOptimizer(SGD(reference.parameters(), lr=0.1), reference_aggregator)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _task_losses(model, x, y).float()
    optimizer.backward(scaler.scale(losses))
    scaler.step(optimizer)
    scaler.update()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_losses = _task_losses(reference, x, y).float()
    plain.step(reference_losses)

    torch.testing.assert_close(aggregator.seen[0], reference_aggregator.seen[0])
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_amp_overflow_skips_the_step_and_lowers_the_scale():
    torch.set_default_dtype(torch.float32)
    x, y = _data()
    model = _model().float()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = JDOptimizer(SGD(model.parameters(), lr=0.1), UPGrad(), scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    losses = _task_losses(model, x.float(), y.float())
    optimizer.backward(scaler.scale(losses) * torch.tensor([1.0, float("inf"), 1.0]))
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 1024.0
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one():
    torch.set_default_dtype(torch.float32)
    x, y = _data()
    x, y = x.float(), y.float()
    eager, compiled_source = _model().float(), _model().float()
    compiled = torch.compile(compiled_source)
    eager_optimizer = JDOptimizer(SGD(eager.parameters(), lr=0.1), UPGrad())
    optimizer = JDOptimizer(SGD(compiled_source.parameters(), lr=0.1), UPGrad())
    with warnings.catch_warnings():
        # vmap cannot batch the compiled backward: the optimizer falls back to one pass per loss.
        warnings.filterwarnings("ignore", message="The batched backward pass failed")
        for _ in range(2):
            eager_optimizer.zero_grad()
            eager_optimizer.step(_task_losses(eager, x, y))
            optimizer.zero_grad()
            optimizer.step(_task_losses(compiled, x, y))
    for a, b in zip(eager.parameters(), compiled_source.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gradvac", "pcgrad"])
def test_checkpoints_resume_bit_exactly_with_stateful_and_randomised_aggregators(name):
    x, y = _data()

    def make(model):
        aggregator = jdoptim.build({"name": name, "seed": 7})
        inner = torch.optim.Adam(model.parameters(), lr=0.01)
        return JDOptimizer(inner, aggregator, shared_params=model.trunk)

    def run(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            optimizer.step(_task_losses(model, x, y))

    model = _model()
    optimizer = make(model)
    run(model, optimizer, 3)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    run(model, optimizer, 3)

    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    resumed = _model(seed=11)
    resumed.load_state_dict(restored["model"])
    resumed_optimizer = make(resumed)
    resumed_optimizer.load_state_dict(restored["optimizer"])
    run(resumed, resumed_optimizer, 3)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_functional_multi_task_backward_matches_the_optimizer():
    from jdoptim.functional import multi_task_backward

    x, y = _data()
    model, reference = _model(), _model()
    multi_task_backward(
        _task_losses(model, x, y),
        list(model.trunk.parameters()),
        UPGrad(),
        list(model.heads.parameters()),
    )
    optimizer = JDOptimizer(
        SGD(reference.parameters(), lr=0.1), UPGrad(), shared_params=reference.trunk
    )
    optimizer.backward(_task_losses(reference, x, y))
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [0, -1, 1.5, True])
def test_functional_multi_task_backward_refuses_a_bad_chunk_size(chunk_size):
    from jdoptim.functional import multi_task_backward

    x, y = _data()
    model = _model()
    with pytest.raises(ValueError, match=f"Invalid chunk_size value: {chunk_size!r}"):
        multi_task_backward(
            _task_losses(model, x, y),
            list(model.trunk.parameters()),
            UPGrad(),
            list(model.heads.parameters()),
            chunk_size=chunk_size,
        )
    assert all(p.grad is None for p in model.parameters())
