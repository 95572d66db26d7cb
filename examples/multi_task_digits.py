"""Multi-task learning on MultiDigits: read two overlapping handwritten digits at once.

Each image is a 12×12 canvas holding two 8×8 digits from scikit-learn's bundled ``load_digits``
data set, one in the top-left corner and one in the bottom-right corner, overlapping in the
middle (pixel-wise maximum). Task 1 classifies the top-left digit, task 2 the bottom-right one.
A shared trunk feeds one linear head per task.

Copies of the same initial model are trained on the same batches with SGD (momentum 0.9)
inside `jdoptim.JDOptimizer`: with `Mean` (ordinary training on the mean of the two losses) and
with `UPGrad`. ``shared_params=model.trunk`` aggregates the Jacobian of the trunk only; each
head receives the ordinary gradient of its own task's loss.

At one learning rate the two would not take steps of the same length (UPGrad's weights sum to
more than 1 when the tasks' gradients conflict), so each method is trained at every learning
rate of ``--lrs`` and reported at the one where its mean validation accuracy over the two tasks
is highest. The script prints the validation accuracies of the sweep, then each method's test
accuracy on both tasks at its chosen learning rate.

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


def train(
    initial: TwoHeads,
    aggregator: Mean | UPGrad,
    lr: float,
    data: dict[str, tuple[Tensor, Tensor]],
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    """Train a copy of ``initial`` on the same batches as every other run; return the accuracy
    of both tasks on the validation and test canvases."""
    model = copy.deepcopy(initial)
    inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    optimizer = JDOptimizer(inner, aggregator, shared_params=model.trunk)
    x, y = data["train"]
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x), generator=generator).split(args.batch_size):
            optimizer.zero_grad()
            optimizer.step(task_losses(model, x[batch], y[batch]))
    return {split: accuracies(model, *data[split]) for split in ("validation", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--validation-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[0.01, 0.03, 0.1, 0.3],
        help="SGD learning rates to train each method at",
    )
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(args.seed)
    # The digits of the test canvases are images never seen in training or validation.
    order = torch.randperm(len(images), generator=generator)
    seen, unseen = order[: len(order) * 7 // 10], order[len(order) * 7 // 10 :]
    sizes = {"train": args.train_size, "validation": args.validation_size}
    data = {
        split: multi_digits(images[seen], labels[seen], size, generator)
        for split, size in sizes.items()
    }
    data["test"] = multi_digits(images[unseen], labels[unseen], args.test_size, generator)

    torch.manual_seed(args.seed)
    initial = TwoHeads(args.width)
    methods = {"Mean": Mean, "UPGrad": UPGrad}
    print(
        f"MultiDigits: {args.train_size} training, {args.validation_size} validation and "
        f"{args.test_size} test canvases of two digits;\nSGD with momentum 0.9, batch "
        f"{args.batch_size}, {args.epochs} epochs."
    )
    start = time.perf_counter()
    settings = [(name, lr) for lr in args.lrs for name in methods]
    runs = {}
    for name, lr in settings if tqdm is None else tqdm(settings, desc="runs"):
        runs[name, lr] = train(initial, methods[name](), lr, data, args)
    print(f"Trained {len(runs)} runs in {time.perf_counter() - start:.1f} s.")

    def validation(name: str, lr: float) -> float:
        return sum(runs[name, lr]["validation"]) / 2

    print("Mean validation accuracy of the two tasks, by learning rate:")
    print("  " + f"{'lr':>8}" + "".join(f"{name:>10}" for name in methods))
    for lr in args.lrs:
        print(f"  {lr:8g}" + "".join(f"{validation(name, lr):10.3f}" for name in methods))

    print("Test accuracy at each method's best learning rate:")
    print("                lr  top-left digit  bottom-right digit")
    for name in methods:
        lr = max(args.lrs, key=lambda lr: validation(name, lr))
        left, right = runs[name, lr]["test"]
        print(f"  {name:<8}  {lr:6g}  {left:14.3f}  {right:18.3f}")


if __name__ == "__main__":
    main()
