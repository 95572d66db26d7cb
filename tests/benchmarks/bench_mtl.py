"""Time and memory of multi-task Jacobian descent steps against a plain SGD step, with TorchJD
side by side when it is installed.

Workloads (batch 64, UPGrad, one loss per task averaged over the batch):

- ``mlp``: trunk Linear(256, W)-ReLU-Linear(W, W)-ReLU-Linear(W, W)-ReLU, ``m`` heads
  Linear(W, 1) with binary cross-entropy, for W in ``--widths`` and m in ``--tasks``;
- ``conv``: four convolutions 3→32→64→128→128 (3×3, stride 2 on the last three, ReLU) on
  3×32×32 inputs, global average pooling, ``m`` heads Linear(128, 1) with binary
  cross-entropy (m in ``--conv-tasks``);
- ``small``: trunk 64-256-256-256, 8 heads Linear(256, 8) with mean squared error.

Variants, interleaved in the same rounds of one process:

- ``sgd``: the sum of the task losses, one backward pass, ``SGD.step`` (the reference);
- ``jacobian``: `JDOptimizer` with ``shared_params=trunk``, ``mode="jacobian"``;
- ``gramian``: the same with ``mode="gramian"`` (what ``mode="auto"`` chooses is printed);
- ``rep-grad``: the same with ``rep_grad=True``: UPGrad on the Jacobian of the trunk's output,
  sent through the trunk once (an approximation of the other variants' step);
- ``torchjd-autojac``: ``torchjd.autojac.mtl_backward`` with the trunk's features, then
  ``jac_to_grad`` with TorchJD's UPGrad;
- ``torchjd-autogram``: ``torchjd.autogram.Engine`` on the trunk (``batch_dim=None``), UPGrad's
  weighting of the Gramian, then one backward pass of the weighted losses (the heads then get
  their task's gradient times its weight).

Times are medians of the process CPU time of a step (torch runs on one thread, printed), as
ratios to ``sgd`` in the same rounds. Memory: each variant runs alone in a fresh process whose
allocator returns freed blocks of 64 KiB or more to the system, and the largest growth of the
resident set during a step above its level at the step's start (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``), over three steps after a warm-up, is compared with SGD's; the table
also gives the size of one set of per-task activation gradients (``m`` times the trunk's layer
outputs) and of the ``m × n`` Jacobian of the trunk, for reference. The growth of the cost
with ``m`` is fitted as ``m^k`` over the task counts measured.

Run: ``python tests/benchmarks/bench_mtl.py [--rounds 7] [--plot docs/images/bench_mtl.svg]``;
``--workloads small`` (or ``mlp``, ``conv``) runs those kinds of workload only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as nnf

from jdoptim import JDOptimizer, UPGrad

BATCH = 64
HAS_TORCHJD = importlib.util.find_spec("torchjd") is not None
VARIANTS = ["sgd", "jacobian", "gramian", "rep-grad", "torchjd-autojac", "torchjd-autogram"]
SLOW = {"jacobian", "torchjd-autojac", "torchjd-autogram"}


@dataclass(frozen=True)
class Workload:
    kind: str  # "mlp", "conv" or "small"
    width: int
    tasks: int

    @property
    def name(self) -> str:
        if self.kind == "mlp":
            return f"MLP W={self.width}"
        return "conv trunk" if self.kind == "conv" else "small MLP"


class MultiTask(nn.Module):
    def __init__(self, workload: Workload) -> None:
        super().__init__()
        W, m = workload.width, workload.tasks
        if workload.kind == "mlp":
            self.trunk = nn.Sequential(
                nn.Linear(256, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU()
            )
            self.heads = nn.ModuleList(nn.Linear(W, 1) for _ in range(m))
        elif workload.kind == "conv":
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(64, 128, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(128, 128, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.heads = nn.ModuleList(nn.Linear(128, 1) for _ in range(m))
        else:
            self.trunk = nn.Sequential(
                nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)
            )
            self.heads = nn.ModuleList(nn.Linear(256, 8) for _ in range(m))
        self.kind = workload.kind

    def losses(self, features: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """One loss per task, averaged over the batch, each from its own head."""
        if self.kind == "small":
            return [((head(features) - y) ** 2).mean() for head in self.heads]
        return [
            nnf.binary_cross_entropy_with_logits(head(features).squeeze(1), y[:, t])
            for t, head in enumerate(self.heads)
        ]


def make_data(workload: Workload) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if workload.kind == "mlp":
        x = torch.randn(BATCH, 256, generator=generator)
    elif workload.kind == "conv":
        x = torch.randn(BATCH, 3, 32, 32, generator=generator)
    else:
        x = torch.randn(BATCH, 64, generator=generator)
        return x, torch.randn(BATCH, 8, generator=generator)
    return x, torch.randint(0, 2, (BATCH, workload.tasks), generator=generator).float()


class Setup:
    """A model, its optimizer and the way a variant steps."""

    def __init__(self, workload: Workload, variant: str) -> None:
        torch.manual_seed(0)
        self.variant = variant
        self.model = MultiTask(workload)
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.optimizer: torch.optim.Optimizer = self.sgd
        if variant in ("jacobian", "gramian", "rep-grad"):
            self.optimizer = JDOptimizer(
                self.sgd,
                UPGrad(),
                mode="jacobian" if variant == "rep-grad" else variant,
                shared_params=self.model.trunk,
                rep_grad=variant == "rep-grad",
            )
        elif variant.startswith("torchjd"):
            from torchjd.aggregation import UPGrad as TorchJDUPGrad
            from torchjd.aggregation import UPGradWeighting

            self.torchjd_upgrad = TorchJDUPGrad()
            self.torchjd_weighting = UPGradWeighting()
            if variant == "torchjd-autogram":
                from torchjd.autogram import Engine

                self.engine = Engine(self.model.trunk, batch_dim=None)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        features = self.model.trunk(x)
        per_task = self.model.losses(features, y)
        losses = torch.stack(per_task)
        if self.variant == "sgd":
            losses.sum().backward()
        elif self.variant in ("jacobian", "gramian", "rep-grad"):
            self.optimizer.backward(losses)  # type: ignore[call-arg]
        elif self.variant == "torchjd-autojac":
            from torchjd.autojac import jac_to_grad, mtl_backward

            mtl_backward(per_task, features=features)
            jac_to_grad(list(self.model.trunk.parameters()), self.torchjd_upgrad)
        else:
            gramian = self.engine.compute_gramian(losses)
            losses.backward(self.torchjd_weighting(gramian))
        self.sgd.step()


def auto_mode(workload: Workload) -> str:
    """What ``mode="auto"`` chooses for this workload."""
    model = MultiTask(workload)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    return JDOptimizer(sgd, UPGrad(), mode="auto", shared_params=model.trunk).resolved_mode


def available(variant: str) -> bool:
    return HAS_TORCHJD or not variant.startswith("torchjd")


def run_alone(workload: Workload, variant: str, steps: int) -> float:
    """Run one variant alone in a fresh process; return the largest growth of the resident
    memory during a step above the resident memory at its start, over ``steps`` steps after a
    warm-up, in MiB.

    The process's allocator returns every block of 64 KiB or more to the system when it is
    freed (``MALLOC_MMAP_THRESHOLD_``), so that the resident memory follows what the step
    holds instead of what earlier steps left in the allocator's free lists.
    """
    code = f"""
