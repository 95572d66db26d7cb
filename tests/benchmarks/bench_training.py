"""Time and memory of a JDOptimizer step in Jacobian mode against a plain torch.optim step.

Workload (from the project's performance notes): multi-task learning with a trunk
64-256-256-256, 8 linear heads, batch 64, mean-reduced task losses. Variants, interleaved in
the same rounds:

- ``sgd``: the mean of the losses, one backward, ``SGD.step`` (the reference);
- ``jd-mean``: `JDOptimizer` with `Mean` (the Jacobian machinery alone);
- ``jd-upgrad``: `JDOptimizer` with `UPGrad`;
- ``jd-upgrad-shared``: UPGrad on the trunk only, heads get their own gradient;
- ``jd-upgrad-diag``: UPGrad with diagnostics on.

Run: ``python tests/benchmarks/bench_training.py [--rounds 30]``. Prints the median time per step,
its ratio to ``sgd``, and the peak resident memory growth of each variant run alone in a fresh
process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from jdoptim import JDOptimizer, Mean, UPGrad

TASKS = 8


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


def make(variant: str):
    torch.manual_seed(0)
    model = MultiTask()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    if variant == "sgd":
        return model, sgd
    aggregator = Mean() if variant == "jd-mean" else UPGrad()
    options = {}
    if variant == "jd-upgrad-shared":
        options["shared_params"] = model.trunk
    if variant == "jd-upgrad-diag":
        options["diagnostics"] = True
    return model, JDOptimizer(sgd, aggregator, **options)


def step(variant: str, model, optimizer, x, y) -> None:
    losses = ((model(x) - y) ** 2).mean(dim=0)
    optimizer.zero_grad()
    if variant == "sgd":
        losses.mean().backward()
        optimizer.step()
    else:
        optimizer.step(losses)


VARIANTS = ["sgd", "jd-mean", "jd-upgrad", "jd-upgrad-shared", "jd-upgrad-diag"]


def peak_rss_growth(variant: str) -> float:
    """Run one variant alone in a fresh process; return how far five steps raise the peak
    resident memory above the resident memory just before them, in MiB (Linux only)."""
    code = f"""
import sys, torch
sys.path.insert(0, "tests/benchmarks")
torch.set_num_threads(1)
import bench_training as b
def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))
model, opt = b.make({variant!r})
x, y = torch.randn(64, 64), torch.randn(64, {TASKS})
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets the peak (VmHWM) to the current resident size
base = rss("VmRSS:")
for _ in range(5):
    b.step({variant!r}, model, opt, x, y)
print(rss("VmHWM:") - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


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
            start = time.perf_counter()
            step(variant, *setups[variant], x, y)
            times[variant].append(time.perf_counter() - start)
    reference = statistics.median(times["sgd"])
    print(f"{'variant':<18} {'median ms':>10} {'x SGD':>7} {'peak RSS growth MiB':>20}")
    for variant in VARIANTS:
        median = statistics.median(times[variant])
        rss = peak_rss_growth(variant)
        print(f"{variant:<18} {1e3 * median:>10.2f} {median / reference:>7.2f} {rss:>20.1f}")


if __name__ == "__main__":
    main()
