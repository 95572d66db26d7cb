"""Data parallelism: two gloo processes on the CPU must apply the same update as one process
stepping on the concatenated batch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.optim import SGD

import jdoptim
from jdoptim import JDOptimizer, UPGrad
from tests.ranks import WORLD, load_results, run_ranks

BATCH = 8  # per rank
STEPS = 3

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is missing")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def _global_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD * BATCH, 4, generator=generator, dtype=torch.float64)
    return x, torch.randn(WORLD * BATCH, 3, generator=generator, dtype=torch.float64)


def _task_losses(output, y):
    return ((output - y) ** 2).mean(dim=0)


def _sample_losses(output, y):
    return ((output - y) ** 2).mean(dim=1)


CASES = {
    # name: (losses, optimizer options, wrap the model in DDP, share only the trunk,
    #        pass the model as modules=)
    "tasks": (_task_losses, {}, False, False, True),
    "samples": (_sample_losses, {"accumulation": "concat"}, False, False, True),
    "samples_multi_task": (_sample_losses, {"accumulation": "concat"}, False, True, True),
    "ddp_multi_task": (_task_losses, {}, True, True, True),
    "ddp_without_modules": (_task_losses, {}, True, True, False),
    # mode="auto" takes jacobian mode under data parallelism, gramian mode in one process
    "ddp_multi_task_auto": (_task_losses, {"mode": "auto"}, True, True, True),
    # Methods that take the values of the losses: those of the global batch reach them.
    "gradnorm_multi_task": (_task_losses, {}, False, True, True),
    "mgda_loss_samples": (_sample_losses, {"accumulation": "concat"}, False, False, True),
}
AGGREGATORS = {
    "gradnorm_multi_task": lambda: jdoptim.GradNorm(lr=0.05),
    "mgda_loss_samples": lambda: jdoptim.MGDA(normalization="loss+"),
}
"""The aggregator of the cases that do not use UPGrad."""
# How many times DDP's own gradient all-reduce ran, by case, on this rank.
DDP_REDUCTIONS: dict[str, int] = {}


def _count_reductions(case: str, model: nn.parallel.DistributedDataParallel) -> None:
    DDP_REDUCTIONS[case] = 0

    def hook(state, bucket):  # unannotated: DDP checks annotations that are not strings
        DDP_REDUCTIONS[case] += 1
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, hook)


def _train(case: str, rank: int | None) -> list[torch.Tensor]:
    losses_fn, options, wrap, shared, pass_modules = CASES[case]
    torch.manual_seed(0)
    net = _Net().double()
    model = net
    if wrap and rank is not None:
        model = nn.parallel.DistributedDataParallel(net)
        _count_reductions(case, model)
    extra = {"shared_params": net.trunk} if shared else {}
    if pass_modules:
        extra["modules"] = model
    aggregator = AGGREGATORS.get(case, UPGrad)()
    optimizer = JDOptimizer(SGD(net.parameters(), lr=0.1), aggregator, **options, **extra)
    for step in range(STEPS):
        x, y = _global_data(step)
        if rank is not None:
            x, y = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]
        optimizer.zero_grad()
        optimizer.step(losses_fn(model(x), y))
    return [p.detach().clone() for p in net.parameters()]


def _accumulate_and_amp(rank: int | None) -> list[torch.Tensor]:
    """Two micro-batches per step, and a GradScaler: the same as one process on the whole
    batch without either."""
    torch.manual_seed(0)
    net = _Net().double()
    if rank is None:
        optimizer = JDOptimizer(SGD(net.parameters(), lr=0.1), UPGrad())
        for step in range(STEPS):
            x, y = _global_data(step)
            optimizer.zero_grad()
            optimizer.step(_task_losses(net(x), y))
        return [p.detach().clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    optimizer = JDOptimizer(SGD(net.parameters(), lr=0.1), UPGrad(), scaler=scaler)
    half = BATCH // 2
    for step in range(STEPS):
        x, y = _global_data(step)
        x, y = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]
        optimizer.zero_grad()
        for micro in range(2):
            part = slice(micro * half, (micro + 1) * half)
            losses = _task_losses(net(x[part]), y[part]) / 2
            optimizer.backward(scaler.scale(losses), aggregate=micro == 1)
        scaler.step(optimizer)
        scaler.update()
    return [p.detach().clone() for p in net.parameters()]


def _checkpointed(rank: int, out: str) -> list[torch.Tensor]:
    """Rank 0 saves a checkpoint after STEPS steps; then every rank takes one more step."""
    torch.manual_seed(0)
    net = _Net().double()
    optimizer = JDOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), jdoptim.Random(seed=3))
    for step in range(STEPS + 1):
        if step == STEPS and rank == 0:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
            torch.save(state, Path(out) / "checkpoint.pt")
        x, y = _global_data(step)
        x, y = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]
        optimizer.zero_grad()
        optimizer.step(_task_losses(net(x), y))
    return [p.detach().clone() for p in net.parameters()]


def _local_weighting(rank: int | None) -> list[torch.Tensor]:
    """Gramian mode with local weighting: each rank's per-sample losses weighted by UPGrad on
    the local Gramian, the weighted gradients averaged over ranks; without a rank, the same
    computed shard by shard in one process."""
    torch.manual_seed(0)
    net = _Net().double()
    x, y = _global_data(0)
    if rank is not None:
        optimizer = JDOptimizer(
            SGD(net.parameters(), lr=0.1),
            UPGrad(),
            mode="gramian",
            modules=net,
            local_weighting=True,
        )
        shard = slice(rank * BATCH, (rank + 1) * BATCH)
        optimizer.step(_sample_losses(net(x[shard]), y[shard]))
        return [p.detach().clone() for p in net.parameters()]
    grads = []
    for shard in range(WORLD):
        shard_net = _Net().double()
        shard_net.load_state_dict(net.state_dict())
        part = slice(shard * BATCH, (shard + 1) * BATCH)
        JDOptimizer(
            SGD(shard_net.parameters(), lr=0.1), UPGrad(), mode="gramian", modules=shard_net
        ).backward(_sample_losses(shard_net(x[part]), y[part]))
        grads.append([p.grad for p in shard_net.parameters()])
    with torch.no_grad():
        for p, *shard_grads in zip(net.parameters(), *grads, strict=True):
            p -= 0.1 * sum(shard_grads) / WORLD
    return [p.detach().clone() for p in net.parameters()]


def _auto_mode() -> str:
    """What ``mode="auto"`` chooses for a multi-task model (gramian mode in one process)."""
    net = _Net().double()
    optimizer = JDOptimizer(
        SGD(net.parameters(), lr=0.1), UPGrad(), mode="auto", shared_params=net.trunk
    )
    return optimizer.resolved_mode


def _ddp_broadcasts_rank_0s_model(rank: int) -> list[torch.Tensor]:
    """The ranks build their models from different seeds; wrapping them in DDP gives every rank
    rank 0's parameters."""
    torch.manual_seed(rank)
    net = _Net().double()
    nn.parallel.DistributedDataParallel(net)
    return [p.detach().clone() for p in net.parameters()]


