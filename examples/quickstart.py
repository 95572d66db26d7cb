"""Jacobian descent in one minute: Mean vs UPGrad on four competing regression tasks.

Four regression targets are computed from the same inputs. A shared trunk feeds one small head
per task, and the trunk ends in a bottleneck of two units, so the tasks compete for it: their
gradients with respect to the trunk often conflict.

Two copies of the same initial model are trained side by side on the same mini-batches with
plain SGD inside `jdoptim.JDOptimizer`: one aggregates the Jacobian of the four task losses with
`Mean` (which is what ``losses.mean().backward()`` does), the other with `UPGrad`. After every
step the four losses are recomputed on the same batch, and the script counts the steps after
which at least one of them went up.

With plain SGD, an UPGrad step cannot increase any of the losses to first order (its direction
has a non-negative inner product with every task's gradient); a Mean step can, whenever the
gradients conflict. The two do not take steps of the same length at the same learning rate:
UPGrad's weights sum to more than 1 when the gradients conflict, and the script prints their
average sum, so the final losses it prints compare the two methods at one learning rate only.
The guarantee is a first-order one: with a large learning rate (try
``--lr 0.1 --seed 3``) the curvature of the losses can outweigh it. With ``--optimizer adam``
the per-coordinate scaling of Adam changes the direction of the step, and the guarantee no
longer holds at all.

Run it with ``python examples/quickstart.py`` (about 20 s on one CPU core); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer, Mean, UPGrad


def make_data(n: int, dim: int, tasks: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[n, dim]`` and targets ``[n, tasks]``: ``y_k = s_k tanh(a_k·x) + noise``."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(dim, tasks, generator=generator) / dim**0.5
    x = torch.randn(n, dim, generator=generator)
    scales = torch.linspace(0.5, 2.0, tasks)
    noise = 0.1 * torch.randn(n, tasks, generator=generator)
    return x, scales * torch.tanh(2.0 * x @ directions) + noise


class MultiTaskNet(nn.Module):
    """A shared trunk ending in a narrow bottleneck, and one linear head per task."""

    def __init__(self, dim: int, tasks: int, width: int, bottleneck: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, bottleneck), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(bottleneck, 1) for _ in range(tasks))

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The vector of the per-task mean squared errors, shape ``[tasks]``."""
    return ((model(x) - y) ** 2).mean(dim=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dim = 10
    x_all, y_all = make_data(args.samples, dim, args.tasks, args.seed)
    torch.manual_seed(args.seed)
    initial = MultiTaskNet(dim, args.tasks, width=64, bottleneck=2)

    inner = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[args.optimizer]
    runs = {}
    for name, aggregator in [("Mean", Mean()), ("UPGrad", UPGrad())]:
        model = copy.deepcopy(initial)
        # Diagnostics give each step's weights (one 4 × 4 Gramian more per step).
        optimizer = JDOptimizer(inner(model.parameters(), lr=args.lr), aggregator, diagnostics=True)
        runs[name] = {"model": model, "optimizer": optimizer, "increased": 0, "weight_sum": 0.0}

    print(
        f"{args.tasks} regression tasks, {args.samples} samples, shared trunk with a 2-unit "
        f"bottleneck, {args.optimizer.upper()} lr={args.lr}, batch {args.batch_size}."
    )
    print("Full-data loss of each task after each epoch:")
    header = f"tasks 1..{args.tasks}"
    print(f"{'epoch':>5}  {'Mean, ' + header:<{7 * args.tasks}} UPGrad, {header}")
    generator = torch.Generator().manual_seed(args.seed + 1)
    steps = 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(args.samples, generator=generator)
        for begin in range(0, args.samples, args.batch_size):
            batch = order[begin : begin + args.batch_size]
            x, y = x_all[batch], y_all[batch]
            for run in runs.values():
                losses = task_losses(run["model"], x, y)
                run["optimizer"].zero_grad()
                run["optimizer"].step(losses)  # Jacobian -> aggregator -> .grad -> SGD step
                with torch.no_grad():
                    after = task_losses(run["model"], x, y)
                run["increased"] += int((after > losses.detach()).any())
                run["weight_sum"] += run["optimizer"].last_diagnostics.weights.sum().item()
            steps += 1
        with torch.no_grad():
            columns = [
                " ".join(f"{v:6.3f}" for v in task_losses(run["model"], x_all, y_all).tolist())
                for run in runs.values()
            ]
        print(f"{epoch:>5}  {columns[0]}  {columns[1]}", flush=True)

    print(f"Trained in {time.perf_counter() - start:.1f} s.")
    print("Steps after which some task's loss on the same batch went up:")
    for name, run in runs.items():
        share = 100 * run["increased"] / steps
        print(f"  {name:<6}  {run['increased']:5d} / {steps} steps ({share:.1f}%)")
    mean_count, upgrad_count = runs["Mean"]["increased"], runs["UPGrad"]["increased"]
    if upgrad_count < mean_count:
        verdict = "UPGrad increased some objective on fewer steps than Mean."
    elif upgrad_count > mean_count:
        verdict = "UPGrad increased some objective on more steps than Mean."
    else:
        verdict = "Both increased some objective on the same number of steps."
    print(verdict)
    with torch.no_grad():
        for name, run in runs.items():
            final = task_losses(run["model"], x_all, y_all)
            print(f"Final mean of the task losses, {name}: {final.mean().item():.4f}")
    weight_sum = runs["UPGrad"]["weight_sum"] / steps
    print(
        f"UPGrad's weights summed to {weight_sum:.2f} on average, Mean's to 1: at one learning "
        "rate the two\ndo not take steps of the same length, so compare the final losses over a "
        "few learning rates (--lr)."
    )


if __name__ == "__main__":
    main()
