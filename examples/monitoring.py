"""Monitoring conflicts between objectives, step by step, with Mean and with UPGrad.

Four regression tasks share a trunk that ends in two units, and two of the tasks pull its
features in nearly opposite directions. Two copies of the same initial model are trained on the
same batches with `jdoptim.JDOptimizer` (``shared_params=model.trunk``: the Jacobian of the
trunk is aggregated, each head gets its own task's gradient), one aggregating with `Mean`, the
other with `UPGrad`.

Each optimizer gets a hook with ``register_diagnostics_hook``, which turns diagnostics on and
receives, after every aggregation, a `jdoptim.diagnostics.StepDiagnostics` record computed from
the Gramian of the trunk's Jacobian: the norm of each task's gradient, their cosine similarities
and the number of conflicting pairs (negative cosine), the weights of the update, the cosine of
the update with each gradient, and whether the update conflicts with some task (would raise its
loss, to first order). The hook only keeps the record: its tensors stay where they are computed,
and are turned into numbers when the script prints them every few steps and at the end (and
writes one CSV row per step and aggregator with ``--log FILE``).

The summary gives, for each aggregator, the share of steps whose update conflicted with some
task, the mean number of conflicting pairs of gradients, and the mean weights and gradient
norms. The gradients conflict about as often in both runs: that is a property of the tasks. The
update conflicts with some task at many of Mean's steps and at none of UPGrad's.

Run ``python examples/monitoring.py`` (a few seconds on one CPU core); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import csv
from pathlib import Path

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer, Mean, UPGrad
from jdoptim.diagnostics import StepDiagnostics


def make_data(n: int, tasks: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[n, 10]`` and targets ``[n, tasks]``: ``y_k = s_k tanh(a_k·x)``, where task 2's
    direction is nearly the opposite of task 1's."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(10, tasks, generator=generator)
    directions[:, 1] = -directions[:, 0] + 0.3 * directions[:, 1]
    x = torch.randn(n, 10, generator=generator)
    scales = torch.linspace(0.5, 2.0, tasks)
    return x, scales * torch.tanh(x @ directions / 10**0.5)


class MultiTaskNet(nn.Module):
    """A trunk ending in two units, and one linear head per task."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(2, 1) for _ in range(tasks))

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def numbers(values: Tensor) -> str:
    return " ".join(f"{v:6.3f}" for v in values.tolist())


def csv_row(name: str, step: int, report: StepDiagnostics) -> dict[str, object]:
    """One row of the log: the scalar fields, then one column per task for the others."""
    m = len(report.gradient_norms)
    row: dict[str, object] = {
        "aggregator": name,
        "step": step,
        "conflicting_pairs": int(report.conflicting_pairs),
        "update_conflicts": bool(report.update_conflicts),
        "update_norm": report.update_norm.item(),
    }
    for field in ("gradient_norms", "weights", "alignments"):
        values = getattr(report, field)
        for k, value in enumerate(values.tolist() if values is not None else [None] * m):
            row[f"{field}_{k + 1}"] = value
    cosines = report.cosine_similarities.tolist()
    for i in range(m):
        for j in range(i + 1, m):
            row[f"cosine_{i + 1}_{j + 1}"] = cosines[i][j]
    return row


def smallest_cosine(report: StepDiagnostics) -> Tensor:
    """The smallest cosine similarity between two different tasks' gradients."""
    m = len(report.gradient_norms)
    i, j = torch.triu_indices(m, m, offset=1)
    return report.cosine_similarities[i, j].min()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--print-every", type=int, default=100)
    parser.add_argument("--log", type=Path, default=None, help="write every step to this CSV")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x_all, y_all = make_data(4096, args.tasks, args.seed)
    torch.manual_seed(args.seed)
    initial = MultiTaskNet(args.tasks)
    runs = {}
    for name, aggregator in [("Mean", Mean()), ("UPGrad", UPGrad())]:
        model = copy.deepcopy(initial)
        optimizer = JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=args.lr), aggregator, shared_params=model.trunk
        )
        history: list[StepDiagnostics] = []
        # The hook keeps the record; its tensors are read only when printed or written.
        optimizer.register_diagnostics_hook(
            lambda opt, report, history=history: history.append(report)
        )
        runs[name] = {"model": model, "optimizer": optimizer, "history": history}

    print(
        f"{args.tasks} regression tasks sharing a 2-unit trunk; SGD lr={args.lr}, batches of "
        f"{args.batch_size}, {args.steps} steps. Diagnostics of the trunk's Jacobian:"
    )
    print(
        f"{'step':>5}  {'aggregator':<10}  {'conflicting pairs':>17}  {'smallest cosine':>15}  "
        f"{'update conflicts':>16}  weights"
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    for step in range(1, args.steps + 1):  # the lines printed every few steps show progress
        batch = torch.randint(0, len(x_all), (args.batch_size,), generator=generator)
        x, y = x_all[batch], y_all[batch]
        for name, run in runs.items():
            losses = ((run["model"](x) - y) ** 2).mean(dim=0)  # [tasks]
            run["optimizer"].zero_grad()
            run["optimizer"].step(losses)
            if step % args.print_every == 0 or step == 1:
                report = run["history"][-1]
                print(
                    f"{step:>5}  {name:<10}  {int(report.conflicting_pairs):>17d}  "
                    f"{smallest_cosine(report):>15.3f}  {bool(report.update_conflicts)!s:>16}  "
                    f"{numbers(report.weights)}",
                    flush=True,
                )

    if args.log is not None:
        rows = [
            csv_row(name, step, report)
            for name, run in runs.items()
            for step, report in enumerate(run["history"], start=1)
        ]
        with args.log.open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"Wrote {len(rows)} rows to {args.log}.")

    print("Summary over all steps:")
    for name, run in runs.items():
        history = run["history"]
        conflicted = sum(bool(report.update_conflicts) for report in history)
        pairs = torch.stack([report.conflicting_pairs for report in history]).float().mean()
        weights = torch.stack([report.weights for report in history]).mean(dim=0)
        norms = torch.stack([report.gradient_norms for report in history]).mean(dim=0)
        with torch.no_grad():
            final = ((run["model"](x_all) - y_all) ** 2).mean(dim=0)
        print(
            f"  {name}: the update conflicted with some task at {conflicted} of {len(history)} "
            f"steps ({100 * conflicted / len(history):.1f}%); {pairs:.2f} conflicting pairs of "
            "gradients per step on average"
        )
        print(f"    mean weights         {numbers(weights)}")
        print(f"    mean gradient norms  {numbers(norms)}")
        print(f"    final task losses    {numbers(final)}")


if __name__ == "__main__":
    main()
