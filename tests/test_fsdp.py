"""Sharded models (``fully_shard``, FSDP2): two gloo processes on the CPU, each holding half of
every parameter, must apply the update of one process stepping on the whole model and the global
batch."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim import SGD

import jdoptim
from jdoptim import JDOptimizer, NonFiniteError, UPGrad
from jdoptim.scalarization import Sum
from tests.ranks import WORLD, load_results, run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")

BATCH = 8  # per rank
STEPS = 3


class _Net(nn.Module):
    """A trunk and three heads; sharded, a head's weight [1, 6] leaves rank 1 an empty shard."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.head = nn.Linear(27, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class _SequenceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embedding(x)).mean(dim=1))


NETS = {"mlp": _Net, "conv": _ConvNet, "sequence": _SequenceNet}


def _shard(net: nn.Module, mesh: str = "fsdp", **options: Any) -> nn.Module:
    """``fully_shard`` on every layer with parameters and on the model; ``"hsdp"`` also
    replicates (a 2 × 1 mesh: two replicas of one shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh == "hsdp":
        options["mesh"] = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    for module in list(net.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, **options)
    fully_shard(net, **options)
    return net


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from the ranks' shards)."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _full(net: nn.Module) -> list[torch.Tensor]:
    """The whole parameters."""
    return [_full_tensor(p) for p in net.parameters()]


def _batch(step: int, rank: int | None, net: str = "mlp") -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    size = WORLD * BATCH
    if net == "sequence":
        x = torch.randint(0, 10, (size, 4), generator=generator)
    else:
        x = torch.randn(size, *((1, 5, 5) if net == "conv" else (4,)), generator=generator)
    y = torch.randn(size, 3, generator=generator)
    if rank is None:
        return x, y
    return x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]


def _task_losses(output, y):
    return ((output - y) ** 2).mean(dim=0)


def _sample_losses(output, y):
    return ((output - y) ** 2).mean(dim=1)


def _sample_task_losses(output, y):
    return (output - y) ** 2


class Case(NamedTuple):
    losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    method: Callable[[], Any] = UPGrad
    options: dict[str, Any] = {}  # noqa: RUF012 (never mutated)
    shared: bool = False  # aggregate the trunk only (the heads get their own gradients)
    mesh: str = "fsdp"
    net: str = "mlp"
    # float32 unless the objectives outnumber what float32 can separate: with 48 objectives,
    # one process in gramian and in jacobian mode already differ by 1e-4 in float32.
    dtype: torch.dtype = torch.float32


GRAMIAN = {"mode": "gramian"}
PER_SAMPLE = {"accumulation": "concat"}
AUTO = {"mode": "auto"}
CASES = {
    "tasks": Case(_task_losses),
    "multi_task": Case(_task_losses, shared=True),
    "samples": Case(_sample_losses, options=PER_SAMPLE),
    "samples_multi_task": Case(_sample_losses, options=PER_SAMPLE, shared=True),
    "hsdp_multi_task": Case(_task_losses, shared=True, mesh="hsdp"),
    "mgda": Case(_task_losses, jdoptim.MGDA),
    "scalarized": Case(_task_losses, Sum),
    # In gramian mode, per-sample losses are each rank's own objectives without being told.
    "gramian_samples": Case(_sample_losses, options=GRAMIAN),
    "gramian_sample_tasks": Case(_sample_task_losses, options=GRAMIAN, dtype=torch.float64),
    "gramian_tasks": Case(_task_losses, options=GRAMIAN),
    "gramian_hsdp": Case(_sample_losses, options=GRAMIAN, mesh="hsdp"),
    # A multi-task model: mode="auto" takes gramian mode, with the Gramian of the trunk.
    "auto_multi_task": Case(_task_losses, options=AUTO, shared=True),
    "gramian_samples_multi_task": Case(_sample_losses, options=GRAMIAN, shared=True),
    "gramian_hsdp_multi_task": Case(_task_losses, options=GRAMIAN, shared=True, mesh="hsdp"),
    "auto_conv": Case(_sample_losses, options=AUTO, net="conv"),
    "auto_sequence": Case(_sample_losses, options=AUTO, net="sequence"),
    # Methods that take the values of the losses (and weight the heads): the global batch's.
    "gradnorm_multi_task": Case(_task_losses, lambda: jdoptim.GradNorm(lr=0.05), shared=True),
    "gradnorm_gramian_multi_task": Case(
        _task_losses, lambda: jdoptim.GradNorm(lr=0.05), options=GRAMIAN, shared=True
    ),
    "mgda_loss_samples": Case(
        _sample_losses, lambda: jdoptim.MGDA(normalization="loss"), options=PER_SAMPLE
    ),
    "imtl_gramian_samples": Case(_sample_losses, lambda: jdoptim.IMTL(lr=0.1), options=GRAMIAN),
}


def _train(name: str, rank: int | None) -> list[torch.Tensor]:
    case = CASES[name]
    torch.manual_seed(0)
    net = NETS[case.net]().to(case.dtype)
    if rank is not None:
        _shard(net, case.mesh)
    extra = {"shared_params": net.trunk} if case.shared else {}
    sgd = SGD(net.parameters(), lr=0.1)
    optimizer = JDOptimizer(sgd, case.method(), modules=net, **case.options, **extra)
    assert optimizer.resolved_mode == ("gramian" if "mode" in case.options else "jacobian")
    for step in range(STEPS):
        x, y = _batch(step, rank, case.net)
        x = x if case.net == "sequence" else x.to(case.dtype)
        optimizer.zero_grad()
        optimizer.step(case.losses(net(x), y.to(case.dtype)))
    return _full(net)


DIAGNOSED = {
    # name: (mesh, optimizer options, losses)
    "fsdp": ("fsdp", {}, _task_losses),
    "hsdp": ("hsdp", {}, _task_losses),  # each shard's Gramian is counted once
    "gramian": ("fsdp", GRAMIAN, _task_losses),  # the blocks averaged over the ranks
    "gramian_samples": ("fsdp", GRAMIAN, _sample_losses),  # the blocks stacked
    "gramian_hsdp": ("hsdp", GRAMIAN, _sample_losses),
}


def _diagnostics(rank: int | None, name: str) -> dict[str, torch.Tensor]:
    """The weights and the gradients' norms of one step (from the Gramian, which they would
    show if it were scaled, unlike the update of UPGrad)."""
    mesh, options, losses = DIAGNOSED[name]
    torch.manual_seed(0)
    net = _Net()
    if rank is not None:
        _shard(net, mesh)
    sgd = SGD(net.parameters(), lr=0.1)
    optimizer = JDOptimizer(sgd, UPGrad(), diagnostics=True, modules=net, **options)
    x, y = _batch(0, rank)
    optimizer.step(losses(net(x), y))
    report = optimizer.last_diagnostics
    return {"weights": report.weights, "norms": report.gradient_norms}


def _accumulate_and_amp(rank: int | None) -> list[torch.Tensor]:
    """Two micro-batches per step, a GradScaler and Adam: the same as one process on the whole
    batch without either."""
    torch.manual_seed(0)
    net = _Net()
    if rank is None:
        optimizer = JDOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), UPGrad())
        for step in range(STEPS):
            x, y = _batch(step, None)
            optimizer.zero_grad()
            optimizer.step(_task_losses(net(x), y))
        return _full(net)
    _shard(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    optimizer = JDOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), UPGrad(), scaler=scaler)
    half = BATCH // 2
    for step in range(STEPS):
        x, y = _batch(step, rank)
        optimizer.zero_grad()
        for micro in range(2):
            part = slice(micro * half, (micro + 1) * half)
            losses = _task_losses(net(x[part]), y[part]) / 2
            optimizer.backward(scaler.scale(losses), aggregate=micro == 1)
        scaler.step(optimizer)
        scaler.update()
    return _full(net)


def _amp_gramian(rank: int | None) -> list[torch.Tensor]:
    """Gramian mode with a GradScaler: the same as one process on the whole batch without."""
    torch.manual_seed(0)
    net = _Net()
    scaler = None
    if rank is not None:
        _shard(net)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    adam = torch.optim.Adam(net.parameters(), lr=0.01)
    optimizer = JDOptimizer(adam, UPGrad(), mode="gramian", modules=net, scaler=scaler)
    for step in range(STEPS):
        x, y = _batch(step, rank)
        losses = _sample_losses(net(x), y)
        optimizer.zero_grad()
        if scaler is None:
            optimizer.step(losses)
        else:
            optimizer.backward(scaler.scale(losses))
            scaler.step(optimizer)
            scaler.update()
    return _full(net)


def _mixed_precision(rank: int) -> dict[str, Any]:
    """Parameters and Jacobians in bfloat16, gradients reduced in float32, in both modes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    results: dict[str, Any] = {}
    for mode in ("jacobian", "gramian"):
        torch.manual_seed(0)
        net = _shard(
            _Net(),
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        )
        sgd = SGD(net.parameters(), lr=0.1)
        optimizer = JDOptimizer(sgd, UPGrad(), mode=mode, modules=net)
        dtypes = set()
        for step in range(STEPS):
            x, y = _batch(step, rank)
            optimizer.zero_grad()
            optimizer.backward(_task_losses(net(x), y.bfloat16()))  # bfloat16 losses
            dtypes |= {p.grad.dtype for p in net.parameters()}
            optimizer.step()
        results[mode] = {
            "params": _full(net),
            "grad_dtypes": sorted(map(str, dtypes)),
            "losses_dtype": str(_task_losses(net(x), y.bfloat16()).dtype),
        }
    return results


