"""Multi-task learning on MultiDigits: read two overlapping handwritten digits at once.

Each image is a 12×12 canvas holding two 8×8 digits from scikit-learn's bundled ``load_digits``
data set, one in the top-left corner and one in the bottom-right corner, overlapping in the
middle (pixel-wise maximum). Task 1 classifies the top-left digit, task 2 the bottom-right one.
A shared trunk feeds one linear head per task.

Two copies of the same initial model are trained on the same batches with SGD inside
`jdoptim.JDOptimizer`: one with `Mean` (ordinary training on the mean of the two losses), one
with `UPGrad`. ``shared_params=model.trunk`` aggregates the Jacobian of the trunk only; each
head receives the ordinary gradient of its own task's loss. The script prints the test accuracy
of both tasks for both runs.

Run ``python examples/multi_task_digits.py`` (needs scikit-learn); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from jdoptim import JDOptimizer, Mean, UPGrad

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to plain progress lines
    tqdm = None


def multi_digits(
    images: Tensor, labels: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` canvases ``[n, 144]`` of two random digits, and their labels ``[n, 2]``."""
    first = torch.randint(len(images), (n,), generator=generator)
    second = torch.randint(len(images), (n,), generator=generator)
    canvas = torch.zeros(n, 12, 12)
    canvas[:, :8, :8] = images[first]
    canvas[:, 4:, 4:] = torch.maximum(canvas[:, 4:, 4:], images[second])
    return canvas.reshape(n, -1), torch.stack([labels[first], labels[second]], dim=1)


class TwoHeads(nn.Module):
    """A shared MLP trunk and one 10-class linear head per digit."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(144, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(width, 10) for _ in range(2))

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.trunk(x)
        return [head(features) for head in self.heads]


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The two tasks' mean cross-entropies, shape ``[2]``."""
    logits = model(x)
    return torch.stack([nn.functional.cross_entropy(logits[k], y[:, k]) for k in range(2)])


@torch.no_grad()
def accuracies(model: nn.Module, x: Tensor, y: Tensor) -> list[float]:
    logits = model(x)
    return [(logits[k].argmax(dim=1) == y[:, k]).float().mean().item() for k in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(args.seed)
    # Digits of the test canvases are images never seen in training.
    order = torch.randperm(len(images), generator=generator)
    train_images, test_images = order[: len(order) * 7 // 10], order[len(order) * 7 // 10 :]
    x_train, y_train = multi_digits(
        images[train_images], labels[train_images], args.train_size, generator
    )
    x_test, y_test = multi_digits(
        images[test_images], labels[test_images], args.test_size, generator
    )

    torch.manual_seed(args.seed)
    initial = TwoHeads(args.width)
    runs = {}
    for name, aggregator in [("Mean", Mean()), ("UPGrad", UPGrad())]:
        model = copy.deepcopy(initial)
        inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        optimizer = JDOptimizer(inner, aggregator, shared_params=model.trunk)
        runs[name] = (model, optimizer)

    print(
        f"MultiDigits: {args.train_size} training and {args.test_size} test canvases of two "
        f"digits; SGD lr={args.lr}, momentum 0.9, batch {args.batch_size}."
    )
    start = time.perf_counter()
    epochs = range(1, args.epochs + 1)
    for epoch in epochs if tqdm is None else tqdm(epochs, desc="epochs"):
        batches = torch.randperm(args.train_size, generator=generator).split(args.batch_size)
        for batch in batches:
            for model, optimizer in runs.values():
                optimizer.zero_grad()
                optimizer.step(task_losses(model, x_train[batch], y_train[batch]))
        if tqdm is None:
            print(f"epoch {epoch}/{args.epochs} done", flush=True)
    print(f"Trained in {time.perf_counter() - start:.1f} s.")

    print("Test accuracy     top-left digit  bottom-right digit")
    for name, (model, _) in runs.items():
        left, right = accuracies(model, x_test, y_test)
        print(f"  {name:<14}  {left:14.3f}  {right:18.3f}")


if __name__ == "__main__":
    main()
