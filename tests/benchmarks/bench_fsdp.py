"""Peak memory per rank of a Jacobian descent step on a model sharded with ``fully_shard``
(FSDP2), against the same step on the unsharded model, with two gloo processes on the CPU.

A multi-task model (a trunk of four ``WIDTH × WIDTH`` linear layers, one linear head per task)
takes steps with UPGrad on the trunk (``shared_params``) and the task losses of a batch of
``BATCH``. Each run starts in a fresh process:

- *unsharded*: one process, the whole model and batch, `JDOptimizer` in jacobian mode (its
  default batched backward pass, and ``chunk_size=1``, one backward pass per loss);
- *FSDP*: two ranks, ``fully_shard`` on every linear layer and on the model, half of the batch
  each;

and each measures, around every step (after ``zero_grad()``, so that the gradients count), the
peak of its resident memory above what it held before the step (Linux's ``VmHWM``, reset
through ``/proc/self/clear_refs``, with glibc returning every freed block above 64 KiB to the
system), and the step's process CPU time. A plain SGD step of the sum of the losses, in the
same process, is the reference for both. The goal is a per-rank extra memory of the sharded JD
step of at most ``1 / ranks`` of the unsharded one's, plus the ``m × m`` terms.

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
BATCH = 32  # global
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


def _run(rank: int, tasks: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    sharded = world > 1
    if sharded:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        barrier = dist.barrier
    else:
        barrier = lambda: None  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 64, generator=generator)
    y = torch.randn(BATCH, tasks, generator=generator)
    if sharded:
        local = BATCH // world
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
    results = {}
    variants = [("SGD", None), ("JD", None)] + ([] if sharded else [("JD", 1)])
    for name, chunk_size in variants:
        torch.manual_seed(0)
        model = _MultiTask(tasks)
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for layer in [*model.trunk, *model.heads]:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
        sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
        if name == "SGD":
            zero = sgd.zero_grad

            def step(model=model, sgd=sgd):
                ((model(x) - y) ** 2).mean(dim=0).sum().backward()
                sgd.step()

        else:
            optimizer = JDOptimizer(
                sgd, UPGrad(), shared_params=model.trunk, modules=model, chunk_size=chunk_size
            )

            zero = optimizer.zero_grad

            def step(model=model, optimizer=optimizer):
                optimizer.step(((model(x) - y) ** 2).mean(dim=0))

        results[(name, chunk_size)] = _measure(zero, step, barrier)
        del model, sgd, step, zero
    trunk = sum(p.numel() for p in _MultiTask(tasks).trunk.parameters())
    torch.save({"results": results, "trunk": trunk}, Path(out) / f"{world}-{rank}.pt")
    if sharded:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tasks: int, world: int, out: str) -> list[dict]:
    mp.start_processes(
        _run, args=(tasks, world, _free_port(), out), nprocs=world, start_method="spawn"
    )
    return [torch.load(Path(out) / f"{world}-{rank}.pt") for rank in range(world)]


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
    print(f"trunk 64-{WIDTH}x4, batch {BATCH} (global), medians of {STEPS} steps per run")
    print()
    print(
        "| m | run | per-rank extra peak (MiB) | J per rank (MiB) | "
        "× unsharded JD / ranks | CPU ms per step | × plain step |"
    )
    print("|---|---|---|---|---|---|---|")
    for tasks in args.tasks:
        with tempfile.TemporaryDirectory() as out:
            (single,) = _launch(tasks, 1, out)
            ranks = _launch(tasks, RANKS, out)
        jacobian = tasks * single["trunk"] * 4 / MiB
        plain_one = single["results"][("SGD", None)]
        smallest = min(single["results"][("JD", None)][0], single["results"][("JD", 1)][0])
        rows = [
            ("unsharded, SGD", plain_one, None, plain_one),
            ("unsharded, JD", single["results"][("JD", None)], jacobian, plain_one),
            ("unsharded, JD chunk_size=1", single["results"][("JD", 1)], jacobian, plain_one),
        ]
        for rank, result in enumerate(ranks):
            plain = result["results"][("SGD", None)]
            rows.append((f"FSDP rank {rank}, SGD", plain, None, plain))
            rows.append(
                (f"FSDP rank {rank}, JD", result["results"][("JD", None)], jacobian / RANKS, plain)
            )
        for name, (extra, ms), j, (_, plain_ms) in rows:
            ratio = f"{extra / (smallest / RANKS):.2f}" if "JD" in name else ""
            shown_j = "" if j is None else f"{j:.0f}"
            print(
                f"| {tasks} | {name} | {extra:.0f} | {shown_j} | {ratio} | {ms:.0f} | "
                f"{ms / plain_ms:.1f} |"
            )


if __name__ == "__main__":
    main()