def _non_finite(rank: int) -> dict[str, Any]:
    """A loss that is not finite on rank 1 only: skipped, refused or (with a GradScaler) an
    overflow on every rank, in both modes."""
    results: dict[str, Any] = {}
    poison = torch.tensor([1.0, float("nan") if rank == 1 else 1.0, 1.0])
    for mode in ("jacobian", "gramian"):
        for policy in ("skip", "raise", "overflow"):
            torch.manual_seed(0)
            net = _shard(_Net())
            scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if policy == "overflow" else None
            optimizer = JDOptimizer(
                SGD(net.parameters(), lr=0.1),
                UPGrad(),
                mode=mode,
                modules=net,
                nonfinite="skip" if policy == "skip" else "raise",
                scaler=scaler,
            )
            x, y = _batch(0, rank)
            losses = _task_losses(net(x), y) * poison
            key = f"{mode}_{policy}"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if scaler is None:
                        optimizer.step(losses)
                    else:
                        optimizer.backward(scaler.scale(losses))
                        scaler.step(optimizer)
                        scaler.update()
                except NonFiniteError as error:
                    results[f"{key}_error"] = str(error)
            results[f"{key}_warnings"] = [str(w.message) for w in caught]
            results[f"{key}_params"] = _full(net)
            results[f"{key}_grads_none"] = all(p.grad is None for p in net.parameters())
            if scaler is not None:
                results[f"{mode}_overflow_scale"] = scaler.get_scale()
    return results


