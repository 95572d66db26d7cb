"""Instance-wise multi-task learning (IWMTL): one objective per sample and per task.

Three classification tasks are read from the same inputs by one model whose outputs are the
logits of every task. With ``reduction="none"``, the cross-entropies form a ``[batch, tasks]``
tensor: each entry, the loss of one task on one sample, is an objective of its own, so a batch
of 32 samples and 3 tasks gives 96 objectives.

`jdoptim.JDOptimizer` runs in gramian mode (``mode="gramian", modules=model``): the Gramian
engine builds the ``96 × 96`` Gramian of those losses from one backward pass to the layers'
outputs, without the ``96 × n`` Jacobian, the aggregator's weighting turns it into weights, and
the engine writes the weighted gradient into ``.grad``. Two copies of the same initial model are
trained on the same batches: one with `UPGrad`, whose step conflicts with none of the 96
gradients, one with `Mean`, which is plain SGD on the mean loss.

After every step, the losses of the batch are recomputed; the script counts the steps after
which at least one (sample, task) loss went up, then prints each task's training loss and test
accuracy for both runs, and the time per step. Averaging 96 gradients that partly cancel gives a
short step: over the first epoch, Mean's update is less than half as long as UPGrad's, so
compare the two over a few learning rates (``--lr``) before drawing conclusions. UPGrad's
guarantee is a first-order one: with a larger learning rate, curvature can still raise some
losses.

The cross-entropies are plain (no label smoothing): the samples that the model already
classifies with a large margin get gradients many orders of magnitude smaller than the others',
some exactly zero, and the Gramian formed in float32 is singular and slightly indefinite. The
dual-cone solve handles such Gramians exactly, with no regularisation.

Run ``python examples/iwmtl.py`` (about 10 s on one CPU core); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from jdoptim import JDOptimizer, Mean, UPGrad

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to plain progress lines
    tqdm = None

CLASSES = 4


def make_data(n: int, dim: int, tasks: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[n, dim]`` and labels ``[n, tasks]``.

    Task ``t`` labels a sample with the class of the largest of ``CLASSES`` random projections,
    two of which it shares with the previous task, so that the tasks are related but differ.
    """
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(dim, 2 * tasks + 2, generator=generator)
    x = torch.randn(n, dim, generator=generator)
    scores = x @ directions + 0.3 * torch.randn(n, 2 * tasks + 2, generator=generator)
    labels = torch.stack([scores[:, 2 * t : 2 * t + CLASSES].argmax(dim=1) for t in range(tasks)])
    return x, labels.T


class MultiTaskNet(nn.Module):
    """An MLP whose last layer gives ``CLASSES`` logits per task."""

    def __init__(self, dim: int, tasks: int, width: int) -> None:
        super().__init__()
        self.tasks = tasks
        self.layers = nn.Sequential(
            nn.Linear(dim, width),
            nn.ReLU(),
            nn.Linear(width, width // 2),
            nn.ReLU(),
            nn.Linear(width // 2, tasks * CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).view(len(x), self.tasks, CLASSES)  # [batch, tasks, classes]


def losses_of(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    """The cross-entropy of every sample on every task, shape ``[batch, tasks]``."""
    logits = model(x).transpose(1, 2)  # [batch, classes, tasks]
    return nnf.cross_entropy(logits, labels, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2048, help="training samples")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dim, test_size = 16, 1024
    x_all, labels_all = make_data(args.samples + test_size, dim, args.tasks, args.seed)
    x, labels = x_all[: args.samples], labels_all[: args.samples]
    x_test, labels_test = x_all[args.samples :], labels_all[args.samples :]

    torch.manual_seed(args.seed)
    initial = MultiTaskNet(dim, args.tasks, width=64)
    runs = {}
    for name, aggregator in [("Mean", Mean()), ("UPGrad", UPGrad())]:
        model = copy.deepcopy(initial)
        # Gramian mode records the forward pass: build the optimizer before running the model.
        optimizer = JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=args.lr),
            aggregator,
            mode="gramian",
            modules=model,
        )
        runs[name] = {"model": model, "optimizer": optimizer, "increased": 0, "seconds": 0.0}

    objectives = args.batch_size * args.tasks
    print(
        f"{args.tasks} classification tasks of {CLASSES} classes, {args.samples} training and "
        f"{test_size} test samples; losses of shape [{args.batch_size}, {args.tasks}]: "
        f"{objectives} objectives per step, in gramian mode; SGD lr={args.lr}."
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    steps = 0
    epochs = range(1, args.epochs + 1)
    for epoch in epochs if tqdm is None else tqdm(epochs, desc="epochs"):
        for batch in torch.randperm(args.samples, generator=generator).split(args.batch_size):
            for run in runs.values():
                start = time.perf_counter()
                losses = losses_of(run["model"], x[batch], labels[batch])  # [batch, tasks]
                run["optimizer"].zero_grad()
                run["optimizer"].step(losses)
                run["seconds"] += time.perf_counter() - start
                with torch.no_grad():
                    after = losses_of(run["model"], x[batch], labels[batch])
                run["increased"] += int((after > losses.detach()).any())
            steps += 1
        if tqdm is None:
            print(f"epoch {epoch}/{args.epochs} done", flush=True)

    width = 8 * args.tasks
    names = "".join(f"{f'task {t + 1}':>8}" for t in range(args.tasks))
    print(f"After {steps} steps:")
    print(f"{'':10}{'training loss':>{width}}  {'test accuracy':>{width}}  {'ms/step':>8}")
    print(f"{'':10}{names}  {names}")
    for name, run in runs.items():
        with torch.no_grad():
            train_loss = losses_of(run["model"], x, labels).mean(dim=0)
            correct = run["model"](x_test).argmax(dim=2) == labels_test
            accuracy = correct.float().mean(dim=0)
        loss_cells = "".join(f"{v:8.4f}" for v in train_loss.tolist())
        accuracy_cells = "".join(f"{v:8.3f}" for v in accuracy.tolist())
        milliseconds = 1000 * run["seconds"] / steps
        print(f"  {name:<8}{loss_cells}  {accuracy_cells}  {milliseconds:8.2f}")
    print("Steps after which some (sample, task) loss of the batch went up:")
    for name, run in runs.items():
        share = 100 * run["increased"] / steps
        print(f"  {name:<8}  {run['increased']:5d} / {steps} ({share:.1f}%)")


if __name__ == "__main__":
    main()
