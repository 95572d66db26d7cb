"""Time and memory of a Jacobian descent step with one loss per sample (IWRM), against SGD, from
batch 32 to 1024, with TorchJD's Gramian engine and a per-sample-gradient route side by side.

Workloads (one cross-entropy loss per sample, m = batch): an MLP 784-256-256-10 on random
inputs, and a CNN (three 3×3 convolutions 1→16→32→32 with ReLU, max-pooling after the first two,
a linear layer 1568→10) on 1×28×28 inputs, at the batches of ``--batches``. Variants,
interleaved in the same rounds of one process:

- ``sgd``: the mean of the losses, one backward pass, ``SGD.step`` (the reference);
- ``gramian+mean`` and ``gramian+upgrad``: `GramianEngine.gramian`, the weighting of the
  Gramian (its own time is reported: the solver's share of the step), `GramianEngine.backward`,
  ``SGD.step``;
- ``jacobian+upgrad``: ``jdoptim.functional.jacobian`` (batched backward passes over the m
  losses), UPGrad, the update written into ``.grad`` (up to ``--jacobian-max`` samples);
- ``torch.func+upgrad``: per-sample gradients from ``torch.func`` (``vmap`` of ``grad`` of the
  functional model), their Gramian, UPGrad's weighting and the weighted sum (up to
  ``--func-max`` samples);
- ``torchjd-autogram+upgrad``: TorchJD's ``autogram.Engine`` (``batch_dim=0``), its UPGrad
  weighting and one backward pass of the weighted losses, when TorchJD is installed (up to
  ``--torchjd-max`` samples).

Times are medians over the rounds of the CPU time of the process (torch runs on one thread,
printed), as ratios to ``sgd`` in the same rounds. The growth of each variant's step time with
the batch is fitted as ``B^k`` over the batches from 128 on. ``--alone`` also runs each variant
alone in a fresh process whose allocator returns freed blocks of 64 KiB or more to the system,
and reports the largest growth of its resident memory during a step (Linux ``VmHWM``).

Run: ``python tests/benchmarks/bench_gramian.py [--rounds 7] [--plot FILE.svg] [--alone]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
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

HAS_TORCHJD = importlib.util.find_spec("torchjd") is not None
VARIANTS = [
    "sgd",
    "gramian+mean",
    "gramian+upgrad",
    "jacobian+upgrad",
    "torch.func+upgrad",
    "torchjd-autogram+upgrad",
]
COLOURS = {
    "gramian+mean": "tab:green",
    "gramian+upgrad": "tab:olive",
    "jacobian+upgrad": "tab:orange",
    "torch.func+upgrad": "tab:blue",
    "torchjd-autogram+upgrad": "tab:gray",
}


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def make_data(kind: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 784) if kind == "mlp" else (batch, 1, 28, 28)
    x = torch.randn(shape, generator=generator)
    return x, torch.randint(0, 10, (batch,), generator=generator)


class Setup:
    """A model, its optimizer, and what a variant needs to step."""

    def __init__(self, kind: str, variant: str) -> None:
        self.variant = variant
        self.model = make_model(kind)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=1e-3)
        self.aggregator = UPGrad() if variant.endswith("upgrad") else Mean()
        self.engine = GramianEngine(self.model) if variant.startswith("gramian") else None
        self.weighting_time = 0.0
        if variant.startswith("torchjd"):
            from torchjd.aggregation import UPGradWeighting
            from torchjd.autogram import Engine

            self.torchjd_engine = Engine(self.model, batch_dim=0)
            self.torchjd_weighting = UPGradWeighting()

    def _per_sample_gradients(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        names = [name for name, _ in self.model.named_parameters()]

        def loss(values: tuple[torch.Tensor, ...], xi: torch.Tensor, yi: torch.Tensor):
            out = torch.func.functional_call(
                self.model, dict(zip(names, values, strict=True)), (xi.unsqueeze(0),)
            )
            return nnf.cross_entropy(out, yi.unsqueeze(0))

        values = tuple(p.detach() for p in self.params)
        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(values, x, y)
        return torch.cat([g.reshape(x.shape[0], -1) for g in grads], dim=1)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        if self.variant == "torch.func+upgrad":
            M = self._per_sample_gradients(x, y)
            weights = self.aggregator.weighting(M @ M.T)
            update = weights @ M
            for p, g in zip(
                self.params, update.split([p.numel() for p in self.params]), strict=True
            ):
                p.grad = g.view_as(p)
            self.optimizer.step()
            return
        output = self.model(x)
        if self.variant == "sgd":
            nnf.cross_entropy(output, y).backward()
        elif self.variant.startswith("jacobian"):
            losses = nnf.cross_entropy(output, y, reduction="none")
            updates = aggregate(jacobian(losses, self.params), self.aggregator)
            for param, update in zip(self.params, updates, strict=True):
                param.grad = update
        elif self.variant.startswith("torchjd"):
            losses = nnf.cross_entropy(output, y, reduction="none")
            gramian = self.torchjd_engine.compute_gramian(losses)
            start = time.process_time()
            weights = self.torchjd_weighting(gramian)
            self.weighting_time = time.process_time() - start
            losses.backward(weights)
        else:
            losses = nnf.cross_entropy(output, y, reduction="none")
            G = self.engine.gramian(losses)  # type: ignore[union-attr]
            start = time.process_time()
            weights = self.aggregator.weighting(G)
            self.weighting_time = time.process_time() - start
            self.engine.backward(weights)  # type: ignore[union-attr]
        self.optimizer.step()


def run_alone(kind: str, batch: int, variant: str, steps: int = 3) -> float:
    """The largest growth of the resident memory during a step of one variant run alone in a
    fresh process, over ``steps`` steps after a warm-up, in MiB (see `bench_mtl.run_alone`)."""
    code = f"""
