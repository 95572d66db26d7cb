"""What an exact multi-task step must cost on a convolutional trunk, against a plain SGD step.

The workload is ``bench_mtl.py``'s conv trunk (four 3×3 convolutions 3→32→64→128→128, stride 2 on
the last three, ReLU, global average pooling; ``m`` heads ``Linear(128, 1)`` with binary
cross-entropy; batch 64). The Gramian of the tasks' gradients with respect to a convolution's
weights can be formed in two exact ways:

- from each task's weight gradient ``Δ_tᵀ X`` (``X``: the unfolded input, ``P`` positions over
  the batch by ``c_in·k²``; ``Δ_t``: the task's output gradient, ``P × c_out``), then their inner
  products: ``m·P·c_in·k²·c_out`` multiply-adds, the cost of ``m`` weight-gradient passes;
- from the kernel of the positions, ``⟨Δ_s, (X Xᵀ) Δ_t⟩``: ``P²·(c_in·k² + m·c_out)``
  multiply-adds, which pays for linear layers (``P`` = the batch) but not for convolutions,
  whose ``P`` is the batch times the output's positions.

The first table gives both counts per layer for the ``m`` given (``--tasks``), next to one SGD
step's multiply-adds (forward and backward). The second times, in the same interleaved rounds on
one torch thread (process CPU time, median):

- ``sgd``: forward, the sum of the task losses' backward pass, ``SGD.step`` (the unit);
- ``trunk backward``: one backward pass through the trunk from a gradient at its output (input and
  weight gradients), the part of an exact step that each task needs at least once;
- ``m trunk backwards``: ``m`` of them, one per task, each from that task's gradient at the
  trunk's output: the floor of a route that forms the tasks' weight gradients, before any
  Gramian, weighting or update;
- ``gramian`` and ``jacobian``: `JDOptimizer`'s whole steps with UPGrad (``shared_params`` the
  trunk), as in ``bench_mtl.py``.

Run: ``python tests/benchmarks/bench_conv_floor.py [--tasks 40] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from bench_mtl import BATCH, Setup, Workload, make_data


def layer_counts(trunk: nn.Module, x: torch.Tensor, m: int) -> list[tuple[str, int, int, int]]:
    """Per convolution: its name, an SGD step's multiply-adds (forward, input and weight
    gradients), those of ``m`` weight gradients, and those of the kernel route."""
    rows = []
    for name, module in trunk.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        out = module(x)
        positions = out.shape[0] * out.shape[2] * out.shape[3]
        fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        forward = positions * fan_in * module.out_channels
        input_gradient = forward if name != "0" else 0  # the data needs no gradient
        sgd = forward + input_gradient + forward
        per_task = m * forward
        kernel = positions * positions * (fan_in + m * module.out_channels)
        rows.append((f"conv {name}", sgd, per_task, kernel))
        x = torch.relu(out)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, batch {BATCH}")
    workload = Workload("conv", 128, args.tasks)
    m = args.tasks
    x, y = make_data(workload)

    sgd_setup = Setup(workload, "sgd")
    counts = layer_counts(sgd_setup.model.trunk, x, m)
    print(f"\nMultiply-adds (millions), m = {m}:\n")
    print("| layer | SGD step | m weight gradients | kernel route |")
    print("|---|---:|---:|---:|")
    for name, sgd, per_task, kernel in counts:
        print(f"| {name} | {sgd / 1e6:,.0f} | {per_task / 1e6:,.0f} | {kernel / 1e6:,.0f} |")
    totals = [sum(row[i] for row in counts) for i in (1, 2, 3)]
    print(f"| total | {totals[0] / 1e6:,.0f} | {totals[1] / 1e6:,.0f} | {totals[2] / 1e6:,.0f} |")
    backward = totals[0] - totals[1] / m  # an SGD step less its forward pass
    print(
        f"\nEach task's backward pass through the trunk (input and weight gradients): "
        f"{backward / 1e6:,.0f} M; m of them: {m * backward / totals[0]:.1f} SGD steps' worth."
    )

    trunk = Setup(workload, "sgd").model.trunk  # not stepped: its graph stays valid
    params = list(trunk.parameters())
    features = trunk(x)
    generator = torch.Generator().manual_seed(2)
    task_gradients = torch.randn(m, *features.shape, generator=generator)

    def one_backward() -> None:
        torch.autograd.grad(features, params, task_gradients[0], retain_graph=True)

    def task_backwards() -> None:
        for t in range(m):
            torch.autograd.grad(features, params, task_gradients[t], retain_graph=True)

    setups = {variant: Setup(workload, variant) for variant in ("gramian", "jacobian")}
    variants = {
        "sgd": lambda: sgd_setup.step(x, y),
        "trunk backward": one_backward,
        f"{m} trunk backwards": task_backwards,
        "gramian": lambda: setups["gramian"].step(x, y),
        "jacobian": lambda: setups["jacobian"].step(x, y),
    }
    for run in variants.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            start = time.process_time()
            run()
            times[name].append(time.process_time() - start)
    sgd_ms = 1e3 * statistics.median(times["sgd"])
    print(f"\nCPU time, median of {args.rounds} interleaved rounds:\n")
    print("| variant | CPU ms | × SGD |")
    print("|---|---:|---:|")
    for name, values in times.items():
        ms = 1e3 * statistics.median(values)
        print(f"| {name} | {ms:.1f} | {ms / sgd_ms:.2f} |")


if __name__ == "__main__":
    main()
