"""Instance-wise risk minimisation (IWRM) on scikit-learn's digits: one objective per sample.

The losses of a batch are computed with ``reduction="none"``, so each sample's cross-entropy is
an objective of its own, and `jdoptim.JDOptimizer` computes their Jacobian (one row per sample)
and aggregates it with `UPGrad`. The same model is trained from the same initialisation with
`Mean`, which is ordinary SGD on the mean loss (empirical risk minimisation), on the same
batches.

At the same learning rate the two methods do not take steps of the same length: UPGrad's
weights sum to more than 1 when the samples' gradients conflict (averaging cancels the
conflicting components, projecting them does not), so UPGrad steps further. The comparison is
therefore made with each method at its own best learning rate: both are trained at every
learning rate of ``--lrs``, the validation accuracy of each run is printed, and each method is
reported at the learning rate where its validation accuracy is highest: its training loss, its
test accuracy, and how many of its steps increased the loss of at least one sample of the batch
(recomputed on the same batch after the step).

Run ``python examples/iwrm.py`` (needs scikit-learn); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits
from torch import nn

from jdoptim import JDOptimizer, Mean, UPGrad

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to plain progress lines
    tqdm = None


@dataclass
class Run:
    """One method trained at one learning rate."""

    validation_accuracy: float
    test_accuracy: float
    train_loss: float
    increased: int
    steps: int


def train(
    initial: nn.Module,
    aggregator: Mean | UPGrad,
    lr: float,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    args: argparse.Namespace,
) -> Run:
    """Train a copy of ``initial`` with ``aggregator`` at ``lr`` on the same batches as every
    other run (the batch order depends on the seed only)."""
    model = copy.deepcopy(initial)
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        aggregator,
        mode="jacobian",
        chunk_size=args.chunk_size,
    )
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x, y = data["train"]
    generator = torch.Generator().manual_seed(args.seed)
    increased = steps = 0
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(args.batch_size):
            losses = loss_fn(model(x[batch]), y[batch])  # [batch]: one objective per sample
            optimizer.zero_grad()
            optimizer.step(losses)
            with torch.no_grad():
                after = loss_fn(model(x[batch]), y[batch])
            increased += int((after > losses.detach()).any())
            steps += 1
    with torch.no_grad():
        accuracy = {
            split: (model(inputs).argmax(dim=1) == labels).float().mean().item()
            for split, (inputs, labels) in data.items()
        }
        train_loss = loss_fn(model(x), y).mean().item()
    return Run(accuracy["validation"], accuracy["test"], train_loss, increased, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3],
        help="SGD learning rates to train each method at",
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per backward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    splits = {"train": order[:1000], "validation": order[1000:1200], "test": order[1200:]}
    data = {split: (x[indices], y[indices]) for split, indices in splits.items()}

    torch.manual_seed(args.seed)
    initial = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    methods = {"Mean": Mean, "UPGrad": UPGrad}
    print(
        f"Digits: {len(splits['train'])} training, {len(splits['validation'])} validation and "
        f"{len(splits['test'])} test images;\none objective per sample, batches of "
        f"{args.batch_size}, SGD, {args.epochs} epochs."
    )
    start = time.perf_counter()
    settings = [(name, lr) for lr in args.lrs for name in methods]
    runs = {}
    for name, lr in settings if tqdm is None else tqdm(settings, desc="runs"):
        runs[name, lr] = train(initial, methods[name](), lr, data, args)
    print(f"Trained {len(runs)} runs in {time.perf_counter() - start:.1f} s.")

    print("Validation accuracy by learning rate:")
    print("  " + f"{'lr':>8}" + "".join(f"{name:>10}" for name in methods))
    for lr in args.lrs:
        cells = "".join(f"{runs[name, lr].validation_accuracy:10.3f}" for name in methods)
        print(f"  {lr:8g}{cells}")

    print("Each method at the learning rate of its best validation accuracy:")
    print(
        "                lr  training loss  test accuracy  steps that increased some sample's loss"
    )
    for name in methods:
        lr = max(args.lrs, key=lambda lr: runs[name, lr].validation_accuracy)
        run = runs[name, lr]
        share = 100 * run.increased / run.steps
        print(
            f"  {name:<8}  {lr:6g}  {run.train_loss:13.4f}  {run.test_accuracy:13.3f}  "
            f"{run.increased:>6d} / {run.steps} ({share:.1f}%)"
        )


if __name__ == "__main__":
    main()