import sys, torch
sys.path.insert(0, "tests/benchmarks")
torch.set_num_threads(1)
import bench_mtl as b
def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))
workload = b.Workload({workload.kind!r}, {workload.width}, {workload.tasks})
setup = b.Setup(workload, {variant!r})
x, y = b.make_data(workload)
setup.step(x, y)
growth = []
for _ in range({steps}):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak (VmHWM) to the current resident size
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


def reference_sizes(workload: Workload) -> tuple[float, float]:
    """MiB of one set of per-task activation gradients (the trunk's layer outputs, ``m`` times)
    and of the ``m × n`` Jacobian of the trunk, in float32."""
    model = MultiTask(workload)
    x, _ = make_data(workload)
    sizes: list[int] = []
    hooks = [
        module.register_forward_hook(lambda mod, args, out: sizes.append(out.numel()))
        for module in model.trunk
        if any(True for _ in module.parameters())
    ]
    with torch.no_grad():
        model.trunk(x)
    for hook in hooks:
        hook.remove()
    n = sum(p.numel() for p in model.trunk.parameters())
    m = workload.tasks
    return 4 * m * sum(sizes) / 2**20, 4 * m * n / 2**20


def measure(
    workload: Workload, rounds: int, slow_rounds: int, chosen: list[str]
) -> dict[str, dict]:
    x, y = make_data(workload)
    variants = [v for v in VARIANTS if available(v) and (v == "sgd" or v in chosen)]
    setups = {variant: Setup(workload, variant) for variant in variants}
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for setup in setups.values():  # warm-up
        setup.step(x, y)
    for round_ in range(rounds):
        for variant, setup in setups.items():
            if variant in SLOW and round_ >= slow_rounds:
                continue
            start = time.process_time()
            setup.step(x, y)
            times[variant].append(time.process_time() - start)
    return {variant: {"ms": 1e3 * statistics.median(times[variant])} for variant in variants}


def growth(ms: list[int], values: list[float]) -> float:
    """The exponent ``k`` of the least-squares fit ``value ∝ m^k``."""
    lx = [math.log(m) for m in ms]
    ly = [math.log(v) for v in values]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


