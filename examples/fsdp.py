"""Multi-task Jacobian descent on a model sharded with FSDP2 (``fully_shard``), with torchrun.

    torchrun --nproc_per_node=2 examples/fsdp.py      # 2 GPUs with NCCL, else 2 CPU processes
                                                      # with gloo
    torchrun --nproc_per_node=2 examples/fsdp.py --epochs 4 --resume
    torchrun --nproc_per_node=2 examples/fsdp.py --bf16   # bfloat16 compute, float32 reduction
    python examples/fsdp.py                           # one process

``fully_shard`` splits every parameter across the ranks: each rank stores only its shard (a
``DTensor``), and FSDP gathers a layer's parameters just before the layer runs. `JDOptimizer`
computes, on each rank, its shard of every task's gradient (averaged over the global batch as
FSDP averages gradients), sums the ranks' ``m × m`` Gramians, derives the same UPGrad weights on
every rank, and updates each shard with its part of the aggregated update: the step of one process
on the whole model and the global batch, with the memory of the Jacobian divided by the ranks.
Checkpoints are sharded too (``torch.distributed.checkpoint``: each rank writes its shards) and
carry the aggregator's configuration and state.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from jdoptim import JDOptimizer, UPGrad
from jdoptim.distributed import get_state_dict, set_state_dict

TASKS = 3


class MultiTask(nn.Module):
    """A shared trunk and one regression head per task."""

    def __init__(self, tasks: int = TASKS, width: int = 256) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, 16), nn.ReLU(),
        )  # fmt: skip
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
    """Join the process group (of one process without torchrun, since fully_shard needs one);
    return the rank, the number of ranks and this rank's device."""
    if "RANK" not in os.environ:  # plain `python examples/fsdp.py`
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])  # this process's index on its machine
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def shard(model: MultiTask, bf16: bool) -> None:
    """Shard each linear layer, then the model: a layer's parameters are gathered only while it
    runs. With ``bf16``, layers compute in bfloat16 and gradients are reduced in float32."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32 if bf16 else None,
    )
    for layer in [*model.trunk, *model.heads]:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def latest(folder: Path) -> Path:
    """The checkpoint of the latest epoch in ``folder``."""
    saved = sorted(folder.glob("epoch-*"), key=lambda path: int(path.name.split("-")[1]))
    if not saved:
        raise SystemExit(f"No checkpoint to resume from in {folder}.")
    return saved[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bf16", action="store_true", help="compute in bfloat16")
    parser.add_argument(
        "--checkpoint", type=Path, default=Path("fsdp_checkpoints"), help="a folder"
    )
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args()

    rank, world, device = setup()
    torch.set_num_threads(1)  # several ranks may share one machine's cores
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split evenly over {world} ranks.")

    torch.manual_seed(0)  # the same initial model on every rank, before sharding
    model = MultiTask().to(device)
    total = sum(p.numel() for p in model.parameters())
    shard(model, args.bf16)
    local = sum(p.to_local().numel() for p in model.parameters())
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        UPGrad(),
        shared_params=model.trunk,  # the heads get their own task's gradient
        modules=model,
    )

    first_epoch = 0
    if args.resume:
        # The templates say what to read; the folder holds each rank's shards.
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "epoch": 0}
        dcp.load(state, checkpoint_id=latest(args.checkpoint))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        first_epoch = state["epoch"]

    dataset = make_dataset(args.samples)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch // world, sampler=sampler, drop_last=True)

    if rank == 0:
        where = f"{world} ranks on {device.type}" if world > 1 else f"1 process on {device.type}"
        print(f"{where}, global batch {args.batch}, {len(loader)} steps per epoch.")
        print(f"Rank 0 holds {local} of the model's {total} parameters.")
        print("epoch  mean task losses over the epoch (all ranks)")
    for epoch in range(first_epoch, args.epochs):
        sampler.set_epoch(epoch)
        totals = torch.zeros(TASKS, device=device)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            losses = ((model(x).float() - y) ** 2).mean(dim=0)  # one loss per task
            optimizer.zero_grad()
            optimizer.step(losses)
            totals += losses.detach()
        dist.all_reduce(totals)
        totals /= len(loader) * world
        if rank == 0:
            print(f"{epoch + 1:5d}  " + "  ".join(f"{value:.4f}" for value in totals.tolist()))
        # Every rank writes its own shards (and rank 0 the aggregator's state).
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "epoch": epoch + 1}
        dcp.save(state, checkpoint_id=args.checkpoint / f"epoch-{epoch + 1}")

    # full_tensor() gathers a parameter from the shards: every rank gets the same checksum.
    checksum = sum(p.full_tensor().double().sum() for p in model.parameters())
    if rank == 0:
        print(f"Parameter checksum {checksum.item():.6f}; checkpoint {args.checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