def _checkpoint(rank: int, out: Path) -> dict[str, Any]:
    """Save a sharded checkpoint after STEPS steps with torch.distributed.checkpoint, take one
    more step; then load it into a fresh model and optimizer and take the same step."""
    import torch.distributed.checkpoint as dcp

    from jdoptim.distributed import get_state_dict, set_state_dict

    def build(seed: int) -> tuple[_Net, JDOptimizer]:
        torch.manual_seed(seed)
        net = _shard(_Net())
        adam = torch.optim.Adam(net.parameters(), lr=0.01)
        return net, JDOptimizer(adam, jdoptim.Random(seed=3), modules=net)

    def step(net: _Net, optimizer: JDOptimizer, index: int) -> None:
        x, y = _batch(index, rank)
        optimizer.zero_grad()
        optimizer.step(_task_losses(net(x), y))

    net, optimizer = build(0)
    for index in range(STEPS):
        step(net, optimizer, index)
    model_state, optim_state = get_state_dict(net, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=out / "dcp")
    step(net, optimizer, STEPS)
    uninterrupted = _full(net)

    resumed_net, resumed = build(1)  # another initial model: everything comes from the file
    model_state, optim_state = get_state_dict(resumed_net, resumed)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=out / "dcp")
    set_state_dict(
        resumed_net,
        resumed,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )
    step(resumed_net, resumed, STEPS)

    other_net, other = build(0)
    other_net_state, other_state = get_state_dict(other_net, other)
    buffer = io.BytesIO()
    torch.save({"aggregator": {"name": "upgrad"}, "aggregator_state": {}}, buffer)
    other_state["jdoptim"] = buffer.getvalue()
    try:
        set_state_dict(
            other_net,
            other,
            model_state_dict=other_net_state,
            optim_state_dict=other_state,
        )
        refused = None
    except ValueError as error:
        refused = str(error)
    return {
        "uninterrupted": uninterrupted,
        "resumed": _full(resumed_net),
        "saved_aggregator": resumed.state_dict()["jdoptim"]["aggregator"],
        "refused": refused,
    }


