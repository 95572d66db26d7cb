"""Peak memory per rank of a Jacobian descent step on a model sharded with ``fully_shard``
(FSDP2), against the same step on the unsharded model, with two gloo processes on the CPU.

A multi-task model (a trunk of four ``WIDTH``-wide linear layers, one linear head per task)
takes steps with UPGrad in two settings:

- *task losses*: ``m`` tasks, jacobian mode on the trunk (``shared_params``), a batch of
  ``BATCH``;
- *one loss per sample*: ``m`` = the batch (``IWRM_BATCH``), gramian mode on the whole model.

Each run starts in a fresh process: *unsharded*, one process with the whole model and batch
(jacobian mode also with ``chunk_size=1``, one backward pass per loss); *FSDP*, two ranks with
``fully_shard`` on every linear layer and on the model, half of the batch each. Around every
step (after ``zero_grad()``, so that the gradients count) each process measures the peak of its
resident memory above what it held before the step (Linux's ``VmHWM``, reset through
``/proc/self/clear_refs``, with glibc returning every freed block above 64 KiB to the system),
and the step's process CPU time. A plain SGD step of the sum of the same losses, in the same
process, is the reference. The goal: a per-rank extra memory of the sharded JD step of at most
``1 / ranks`` of the unsharded one's, plus the ``m × m`` terms.

Run: ``python tests/benchmarks/bench_fsdp.py`` (``--tasks 8 32`` by default).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from jdoptim import JDOptimizer, UPGrad

WIDTH = 1024
BATCH = 32  # global, with task losses
IWRM_BATCH = 128  # global, with one loss per sample
STEPS = 5
RANKS = 2
MiB = 2**20


class _MultiTask(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, WIDTH), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(WIDTH, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def _kib(key: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def _measure(zero, step, barrier) -> tuple[float, float]:
    """The medians over STEPS steps (after one more to warm up) of the peak extra resident
    memory (MiB) and of the process CPU time (ms) of ``step()``, each after ``zero()``."""
    zero()
    step()
    extras, times = [], []
    for _ in range(STEPS):
        zero()
        gc.collect()
        barrier()
        before = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start = time.process_time()
        step()
        times.append(1e3 * (time.process_time() - start))
        extras.append((_kib("VmHWM") - before) / 1024)
    return statistics.median(extras), statistics.median(times)


def _run(rank: int, setting: str, tasks: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    sharded = world > 1
    if sharded:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        barrier = dist.barrier
    else:
        barrier = lambda: None  # noqa: E731
    per_sample = setting == "samples"
    batch = IWRM_BATCH if per_sample else BATCH
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 64, generator=generator)
    y = torch.randn(batch, tasks, generator=generator)
    if sharded:
        local = batch // world
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]

    def losses(model: nn.Module) -> torch.Tensor:
        return ((model(x) - y) ** 2).mean(dim=1 if per_sample else 0)

    if per_sample:
        variants = {"SGD": None, "JD": {"mode": "gramian"}}
    else:
        variants = {"SGD": None, "JD": {}} | (
            {} if sharded else {"JD chunk_size=1": {"chunk_size": 1}}
        )
    results = {}
    for name, options in variants.items():
        torch.manual_seed(0)
        model = _MultiTask(tasks)
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for layer in [*model.trunk, *model.heads]:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
        if options is None:
            zero = sgd.zero_grad

            def step(model=model, sgd=sgd):
                losses(model).sum().backward()
                sgd.step()

        else:
            shared = {} if per_sample else {"shared_params": model.trunk}
            optimizer = JDOptimizer(sgd, UPGrad(), modules=model, **shared, **options)
            zero = optimizer.zero_grad

            def step(model=model, optimizer=optimizer):
                optimizer.step(losses(model))

        results[name] = _measure(zero, step, barrier)
        del model, sgd, step, zero
    torch.save(results, Path(out) / f"{world}-{rank}.pt")
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(setting: str, tasks: int, world: int, out: str) -> list[dict]:
    mp.start_processes(
        _run,
        args=(setting, tasks, world, _free_port(), out),
        nprocs=world,
        start_method="spawn",
    )
    return [torch.load(Path(out) / f"{world}-{rank}.pt") for rank in range(world)]


def _table(setting: str, tasks: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        (single,) = _launch(setting, tasks, 1, out)
        ranks = _launch(setting, tasks, RANKS, out)
    # The smallest unsharded JD step is the reference of the goal.
    reference = min(extra for name, (extra, _) in single.items() if name != "SGD")
    objectives = IWRM_BATCH if setting == "samples" else tasks
    runs = [("unsharded", single)] + [(f"FSDP rank {r}", result) for r, result in enumerate(ranks)]
    for where, results in runs:
        plain_extra, plain_ms = results["SGD"]
        for name, (extra, ms) in results.items():
            ratio = ""
            if name != "SGD":
                ratio = f"{extra / (reference / (1 if where == 'unsharded' else RANKS)):.2f}"
            print(
                f"| {objectives} | {where}, {name} | {extra:.0f} | {extra - plain_extra:.0f} | "
                f"{ratio} | {ms:.0f} | {ms / plain_ms:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    # Every freed block above 64 KiB goes back to the system, so resident memory follows the
    # tensors alive (glibc reads this when a process starts).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
    print(f"torch {torch.__version__}, 1 thread per process, {RANKS} gloo ranks on the CPU")
    print(f"trunk 64-{WIDTH}x4, medians of {STEPS} steps per run; extra: peak resident memory")
    print("above the memory before the step; × unsharded / ranks: the per-rank extra over the")
    print("smallest unsharded JD step's divided by the ranks (the goal is at most 1)")
    header = (
        "| m | run | extra MiB | above the plain step MiB | × unsharded / ranks | "
        "CPU ms per step | × plain step |"
    )
    rule = "|---|---|---|---|---|---|---|"
    print(f"\nTask losses, jacobian mode on the trunk, batch {BATCH}:\n\n{header}\n{rule}")
    for tasks in args.tasks:
        _table("tasks", tasks)
    print(f"\nOne loss per sample, gramian mode, batch {IWRM_BATCH}, 8 heads:\n\n{header}\n{rule}")
    _table("samples", 8)


if __name__ == "__main__":
    main()