COLOURS = {
    "jacobian": "tab:orange",
    "gramian": "tab:green",
    "torchjd-autojac": "tab:purple",
    "torchjd-autogram": "tab:gray",
}


def plot(results: list[dict], path: str) -> None:
    """Time (as a multiple of SGD's) and memory against m for the MLP workloads: one colour per
    variant, one line style per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "jdoptim"
    widths = sorted({r["width"] for r in results if r["kind"] == "mlp"})
    styles = ["--", "-", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ticks: set[int] = set()
    for variant, colour in COLOURS.items():
        for width, style in zip(widths, styles, strict=False):
            rows = [r for r in results if r["kind"] == "mlp" and r["width"] == width]
            rows = [r for r in rows if variant in r["variants"]]
            if not rows:
                continue
            ms = [r["tasks"] for r in rows]
            ticks.update(ms)
            for ax, key in zip(axes, ("ratio", "rss"), strict=True):
                values = [r["variants"][variant][key] for r in rows]
                ax.plot(ms, values, style, color=colour, marker="o", label=f"{variant}, W={width}")
    axes[0].set_ylabel("step time / SGD step time")
    axes[1].set_ylabel("peak memory growth in a step (MiB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(ticks), [str(m) for m in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel("number of tasks m")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_title("Time (1 CPU thread, UPGrad, batch 64)")
    axes[1].set_title("Memory (each variant alone)")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--slow-rounds", type=int, default=3, help="rounds of the slow variants")
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--tasks", type=int, nargs="+", default=[8, 40, 128])
    parser.add_argument("--conv-tasks", type=int, nargs="*", default=[40])
    parser.add_argument("--no-small", action="store_true")
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=["mlp", "conv", "small"],
        choices=["mlp", "conv", "small"],
        help="the kinds of workload to run",
    )
    parser.add_argument(
        "--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="sgd is always run"
    )
    parser.add_argument("--no-alone", action="store_true", help="skip the memory runs")
    parser.add_argument("--plot", help="write a figure of time and memory against m here")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torchjd = "not installed"
    if HAS_TORCHJD:
        from importlib.metadata import version

        torchjd = version("torchjd")
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, torchjd {torchjd}")
    print(f"rounds: {args.rounds} ({args.slow_rounds} for {', '.join(sorted(SLOW))})")
    workloads = []
    if "mlp" in args.workloads:
        workloads += [Workload("mlp", w, m) for w in args.widths for m in args.tasks]
    if "conv" in args.workloads:
        workloads += [Workload("conv", 128, m) for m in args.conv_tasks]
    if "small" in args.workloads and not args.no_small:
        workloads.append(Workload("small", 256, 8))
    print(
        "| workload | m | variant | CPU ms | × SGD | peak RSS growth MiB | × SGD's "
        "| / activation gradients | activation gradients MiB | Jacobian MiB |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    modes: dict[tuple[str, int], str] = {}
    for workload in workloads:
        measured = measure(workload, args.rounds, args.slow_rounds, args.variants)
        modes[workload.name, workload.tasks] = auto_mode(workload)
        acts, jac = reference_sizes(workload)
        reference = measured["sgd"]["ms"]
        sgd_rss = None
        for variant, row in measured.items():
            row["ratio"] = row["ms"] / reference
            row["rss"] = float("nan") if args.no_alone else run_alone(workload, variant, 3)
            sgd_rss = row["rss"] if variant == "sgd" else sgd_rss
            extra = row["rss"] - sgd_rss if sgd_rss is not None else float("nan")
            cells = [
                workload.name,
                str(workload.tasks),
                variant,
                f"{row['ms']:.1f}",
                f"{row['ratio']:.2f}",
                f"{row['rss']:.0f}",
                f"{row['rss'] / sgd_rss:.1f}" if sgd_rss and sgd_rss >= 1 else "–",
                f"{extra / acts:.2f}" if variant != "sgd" else "–",
                f"{acts:.0f}",
                f"{jac:.0f}",
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
        results.append(
            {
                "kind": workload.kind,
                "width": workload.width,
                "tasks": workload.tasks,
                "variants": measured,
            }
        )
    chosen = ", ".join(f"{name} m={m}: {mode}" for (name, m), mode in modes.items())
    print(f'mode="auto" chooses: {chosen}')
    for width in args.widths:
        rows = [r for r in results if r["kind"] == "mlp" and r["width"] == width]
        if len(rows) < 2:
            continue
        ms = [r["tasks"] for r in rows]
        cells = []
        for variant in VARIANTS:
            if all(variant in r["variants"] for r in rows):
                k = growth(ms, [r["variants"][variant]["ms"] for r in rows])
                cells.append(f"{variant} m^{k:.2f}")
        print(f"growth of the step time with m (W={width}, m={ms}): " + ", ".join(cells))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