class _Fail(torch.autograd.Function):
    """The identity, whose backward pass raises ``error`` at its ``countdown``-th call from
    now."""

    countdown = 0
    error: type[BaseException] = KeyboardInterrupt

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        _Fail.countdown -= 1
        if _Fail.countdown == 0:
            raise _Fail.error("interrupted")
        return grad


class _FragileNet(_Net):
    """Fails between the heads' backward pass and the trunk's, when told to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = _Fail.apply(self.trunk(x))
        return torch.cat([head(features) for head in self.heads], dim=1)


def _snapshot(net: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters, their ``.grad`` and the optimizer's state, whole."""
    tensors = [
        *net.parameters(),
        *(p.grad for p in net.parameters()),
        *(t for state in optimizer.state.values() for t in state.values()),
    ]
    return [_full_tensor(t) for t in tensors]


INTERRUPTIONS = {
    # name: (mode, the backward pass that fails, with what, share only the trunk)
    "jacobian, second loss": ("jacobian", 2, KeyboardInterrupt, False),
    "gramian, Gramian": ("gramian", 1, KeyboardInterrupt, False),
    "gramian, weighted gradient": ("gramian", 2, KeyboardInterrupt, False),
    # The engine takes an error of its batched backward pass for vmap's, resets FSDP and goes
    # on with one backward pass per loss: the step happens.
    "gramian, batched pass": ("gramian", 1, RuntimeError, False),
    # A multi-task model: the heads' ordinary gradient comes from a third backward pass.
    "gramian multi-task, weighted gradient": ("gramian", 2, KeyboardInterrupt, True),
    "gramian multi-task, heads' gradient": ("gramian", 3, KeyboardInterrupt, True),
}


def _interrupted(rank: int) -> dict[str, Any]:
    """A backward pass that fails midway on every rank changes nothing, and the training goes
    on as if the step had not been tried."""
    results: dict[str, Any] = {}
    for name, (mode, countdown, error, shared) in INTERRUPTIONS.items():
        for interrupt in (False, True):
            torch.manual_seed(0)
            net = _shard(_FragileNet())
            adam = torch.optim.Adam(net.parameters(), lr=0.01)
            extra = {"shared_params": net.trunk} if shared else {}
            optimizer = JDOptimizer(adam, jdoptim.Random(seed=3), modules=net, mode=mode, **extra)
            for step in range(3):
                x, y = _batch(step, rank)
                if step == 1:
                    optimizer.backward(_task_losses(net(x), y))  # a .grad that must survive
                if step == 1 and interrupt:
                    before = _snapshot(net, adam)
                    _Fail.countdown, _Fail.error = countdown, error
                    try:
                        with warnings.catch_warnings(record=True) as caught:
                            warnings.simplefilter("always")
                            optimizer.step(_task_losses(net(x), y))
                        results[f"{name} warnings"] = [str(w.message) for w in caught]
                    except KeyboardInterrupt as stopped:
                        results[f"{name} error"] = str(stopped)
                    after = _snapshot(net, adam)
                    results[f"{name} unchanged"] = all(
                        torch.equal(a, b) for a, b in zip(before, after, strict=True)
                    )
                if step != 1:
                    optimizer.zero_grad()
                if not (step == 1 and f"{name} warnings" in results):  # unless it happened
                    optimizer.step(_task_losses(net(x), y))
            results[f"{name} {'interrupted' if interrupt else 'uninterrupted'}"] = _full(net)
    return results


