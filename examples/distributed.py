"""Jacobian descent under data parallelism with torch.distributed.

Launch on two CPU processes with

    torchrun --nproc_per_node=2 examples/distributed.py

or run it directly for one process. Each rank sees its own shard of the batch; JDOptimizer
reduces the Jacobian across ranks before aggregating, so every rank applies the same update,
equal to one process stepping on the whole batch.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from jdoptim import JDOptimizer, UPGrad


class MultiTask(nn.Module):
    """A shared trunk and one regression head per task."""

    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    args = parser.parse_args()

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial model on every rank
    model = MultiTask()
    ddp = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        UPGrad(),
        shared_params=model.trunk,  # the heads get their own task's gradient
        modules=ddp,  # turns off DDP's own gradient all-reduce: the optimizer reduces J itself
    )
    generator = torch.Generator().manual_seed(1)
    true_weights = torch.randn(10, 3, generator=generator)
    shard = args.batch // world
    for step in range(args.steps):
        x = torch.randn(args.batch, 10, generator=generator)
        y = torch.tanh(x @ true_weights) + 0.1 * torch.randn(args.batch, 3, generator=generator)
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        losses = ((ddp(x) - y) ** 2).mean(dim=0)  # one loss per task, averaged locally
        optimizer.zero_grad()
        optimizer.step(losses)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  task losses on rank 0's shard: {losses.detach().tolist()}")

    checksum = torch.stack([p.detach().sum() for p in model.parameters()]).sum()
    if distributed:
        gathered = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        if rank == 0:
            same = all(torch.equal(g, gathered[0]) for g in gathered)
            print(f"{world} ranks, identical parameters on every rank: {same}")
        dist.destroy_process_group()
    else:
        print(f"1 process, parameter checksum {checksum.item():.6f}")


if __name__ == "__main__":
    main()