import sys, torch
sys.path.insert(0, "tests/benchmarks")
torch.set_num_threads(1)
import bench_gramian as b
def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))
setup = b.Setup({kind!r}, {variant!r})
x, y = b.make_data({kind!r}, {batch})
setup.step(x, y)
growth = []
for _ in range({steps}):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    base = rss("VmRSS:")
    setup.step(x, y)
    growth.append(rss("VmHWM:") - base)
print(max(growth))
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout.strip()) / 1024


def growth(batches: list[int], values: list[float]) -> float:
    """The exponent ``k`` of the least-squares fit ``value ∝ B^k``."""
    lx = [math.log(b) for b in batches]
    ly = [math.log(v) for v in values]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    num = sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True))
    return num / sum((a - mx) ** 2 for a in lx)


def plot(results: dict[str, dict[int, dict[str, dict[str, float]]]], path: str) -> None:
    """Step time against the batch, one panel per workload: milliseconds, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "jdoptim"
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), squeeze=False)
    for ax, (kind, by_batch) in zip(axes[0], results.items(), strict=True):
        batches = sorted(by_batch)
        for variant in VARIANTS:
            points = [(b, by_batch[b][variant]["ms"]) for b in batches if variant in by_batch[b]]
            if not points:
                continue
            style = {"color": COLOURS.get(variant, "black"), "marker": "o"}
            ax.plot(
                *zip(*points, strict=True),
                "-" if variant != "sgd" else "--",
                **style,
                label=variant,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch size B (= number of losses m)")
        ax.set_ylabel("CPU time of a step (ms)")
        ax.set_title(f"{kind.upper()}, one loss per sample (1 CPU thread)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--slow-rounds", type=int, default=3, help="rounds of the slow variants")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--kinds", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--jacobian-max", type=int, default=128)
    parser.add_argument("--func-max", type=int, default=256)
    parser.add_argument("--torchjd-max", type=int, default=256)
    parser.add_argument("--alone", action="store_true", help="measure memory in fresh processes")
    parser.add_argument("--plot", help="write a figure of step time against the batch here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torchjd = "not installed"
    if HAS_TORCHJD:
        from importlib.metadata import version

        torchjd = version("torchjd")
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, torchjd {torchjd}")
    print(f"rounds: {args.rounds} ({args.slow_rounds} for the slow variants)")
    limits = {
        "jacobian+upgrad": args.jacobian_max,
        "torch.func+upgrad": args.func_max,
        "torchjd-autogram+upgrad": args.torchjd_max if HAS_TORCHJD else 0,
    }
    memory = " peak RSS growth MiB |" if args.alone else ""
    print(f"| workload | B | variant | CPU ms | × SGD | weighting ms | weighting share |{memory}")
    print("|---|---:|---|---:|---:|---:|---:|" + ("---:|" if args.alone else ""))
    results: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    for kind in args.kinds:
        results[kind] = {}
        for batch in args.batches:
            variants = [v for v in VARIANTS if batch <= limits.get(v, batch)]
            x, y = make_data(kind, batch)
            setups = {variant: Setup(kind, variant) for variant in variants}
            times: dict[str, list[float]] = {variant: [] for variant in variants}
            weighting: dict[str, list[float]] = {variant: [] for variant in variants}
            for setup in setups.values():  # warm-up
                setup.step(x, y)
            for round_ in range(args.rounds):
                for variant, setup in setups.items():
                    if variant in limits and round_ >= args.slow_rounds:
                        continue
                    start = time.process_time()
                    setup.step(x, y)
                    times[variant].append(time.process_time() - start)
                    weighting[variant].append(setup.weighting_time)
            reference = statistics.median(times["sgd"])
            rows = results[kind][batch] = {}
            for variant in variants:
                cpu = statistics.median(times[variant])
                solve = statistics.median(weighting[variant])
                rows[variant] = {"ms": 1e3 * cpu, "ratio": cpu / reference}
                weighted = variant.startswith(("gramian", "torchjd"))
                cells = [
                    kind.upper(),
                    str(batch),
                    variant,
                    f"{1e3 * cpu:.2f}",
                    f"{cpu / reference:.2f}",
                    f"{1e3 * solve:.2f}" if weighted else "–",
                    f"{solve / cpu:.0%}" if weighted else "–",
                ]
                if args.alone:
                    cells.append(f"{run_alone(kind, batch, variant):.1f}")
                print("| " + " | ".join(cells) + " |", flush=True)
    for kind, by_batch in results.items():
        batches = [b for b in sorted(by_batch) if b >= 128]
        cells = []
        for variant in VARIANTS:
            present = [b for b in batches if variant in by_batch[b]]
            if len(present) >= 2:
                k = growth(present, [by_batch[b][variant]["ms"] for b in present])
                cells.append(f"{variant} B^{k:.2f} (B = {present[0]}…{present[-1]})")
        print(f"growth of the step time, {kind.upper()}: " + ", ".join(cells))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