def _errors(rank: int) -> dict[str, str]:
    """What is refused, with the message each rank gives."""
    from jdoptim.aggregation import TrimmedMean

    messages = {}

    def message(build) -> str:
        try:
            build()
        except ValueError as error:
            return str(error)
        return "no error"

    def optimizer(net: nn.Module, method=None, **options) -> JDOptimizer:
        return JDOptimizer(SGD(net.parameters(), lr=0.1), method or UPGrad(), **options)

    net = _shard(_Net())
    messages["jacobian_aggregator"] = message(lambda: optimizer(net, TrimmedMean(trim_number=1)))
    by_layer = jdoptim.GradVac(granularity="layer")
    messages["blocks_of_columns"] = message(lambda: optimizer(net, by_layer, modules=net))

    from torch.distributed.fsdp import fully_shard

    partly = _Net()
    fully_shard(partly.trunk)
    messages["partly_sharded"] = message(lambda: optimizer(partly))

    jd = optimizer(net)
    x, y = _batch(0, rank)
    losses = _task_losses(net(x), y)
    messages["different_counts"] = message(lambda: jd.step(losses[: 2 + rank]))
    messages["different_counts_grads_none"] = str(all(p.grad is None for p in net.parameters()))
    messages["auto_mode"] = optimizer(net, mode="auto", modules=net).resolved_mode
    messages["auto_mode_shared"] = optimizer(
        net, mode="auto", modules=net, shared_params=net.trunk
    ).resolved_mode

    # Cutting the graph at the trunk would bypass FSDP's hooks: refused, not wrong.
    trunk, heads = list(net.trunk.parameters()), list(net.heads.parameters())
    messages["functional_multi_task"] = message(
        lambda: jdoptim.functional.multi_task_backward(losses, trunk, UPGrad(), heads)
    )
    from jdoptim.gramian import GramianEngine

    engine = GramianEngine(net.trunk)
    features = net.trunk(x)
    outputs = torch.cat([head(features) for head in net.heads], dim=1)
    messages["task_gramian"] = message(
        lambda: engine.task_gramian(_task_losses(outputs, y), shared=trunk, others=heads)
    )
    engine.close()

    other = _shard(_Net())
    messages["other_model"] = message(lambda: jd.step(_task_losses(other(x), y)))

    sequences = _shard(_SequenceNet())
    gramian = optimizer(sequences, mode="gramian", modules=sequences)
    tokens = torch.randint(0, 10, (BATCH, 4 + rank))  # sequences of another length on rank 1
    messages["different_lengths"] = message(
        lambda: gramian.step(_sample_losses(sequences(tokens), y))
    )

    net.set_requires_gradient_sync(False)
    no_sync = optimizer(net, modules=net)
    messages["no_sync"] = message(lambda: no_sync.step(_task_losses(net(x), y)))
    messages["no_sync_grads_none"] = str(all(p.grad is None for p in net.parameters()))
    return messages


def _rank_work(rank: int, out: Path) -> dict[str, Any]:
    results: dict[str, Any] = {case: _train(case, rank) for case in CASES}
    results["diagnostics"] = {name: _diagnostics(rank, name) for name in DIAGNOSED}
    results["accumulate_and_amp"] = _accumulate_and_amp(rank)
    results["mixed_precision"] = _mixed_precision(rank)
    results["amp_gramian"] = _amp_gramian(rank)
    results["non_finite"] = _non_finite(rank)
    results["checkpoint"] = _checkpoint(rank, out)
    results["errors"] = _errors(rank)
    results["interrupted"] = _interrupted(rank)
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, Any]]:
    return load_results(run_ranks(tmp_path_factory, _rank_work))


def _assert_params(actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float) -> None:
    for param, reference in zip(actual, expected, strict=True):
        torch.testing.assert_close(param, reference, rtol=0, atol=atol)


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_ranks_equal_one_process_on_the_global_batch(rank_results, case):
    expected = _train(case, rank=None)
    for rank in range(WORLD):
        _assert_params(rank_results[rank][case], expected, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(expected, _full(_Net()), strict=True)), (
        "the steps moved nothing"
    )


@pytest.mark.parametrize("name", list(DIAGNOSED))
def test_the_gramian_and_weights_are_those_of_one_process(rank_results, name):
    expected = _diagnostics(None, name)
    for rank in range(WORLD):
        result = rank_results[rank]["diagnostics"][name]
        for key in ("weights", "norms"):
            torch.testing.assert_close(result[key], expected[key], rtol=0, atol=1e-6)


def test_accumulation_grad_scaler_and_adam_under_sharding(rank_results):
    expected = _accumulate_and_amp(rank=None)
    for rank in range(WORLD):
        _assert_params(rank_results[rank]["accumulate_and_amp"], expected, atol=1e-6)


