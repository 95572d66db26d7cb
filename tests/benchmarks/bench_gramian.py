"""Time and memory of a Jacobian descent step in gramian mode, against jacobian mode and SGD.

Workloads (instance-wise risk minimisation: one cross-entropy loss per sample, m = batch):
an MLP 64-256-256-10 on random inputs, and a small CNN (conv 3→16, pool, conv 16→32, pool,
linear 2048→10) on 3×32×32 inputs, each at batch 32 and 128. Variants, interleaved in the same
rounds of one process:

- ``sgd``: the mean of the losses, one backward pass, ``SGD.step`` (the reference);
- ``jacobian+mean`` and ``jacobian+upgrad``: ``jdoptim.functional.jacobian`` (one batched
  backward pass over the m losses), the aggregator, the update written into ``.grad``, then
  ``SGD.step``;
- ``gramian+mean`` and ``gramian+upgrad``: `GramianEngine.gramian`, the weighting of the
  Gramian, `GramianEngine.backward`, then ``SGD.step``. The weighting's own time is also shown
  (the UPGrad solver's share).

Times are medians over the rounds, as wall-clock time and as CPU time of the thread (torch runs
on one thread, printed), whose ratios hold up better when other processes share the cores. Each
variant is also run alone in a fresh process (interleaving changes the allocator's behaviour):
the median CPU time of its steps after the first, and the growth of the peak resident set size
over those steps (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``), since torch's CPU
allocations are invisible to ``tracemalloc`` but not to the resident set.

Run: ``python tests/benchmarks/bench_gramian.py [--rounds 30] [--jacobian-rounds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn import functional as nnf

from jdoptim import Mean, UPGrad
from jdoptim.functional import aggregate, jacobian
from jdoptim.gramian import GramianEngine

WORKLOADS = [("mlp", 32), ("mlp", 128), ("cnn", 32), ("cnn", 128)]
VARIANTS = ["sgd", "jacobian+mean", "jacobian+upgrad", "gramian+mean", "gramian+upgrad"]


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


def make_data(kind: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 64) if kind == "mlp" else (batch, 3, 32, 32)
    return torch.randn(shape, generator=generator), torch.randint(0, 10, (batch,))


class Setup:
    """A model, its optimizer, and for gramian variants the engine and the weighting."""

    def __init__(self, kind: str, variant: str) -> None:
        self.variant = variant
        self.model = make_model(kind)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=1e-3)
        self.aggregator = UPGrad() if variant.endswith("upgrad") else Mean()
        self.engine = GramianEngine(self.model) if variant.startswith("gramian") else None
        self.weighting_time = 0.0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        output = self.model(x)
        if self.variant == "sgd":
            nnf.cross_entropy(output, y).backward()
        elif self.engine is None:
            losses = nnf.cross_entropy(output, y, reduction="none")
            updates = aggregate(jacobian(losses, self.params), self.aggregator)
            for param, update in zip(self.params, updates, strict=True):
                param.grad = update
        else:
            losses = nnf.cross_entropy(output, y, reduction="none")
            G = self.engine.gramian(losses)
            start = time.thread_time()
            weights = self.aggregator.weighting(G)
            self.weighting_time = time.thread_time() - start
            self.engine.backward(weights)
        self.optimizer.step()


def measure(setup: Setup, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and thread CPU time of one step."""
    wall, cpu = time.perf_counter(), time.thread_time()
    setup.step(x, y)
    return time.perf_counter() - wall, time.thread_time() - cpu


def run_alone(kind: str, batch: int, variant: str, steps: int) -> tuple[float, float]:
    """Run one variant alone in a fresh process; return how far ``steps`` steps raise the peak
    resident memory above the resident memory just before them, in MiB (Linux only), and the
    median CPU time of the steps after the first, in seconds."""
    code = f"""
import statistics, sys, time, torch
sys.path.insert(0, "tests/benchmarks")
torch.set_num_threads(1)
import bench_gramian as b
def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))
setup = b.Setup({kind!r}, {variant!r})
x, y = b.make_data({kind!r}, {batch})
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")  # resets the peak (VmHWM) to the current resident size
base = rss("VmRSS:")
times = [b.measure(setup, x, y)[1] for _ in range({steps})]
print(rss("VmHWM:") - base, statistics.median(times[1:]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss, cpu = out.stdout.split()
    return int(rss) / 1024, float(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument(
        "--jacobian-rounds", type=int, default=3, help="rounds for the (slow) jacobian variants"
    )
    parser.add_argument(
        "--no-alone", action="store_true", help="skip the runs alone (time and memory)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, rounds: {args.rounds}")
    print(
        "| workload | variant | wall ms | × SGD | CPU ms | × SGD | weighting CPU ms | "
        "alone: CPU ms | × SGD | peak RSS growth MiB | × SGD |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, batch in WORKLOADS:
        x, y = make_data(kind, batch)
        setups = {variant: Setup(kind, variant) for variant in VARIANTS}
        times: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
        weighting: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for setup in setups.values():  # warm-up
            setup.step(x, y)
        for round_ in range(args.rounds):
            for variant, setup in setups.items():
                if variant.startswith("jacobian") and round_ >= args.jacobian_rounds:
                    continue
                times[variant].append(measure(setup, x, y))
                weighting[variant].append(setup.weighting_time)
        wall_ref = statistics.median(t[0] for t in times["sgd"])
        cpu_ref = statistics.median(t[1] for t in times["sgd"])
        alone_ref: tuple[float, float] | None = None
        for variant in VARIANTS:
            wall = statistics.median(t[0] for t in times[variant])
            cpu = statistics.median(t[1] for t in times[variant])
            solver = statistics.median(weighting[variant])
            cells = [
                f"{kind.upper()} batch {batch}",
                variant,
                f"{1e3 * wall:.2f}",
                f"{wall / wall_ref:.2f}",
                f"{1e3 * cpu:.2f}",
                f"{cpu / cpu_ref:.2f}",
                f"{1e3 * solver:.2f}" if variant.startswith("gramian") else "–",
            ]
            if args.no_alone:
                cells += ["–"] * 4
            else:
                steps = 2 if variant.startswith("jacobian") else 8
                rss, alone = run_alone(kind, batch, variant, steps)
                alone_ref = alone_ref or (rss, alone)
                cells += [
                    f"{1e3 * alone:.2f}",
                    f"{alone / alone_ref[1]:.2f}",
                    f"{rss:.1f}",
                    f"{rss / alone_ref[0]:.2f}" if alone_ref[0] > 0 else "–",
                ]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
