"""Multi-task Jacobian descent on several GPUs, or several CPU processes, with torchrun.

    torchrun --nproc_per_node=2 examples/distributed.py      # 2 GPUs with NCCL, else 2 CPU
                                                             # processes with gloo
    torchrun --nproc_per_node=2 examples/distributed.py --epochs 4 --resume
    python examples/distributed.py                           # one process, no torchrun

torchrun starts one process (rank) per device and tells each its ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``. Each rank places the model on its own GPU (``cuda:LOCAL_RANK``; the CPU when
there is no GPU), reads its own shard of every epoch through a ``DistributedSampler``, and
computes the task losses of its shard. `JDOptimizer` averages the ranks' Jacobians before
aggregating them, so every rank applies the same update, equal to one process stepping on the
global batch. Rank 0 alone prints and writes the checkpoint, which every rank can resume from.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from jdoptim import JDOptimizer, UPGrad

TASKS = 3


class MultiTask(nn.Module):
    """A shared trunk and one regression head per task."""

    def __init__(self, tasks: int = TASKS) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def make_dataset(samples: int) -> TensorDataset:
    """The same regression data on every rank: three targets computed from ten inputs."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 10, generator=generator)
    weights = torch.randn(10, TASKS, generator=generator)
    y = torch.tanh(x @ weights) + 0.1 * torch.randn(samples, TASKS, generator=generator)
    return TensorDataset(x, y)


def setup() -> tuple[int, int, torch.device]:
    """Join the process group when torchrun started this process; return the rank, the number
    of ranks and this rank's device."""
    if "RANK" not in os.environ:  # plain `python examples/distributed.py`
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])  # this process's index on its machine
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--checkpoint", type=Path, default=Path("distributed_checkpoint.pt"))
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args()

    rank, world, device = setup()
    torch.set_num_threads(1)  # several ranks may share one machine's cores
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {world} ranks.")

    torch.manual_seed(0)  # the same initial model on every rank
    model = MultiTask().to(device)
    ddp = model
    if world > 1:
        # Optional: JDOptimizer reduces across ranks by itself. DDP also broadcasts rank 0's
        # parameters and buffers, so the ranks start from the same model whatever their seed.
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        UPGrad(),
        shared_params=model.trunk,  # the heads get their own task's gradient
        modules=ddp,  # turns DDP's own gradient synchronisation off, which JD does not use
    )

    first_epoch = 0
    if args.resume:
        state = torch.load(args.checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch = state["epoch"]

    dataset = make_dataset(args.samples)
    # Each rank reads its own shard, reshuffled at every epoch by set_epoch, the same on every
    # rank; drop_last keeps the shards, and so the ranks' numbers of steps, equal.
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch // world, sampler=sampler, drop_last=True)

    if rank == 0:
        where = f"{world} ranks on {device.type}" if world > 1 else f"1 process on {device.type}"
        print(f"{where}, global batch {args.batch}, {len(loader)} steps per epoch.")
        print("epoch  mean task losses over the epoch (all ranks)")
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)
        totals = torch.zeros(TASKS, device=device)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            losses = ((ddp(x) - y) ** 2).mean(dim=0)  # one loss per task, on this rank's shard
            optimizer.zero_grad()
            optimizer.step(losses)
            totals += losses.detach()
        if world > 1:
            dist.all_reduce(totals)
        totals /= len(loader) * world
        if rank == 0:
            print(f"{epoch + 1:5d}  " + "  ".join(f"{value:.4f}" for value in totals.tolist()))
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
            }
            torch.save(state, args.checkpoint)
        if world > 1:
            dist.barrier()  # nobody resumes or exits before the checkpoint is written

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    if world > 1:
        gathered = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(gathered, checksum)
        if rank == 0:
            same = all(torch.equal(g, gathered[0]) for g in gathered)
            print(f"{world} ranks, identical parameters on every rank: {same}")
        dist.destroy_process_group()
    if rank == 0:
        print(f"Parameter checksum {checksum.item():.6f}; checkpoint {args.checkpoint}")


if __name__ == "__main__":
    main()