def test_gramian_mode_with_a_grad_scaler(rank_results):
    expected = _amp_gramian(rank=None)
    for rank in range(WORLD):
        _assert_params(rank_results[rank]["amp_gramian"], expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_mixed_precision_reduces_in_float32_and_follows_the_float32_run(rank_results, mode):
    torch.manual_seed(0)
    net = _Net()
    optimizer = JDOptimizer(SGD(net.parameters(), lr=0.1), UPGrad())
    for step in range(STEPS):
        x, y = _batch(step, None)
        optimizer.zero_grad()
        optimizer.step(_task_losses(net(x), y))
    torch.manual_seed(0)
    start = _full(_Net())
    for rank in range(WORLD):
        result = rank_results[rank]["mixed_precision"][mode]
        assert result["grad_dtypes"] == ["torch.float32"]
        assert result["losses_dtype"] == "torch.bfloat16"
        for param, reference, initial in zip(result["params"], _full(net), start, strict=True):
            # bfloat16 has 8 bits of mantissa: the steps agree to about 1% of their size.
            torch.testing.assert_close(param - initial, reference - initial, rtol=0, atol=2e-2)


@pytest.mark.parametrize("mode", ["jacobian", "gramian"])
def test_a_non_finite_loss_on_one_rank_stops_the_step_on_every_rank(rank_results, mode):
    torch.manual_seed(0)
    initial = _full(_Net())
    what = "Jacobian" if mode == "jacobian" else "Gramian"
    for rank in range(WORLD):
        result = rank_results[rank]["non_finite"]
        for policy in ("skip", "raise", "overflow"):
            _assert_params(result[f"{mode}_{policy}_params"], initial, atol=0)
        assert result[f"{mode}_skip_warnings"] == [
            f"Skipping the step: the losses or the {what} are not finite on some rank."
        ]
        assert result[f"{mode}_skip_grads_none"] and result[f"{mode}_raise_grads_none"]
        assert "not finite on some rank. Nothing was changed." in result[f"{mode}_raise_error"]
        assert result[f"{mode}_overflow_scale"] == 128.0  # the scaler saw it and halved


def test_a_sharded_checkpoint_resumes_the_same_training(rank_results):
    for rank in range(WORLD):
        result = rank_results[rank]["checkpoint"]
        _assert_params(result["resumed"], result["uninterrupted"], atol=0)
        assert result["saved_aggregator"] == jdoptim.to_config(jdoptim.Random(seed=3))
        assert "saved with the aggregator" in result["refused"]


def test_what_sharding_refuses_is_said_on_every_rank(rank_results):
    for rank in range(WORLD):
        messages = rank_results[rank]["errors"]
        assert "TrimmedMean" in messages["jacobian_aggregator"]
        assert "treats blocks of the Jacobian's columns" in messages["blocks_of_columns"]
        assert "Use a Gramian-based aggregator" in messages["jacobian_aggregator"]
        assert "upgrad" in messages["jacobian_aggregator"]
        assert "Apply fully_shard to the root module" in messages["partly_sharded"]
        assert "different numbers of losses (from 2 to 3)" in messages["different_counts"]
        assert messages["different_counts_grads_none"] == "True"
        assert messages["auto_mode"] == "gramian"
        assert messages["auto_mode_shared"] == "gramian"
        assert "are the losses computed from this model" in messages["other_model"]
        for name in ("functional_multi_task", "task_gramian"):
            assert "sharded with fully_shard" in messages[name], messages[name]
            assert "Use JDOptimizer with shared_params" in messages[name]
        assert "factors of a layer have different shapes" in messages["different_lengths"]
        assert "pad sequences to the same length" in messages["different_lengths"]
        assert "gradient reduction is turned off on module 'trunk.0'" in messages["no_sync"]
        assert "aggregate=False" in messages["no_sync"]
        assert messages["no_sync_grads_none"] == "True"


@pytest.mark.parametrize("name", list(INTERRUPTIONS))
def test_a_backward_pass_failing_on_every_rank_changes_nothing(rank_results, name):
    for rank in range(WORLD):
        result = rank_results[rank]["interrupted"]
        if INTERRUPTIONS[name][2] is RuntimeError:
            assert "The batched backward pass failed (interrupted)" in result[f"{name} warnings"][0]
        else:
            assert result[f"{name} error"] == "interrupted"
            assert result[f"{name} unchanged"]
        _assert_params(result[f"{name} interrupted"], result[f"{name} uninterrupted"], atol=0)
