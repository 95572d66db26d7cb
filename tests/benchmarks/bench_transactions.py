"""What it costs a JDOptimizer step to be a transaction.

Before the methods run, each step keeps what it may have to put back: a copy of the method's
state (as large as its ``state_dict()``: ExcessMTL's is as large as the Jacobian) and the state
of torch's global generators. This script times steps with and without that snapshot, in the
same interleaved rounds, next to a plain torch.optim step.

Workload (as in ``bench_training.py``): multi-task learning with a trunk 64-256-256-256, 8
linear heads, batch 64, mean-reduced task losses. For each method, ``<method>`` is the normal
step and ``<method> no-snapshot`` the same step with the snapshot skipped (not a usable
configuration: only its time matters). On a shared machine, differences between the two below a
few percent are noise; the last lines time the snapshot alone, which is the cost itself.

Run: ``python tests/benchmarks/bench_transactions.py [--rounds 30]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

import jdoptim
from jdoptim import JDOptimizer
from jdoptim._state import GlobalGenerators, MethodState
from jdoptim.optimizer import _Call

TASKS = 8
METHODS = {
    "upgrad": jdoptim.UPGrad,
    "excessmtl": jdoptim.ExcessMTL,
    "gradvac": lambda: jdoptim.GradVac(seed=0),
    "famo": jdoptim.scalarization.FAMO,
}


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)
        )
        self.heads = nn.ModuleList(nn.Linear(256, 1) for _ in range(TASKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


def _without_snapshot(optimizer: JDOptimizer) -> None:
    """Make ``optimizer`` skip the snapshot (its refusals would then restore nothing)."""

    @contextlib.contextmanager
    def transaction(runs_method: bool):
        yield _Call(state=None, generators=None, diagnostics=None)  # type: ignore[arg-type]

    optimizer._transaction = transaction  # type: ignore[method-assign]


def make(variant: str):
    torch.manual_seed(0)
    model = MultiTask()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    if variant == "sgd":
        return model, sgd
    name = variant.split()[0]
    optimizer = JDOptimizer(sgd, METHODS[name]())
    if variant.endswith("no-snapshot"):
        _without_snapshot(optimizer)
    return model, optimizer


def step(variant: str, model, optimizer, x, y) -> None:
    losses = ((model(x) - y) ** 2).mean(dim=0)
    optimizer.zero_grad()
    if variant == "sgd":
        losses.mean().backward()
        optimizer.step()
    else:
        optimizer.step(losses)


VARIANTS = ["sgd"] + [f"{name}{suffix}" for name in METHODS for suffix in ("", " no-snapshot")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}")
    print(f"MTL: trunk 64-256-256-256, {TASKS} heads, batch 64; {args.rounds} interleaved rounds")
    setups = {variant: make(variant) for variant in VARIANTS}
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, generator=generator)
    y = torch.randn(64, TASKS, generator=generator)
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for variant in VARIANTS:  # warm-up
        step(variant, *setups[variant], x, y)
    for _ in range(args.rounds):
        for variant in VARIANTS:
            start = time.process_time()
            step(variant, *setups[variant], x, y)
            times[variant].append(time.process_time() - start)
    reference = statistics.median(times["sgd"])
    print(f"{'variant':<22} {'median ms':>10} {'x SGD':>7} {'step vs no-snapshot':>20}")
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        cost = ""
        if variant != "sgd" and not variant.endswith("no-snapshot"):
            bare = statistics.median(times[f"{variant} no-snapshot"])
            cost = f"{100 * (median - bare) / bare:+.1f} %"
        print(f"{variant:<22} {1e3 * median:>10.2f} {median / reference:>7.2f} {cost:>20}")
    print("the snapshot alone (MethodState and GlobalGenerators of the trained optimizers):")
    for name in METHODS:
        optimizer = setups[name][1]
        devices = [p.device for p in optimizer._parameters()]
        repeats = 200
        start = time.process_time()
        for _ in range(repeats):
            MethodState(optimizer.aggregator)
            GlobalGenerators(devices)
        elapsed = (time.process_time() - start) / repeats
        print(f"  {name:<20} {1e6 * elapsed:>8.1f} us, {100 * elapsed / reference:.1f} % of SGD")


if __name__ == "__main__":
    main()
