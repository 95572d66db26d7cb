"""Instance-wise risk minimisation (IWRM) on scikit-learn's digits: one objective per sample.

The losses of a batch are computed with ``reduction="none"``, so each sample's cross-entropy is
an objective of its own, and `jdoptim.JDOptimizer` computes their Jacobian (one row per sample)
and aggregates it with `UPGrad`. The same model is trained from the same initialisation with
`Mean`, which is ordinary SGD on the mean loss (empirical risk minimisation), on the same
batches.

After each step the per-sample losses of the batch are recomputed, and the script counts the
steps after which the loss of at least one sample of the batch went up; then it prints the
training loss and the test accuracy of both runs. At the same learning rate, UPGrad's steps are
usually longer than Mean's (averaging cancels the conflicting components of the gradients,
projecting them does not), so compare the two over a few learning rates (``--lr``) before
drawing conclusions; with a small one, no UPGrad step increases any sample's loss.

Run ``python examples/iwrm.py`` (needs scikit-learn); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from jdoptim import JDOptimizer, Mean, UPGrad

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to plain progress lines
    tqdm = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per backward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(x), generator=generator)
    train, test = order[:1200], order[1200:]

    torch.manual_seed(args.seed)
    initial = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    runs = {}
    for name, aggregator in [("Mean", Mean()), ("UPGrad", UPGrad())]:
        model = copy.deepcopy(initial)
        inner = torch.optim.SGD(model.parameters(), lr=args.lr)
        optimizer = JDOptimizer(inner, aggregator, mode="jacobian", chunk_size=args.chunk_size)
        runs[name] = {"model": model, "optimizer": optimizer, "increased": 0}

    print(
        f"Digits: {len(train)} training and {len(test)} test images; one objective per sample, "
        f"batches of {args.batch_size}; SGD lr={args.lr}."
    )
    steps = 0
    start = time.perf_counter()
    epochs = range(1, args.epochs + 1)
    for epoch in epochs if tqdm is None else tqdm(epochs, desc="epochs"):
        for batch in train[torch.randperm(len(train), generator=generator)].split(args.batch_size):
            for run in runs.values():
                losses = loss_fn(run["model"](x[batch]), y[batch])  # [batch]: one per sample
                run["optimizer"].zero_grad()
                run["optimizer"].step(losses)
                with torch.no_grad():
                    after = loss_fn(run["model"](x[batch]), y[batch])
                run["increased"] += int((after > losses.detach()).any())
            steps += 1
        if tqdm is None:
            print(f"epoch {epoch}/{args.epochs} done", flush=True)
    print(f"Trained in {time.perf_counter() - start:.1f} s.")

    print("            training loss  test accuracy  steps that increased some sample's loss")
    for name, run in runs.items():
        with torch.no_grad():
            train_loss = loss_fn(run["model"](x[train]), y[train]).mean().item()
            accuracy = (run["model"](x[test]).argmax(dim=1) == y[test]).float().mean().item()
        share = 100 * run["increased"] / steps
        print(
            f"  {name:<8}  {train_loss:13.4f}  {accuracy:13.3f}  "
            f"{run['increased']:>6d} / {steps} ({share:.1f}%)"
        )


if __name__ == "__main__":
    main()
