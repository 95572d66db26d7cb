"""Communication cost of a distributed Jacobian descent step (two gloo processes on the CPU).

Data-parallel SGD all-reduces one gradient (n floats) per step; `JDOptimizer` all-reduces the
Jacobian of the aggregated parameters (m × n floats) with ``accumulation="sum"``, or all-gathers
it with ``"concat"``. This script times both collectives for several m and n, and a full step of
a plain DistributedDataParallel SGD step against a JDOptimizer step with UPGrad on the same
two-rank multi-task model.

Run: ``python tests/benchmarks/bench_distributed.py``.
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from jdoptim import JDOptimizer, UPGrad

REPS = 15


def _median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(REPS):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


class _MultiTask(nn.Module):
    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = []
    for n in (100_000, 1_000_000):
        gradient = torch.randn(n)
        base = _median_ms(lambda g=gradient: dist.all_reduce(g))
        for m in (2, 8, 32):
            jacobian = torch.randn(m, n)
            reduce_ms = _median_ms(lambda j=jacobian: dist.all_reduce(j))
            gathered = [torch.empty_like(jacobian) for _ in range(2)]
            gather_ms = _median_ms(lambda j=jacobian, out=gathered: dist.all_gather(out, j))
            rows.append((n, m, base, reduce_ms, gather_ms))
    steps = []
    for tasks in (2, 8):
        torch.manual_seed(0)
        model = _MultiTask(tasks)
        x, y = torch.randn(32, 64), torch.randn(32, tasks)
        ddp = nn.parallel.DistributedDataParallel(model)
        sgd = torch.optim.SGD(ddp.parameters(), lr=1e-3)

        def ddp_step(ddp=ddp, sgd=sgd, x=x, y=y):
            sgd.zero_grad()
            ((ddp(x) - y) ** 2).mean().backward()
            sgd.step()

        torch.manual_seed(0)
        jd_model = _MultiTask(tasks)
        jd_ddp = nn.parallel.DistributedDataParallel(jd_model)
        jd = JDOptimizer(
            torch.optim.SGD(jd_model.parameters(), lr=1e-3),
            UPGrad(),
            shared_params=jd_model.trunk,
            modules=jd_ddp,
        )

        def jd_step(jd_ddp=jd_ddp, jd=jd, x=x, y=y):
            jd.zero_grad()
            jd.step(((jd_ddp(x) - y) ** 2).mean(dim=0))

        steps.append((tasks, _median_ms(ddp_step), _median_ms(jd_step)))
    if rank == 0:
        print(f"torch {torch.__version__}, gloo, 2 processes, threads per process: 1")
        print(
            f"{'n':>9} {'m':>3} {'grad all-reduce ms':>19} {'J all-reduce ms':>16} "
            f"{'x grad':>7} {'J all-gather ms':>16}"
        )
        for n, m, base, reduce_ms, gather_ms in rows:
            print(
                f"{n:>9} {m:>3} {base:>19.2f} {reduce_ms:>16.2f} {reduce_ms / base:>7.1f} "
                f"{gather_ms:>16.2f}"
            )
        print(f"\n{'tasks':>5} {'DDP SGD step ms':>16} {'JD UPGrad step ms':>18} {'x DDP':>6}")
        for tasks, ddp_ms, jd_ms in steps:
            print(f"{tasks:>5} {ddp_ms:>16.2f} {jd_ms:>18.2f} {jd_ms / ddp_ms:>6.1f}")
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port,), nprocs=2, join=True)


if __name__ == "__main__":
    main()
