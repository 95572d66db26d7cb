"""Draw the figures of the documentation that do not come from an example script.

Run ``python docs/make_figures.py`` (needs matplotlib) to rewrite ``docs/images/conflict.svg``.
The trajectories figure comes from ``python examples/trajectories.py --output
docs/images/trajectories.svg``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from jdoptim import UPGrad

IMAGES = Path(__file__).parent / "images"


def conflict_figure(path: Path) -> None:
    """Two conflicting gradients, their mean, their dual cone and UPGrad's direction."""
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([-2.0, 3.0], dtype=torch.float64)
    jacobian = torch.stack([g1, g2])
    mean = jacobian.mean(dim=0)
    upgrad = UPGrad()(jacobian)

    plt.rcParams["svg.hashsalt"] = "jdoptim"
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    # The dual cone {x : g1·x ≥ 0, g2·x ≥ 0} lies between the normals of g1 and g2.
    edge_1 = torch.tensor([0.0, 1.0])  # orthogonal to g1
    edge_2 = torch.tensor([3.0, 2.0]) / 13**0.5  # orthogonal to g2
    reach = 4.0
    cone = [
        (0.0, 0.0),
        tuple(reach * edge_1),
        tuple(reach * (edge_1 + edge_2)),
        tuple(reach * edge_2),
    ]
    ax.fill(*zip(*cone, strict=True), color="tab:green", alpha=0.12, lw=0)
    ax.text(1.05, 2.75, "dual cone:\nconflicts with neither", color="tab:green", fontsize=9)

    def arrow(vector: torch.Tensor, color: str, label: str, offset: tuple[float, float]) -> None:
        x, y = vector.tolist()
        ax.annotate(
            "", xy=(x, y), xytext=(0, 0), arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2}
        )
        ax.text(x + offset[0], y + offset[1], label, color=color, fontsize=11)

    arrow(g1, "black", "$g_1$", (0.05, -0.25))
    arrow(g2, "black", "$g_2$", (-0.3, 0.1))
    arrow(mean, "tab:red", "mean", (-0.75, 0.05))
    arrow(upgrad, "tab:green", "UPGrad", (0.08, 0.0))
    ax.axhline(0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0, color="0.85", lw=0.8, zorder=0)
    ax.set_xlim(-2.4, 3.2)
    ax.set_ylim(-0.6, 3.6)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("The mean conflicts with $g_1$; UPGrad conflicts with neither", fontsize=10, pad=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    print(
        f"mean·g1 = {float(mean @ g1):+.3f}, UPGrad·g1 = {float(upgrad @ g1):+.3f}, "
        f"UPGrad·g2 = {float(upgrad @ g2):+.3f}; wrote {path}"
    )


if __name__ == "__main__":
    conflict_figure(IMAGES / "conflict.svg")
