"""Trajectories of Jacobian descent with several aggregators on a two-objective toy problem.

The two objectives are quadratics in the plane with different minimisers, shapes and scales,

    f_i(x) = ½ (x - c_i)ᵀ A_i (x - c_i),  i = 1, 2,

so their gradients conflict everywhere between the two minimisers. Their Pareto set (the points
where neither can improve without the other getting worse) is the curve of the minimisers of
t f_1 + (1 - t) f_2 for t in [0, 1]. From several starting points, each aggregator drives a
`jdoptim.JDOptimizer` with plain SGD on the parameter x; one panel per aggregator shows the
paths, and the script prints how far from the Pareto set each run ended.

Run ``python examples/trajectories.py --output trajectories.png`` (needs matplotlib); the
documentation's figure is ``--output docs/images/trajectories.svg``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import jdoptim
from jdoptim import JDOptimizer

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to plain progress lines
    tqdm = None

# Shown in this order when registered; any other registered aggregator can be named on the
# command line.
PREFERRED = ["mean", "mgda", "upgrad", "dualproj", "imtlg", "cagrad", "pcgrad", "nashmtl"]
# The papers' names where the class names cannot spell them, for the panels' titles.
PAPER_NAMES = {
    "alignedmtl": "Aligned-MTL",
    "crmogm": "CR-MOGM",
    "imtlg": "IMTL-G",
    "nashmtl": "Nash-MTL",
}

CENTERS = torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
MATRICES = torch.tensor([[[1.0, 0.0], [0.0, 4.0]], [[6.0, 2.0], [2.0, 2.0]]], dtype=torch.float64)
STARTS = [(-2.0, 2.0), (0.0, 2.5), (2.2, 2.2), (2.5, -1.5), (-0.5, -2.2), (-2.5, -1.0)]


def objectives(x: torch.Tensor) -> torch.Tensor:
    """The vector ``[f_1(x), f_2(x)]``."""
    diffs = x - CENTERS  # [2, 2]
    return 0.5 * torch.einsum("ki,kij,kj->k", diffs, MATRICES, diffs)


def pareto_set(points: int = 200) -> torch.Tensor:
    """Points ``[points, 2]`` of the Pareto set: argmin of t f_1 + (1 - t) f_2, t in [0, 1]."""
    curve = []
    for t in torch.linspace(0, 1, points, dtype=torch.float64):
        a = t * MATRICES[0] + (1 - t) * MATRICES[1]
        b = t * MATRICES[0] @ CENTERS[0] + (1 - t) * MATRICES[1] @ CENTERS[1]
        curve.append(torch.linalg.solve(a, b))
    return torch.stack(curve)


def trajectory(aggregator: jdoptim.Aggregator, start: tuple[float, float], steps: int, lr: float):
    """The iterates ``[steps + 1, 2]`` of Jacobian descent from ``start``."""
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = JDOptimizer(torch.optim.SGD([x], lr=lr), aggregator)
    path = [x.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        optimizer.step(objectives(x))
        path.append(x.detach().clone())
    return torch.stack(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("trajectories.png"))
    parser.add_argument(
        "--aggregators",
        nargs="+",
        default=[name for name in PREFERRED if name in jdoptim.list_aggregators()],
        help=f"registry names, from: {', '.join(jdoptim.list_aggregators())}",
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    torch.manual_seed(0)
    front = pareto_set()
    runs, titles = {}, {}
    names = args.aggregators if tqdm is None else tqdm(args.aggregators, desc="aggregators")
    for name in names:
        if tqdm is None:
            print(f"running {name}", flush=True)
        # The defaults, or the registry's example arguments for a method that has none.
        spec = jdoptim.get_spec(name)
        aggregator = spec.example(2)
        runs[name] = [trajectory(aggregator, start, args.steps, args.lr) for start in STARTS]
        arguments = {} if spec.example_args is None else spec.example_args(2)
        listed = ", ".join(f"{key}={value}" for key, value in arguments.items())
        title = PAPER_NAMES.get(name, spec.cls.__name__)
        titles[name] = title + (f"({listed})" if listed else "")

    print(f"Distance from the Pareto set after {args.steps} steps (max over {len(STARTS)} starts):")
    for name, paths in runs.items():
        ends = torch.stack([path[-1] for path in paths])
        distance = torch.cdist(ends, front).min(dim=1).values.max()
        print(f"  {name:<10} {distance.item():.2e}")

    columns = min(4, len(runs))
    rows = math.ceil(len(runs) / columns)
    plt.rcParams["svg.hashsalt"] = "jdoptim"
    fig, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 3.1 * rows), squeeze=False)
    grid = torch.linspace(-3, 3, 121, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    values = torch.stack([objectives(p) for p in points]).reshape(*xx.shape, 2)
    colors = plt.get_cmap("tab10").colors
    for ax, (name, paths) in zip(axes.flat, runs.items(), strict=False):
        for k, style in enumerate([":", "--"]):
            ax.contour(xx, yy, values[..., k], levels=6, colors="0.8", linestyles=style)
        ax.plot(front[:, 0], front[:, 1], color="0.45", lw=3, alpha=0.6, label="Pareto set")
        ax.scatter(CENTERS[:, 0], CENTERS[:, 1], marker="*", s=80, color="0.3", zorder=3)
        for color, path in zip(colors, paths, strict=False):
            ax.plot(path[:, 0], path[:, 1], color=color, lw=1.4)
            ax.scatter(path[0, 0], path[0, 1], color=color, s=14, zorder=3)
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
        ax.set_xticks([-2, 0, 2])
        ax.set_yticks([-2, 0, 2])
        ax.tick_params(labelsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("$x_1$ (first parameter)", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("$x_2$ (second parameter)", fontsize=9)
    for ax in axes.flat[len(runs) :]:
        ax.axis("off")
    legend = [
        Line2D([], [], color="0.45", lw=3, alpha=0.6, label="Pareto set"),
        Line2D([], [], color="0.3", marker="*", ms=10, ls="", label="minimisers of $L_1$, $L_2$"),
        Line2D([], [], color="0.6", ls=":", label="level sets of $L_1$"),
        Line2D([], [], color="0.6", ls="--", label="level sets of $L_2$"),
        Line2D([], [], color=colors[0], marker="o", ms=4, lw=1.4, label="a run, from its start"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06 if rows > 1 else 0.1, 1, 1))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, metadata={"Date": None} if args.output.suffix == ".svg" else None)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