def _auto_modes() -> tuple[str, str]:
    """What mode="auto" resolves to for a Gramian-based aggregator under data parallelism,
    without and with local_weighting."""
    net = _Net().double()
    return tuple(
        JDOptimizer(
            SGD(net.parameters(), lr=0.1),
            UPGrad(),
            mode="auto",
            modules=net,
            local_weighting=local,
        ).resolved_mode
        for local in (False, True)
    )


def _skip_consistently(rank: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = _Net().double()
    optimizer = JDOptimizer(SGD(net.parameters(), lr=0.1), UPGrad(), nonfinite="skip")
    x, y = _global_data(0)
    losses = _task_losses(net(x[rank * BATCH : (rank + 1) * BATCH]), y[:BATCH])
    if rank == 1:
        losses = losses * torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        optimizer.step(losses)
    return [p.detach().clone() for p in net.parameters()]


def _rank_work(rank: int, out: Path) -> dict:
    results = {case: _train(case, rank) for case in CASES}
    results["auto_mode"] = _auto_mode()
    results["skip"] = _skip_consistently(rank)
    results["local_weighting"] = _local_weighting(rank)
    results["accumulate_and_amp"] = _accumulate_and_amp(rank)
    results["checkpointed"] = _checkpointed(rank, str(out))
    results["broadcast"] = _ddp_broadcasts_rank_0s_model(rank)
    results["auto_modes"] = _auto_modes()
    results["ddp_reductions"] = dict(DDP_REDUCTIONS)
    return results


@pytest.fixture(scope="module")
def ranks_dir(tmp_path_factory) -> Path:
    return run_ranks(tmp_path_factory, _rank_work)


@pytest.fixture(scope="module")
def rank_results(ranks_dir) -> list[dict[str, list[torch.Tensor]]]:
    return load_results(ranks_dir)


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_agree_and_equal_one_process_on_the_global_batch(rank_results, case):
    expected = _train(case, rank=None)
    for rank in range(WORLD):
        for param, reference in zip(rank_results[rank][case], expected, strict=True):
            torch.testing.assert_close(param, reference, rtol=0, atol=1e-6)
    for a, b in zip(rank_results[0][case], rank_results[1][case], strict=True):
        assert torch.equal(a, b)


def test_gramian_mode_with_local_weighting_averages_the_ranks_weighted_gradients(rank_results):
    expected = _local_weighting(rank=None)
    for rank in range(WORLD):
        for param, reference in zip(rank_results[rank]["local_weighting"], expected, strict=True):
            torch.testing.assert_close(param, reference, rtol=0, atol=1e-10)


def test_accumulation_and_amp_under_data_parallelism(rank_results):
    expected = _accumulate_and_amp(rank=None)
    for rank in range(WORLD):
        for param, reference in zip(
            rank_results[rank]["accumulate_and_amp"], expected, strict=True
        ):
            torch.testing.assert_close(param, reference, rtol=0, atol=1e-6)


def test_a_checkpoint_of_rank_0_resumes_in_a_single_process(ranks_dir, rank_results):
    state = torch.load(ranks_dir / "checkpoint.pt", weights_only=False)
    net = _Net().double()
    net.load_state_dict(state["model"])
    optimizer = JDOptimizer(torch.optim.Adam(net.parameters(), lr=0.01), jdoptim.Random(seed=3))
    optimizer.load_state_dict(state["optimizer"])
    x, y = _global_data(STEPS)
    optimizer.step(_task_losses(net(x), y))
    for param, reference in zip(net.parameters(), rank_results[0]["checkpointed"], strict=True):
        torch.testing.assert_close(param, reference, rtol=0, atol=1e-6)


def test_auto_mode_takes_the_exact_jacobian_mode_under_data_parallelism(rank_results):
    assert _auto_mode() == "gramian"
    assert [results["auto_mode"] for results in rank_results] == ["jacobian"] * WORLD


@pytest.mark.parametrize("shared", [False, True])
def test_gramian_mode_refuses_data_parallelism_without_local_weighting(shared):
    torch.manual_seed(0)
    net = _Net().double()

    class _Group:  # stands for an initialised process group; only its presence matters
        pass

    options = {"shared_params": net.trunk} if shared else {}
    optimizer = JDOptimizer(
        SGD(net.parameters(), lr=0.1), UPGrad(), mode="gramian", modules=net, **options
    )
    optimizer.process_group = _Group()
    x, y = _global_data(0)
    losses = _task_losses(net(x), y) if shared else _sample_losses(net(x), y)
    with pytest.raises(ValueError, match="local_weighting=True"):
        optimizer.step(losses)
    assert all(p.grad is None for p in net.parameters())


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(rank_results):
    torch.manual_seed(0)
    initial = [p.detach() for p in _Net().double().parameters()]
    for rank in range(WORLD):
        for param, reference in zip(rank_results[rank]["skip"], initial, strict=True):
            assert torch.equal(param, reference)


def test_ddp_never_reduces_gradients_with_or_without_modules(rank_results):
    """JDOptimizer computes gradients with torch.autograd.grad, which runs none of DDP's hooks:
    DDP's all-reduce never runs, whether the DDP model is passed as modules= or not, and the
    updates are the same (both equal one process on the global batch, checked above)."""
    for rank in range(WORLD):
        assert rank_results[rank]["ddp_reductions"] == {
            "ddp_multi_task": 0,
            "ddp_without_modules": 0,
            "ddp_multi_task_auto": 0,
        }
    for a, b in zip(
        rank_results[0]["ddp_multi_task"], rank_results[0]["ddp_without_modules"], strict=True
    ):
        assert torch.equal(a, b)


def test_ddp_gives_every_rank_the_model_of_rank_0(rank_results):
    torch.manual_seed(0)
    rank_0 = [p.detach() for p in _Net().double().parameters()]
    for rank in range(WORLD):
        for param, reference in zip(rank_results[rank]["broadcast"], rank_0, strict=True):
            assert torch.equal(param, reference)


def test_auto_mode_is_jacobian_under_data_parallelism_unless_local_weighting(rank_results):
    for rank in range(WORLD):
        assert rank_results[rank]["auto_modes"] == ("jacobian", "gramian")


def test_a_seeded_randomised_aggregator_draws_the_same_on_every_rank(rank_results):
    for a, b in zip(rank_results[0]["checkpointed"], rank_results[1]["checkpointed"], strict=True):
        assert torch.equal(a, b)
