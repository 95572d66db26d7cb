"""Time of UPGrad's weighting with the batched active-set solver and with the quadprog reference.

UPGrad projects each of its m rows onto the dual cone of all of them: m quadratic programs on the
m × m Gramian. ``UPGradWeighting(solver=...)`` is timed on G = J Jᵀ with its other arguments at
their defaults (the Gramian is divided by its trace, with no regularisation), for two kinds of J,
with n = 2m columns:

- ``normal``: i.i.d. standard normal entries; about half the pairs of rows conflict, so every
  projection has work to do;
- ``agree``: a common random direction plus normal noise of the same size; no pair of rows
  conflicts, so every constraint v ≥ u is active at the solution, which is quadprog's worst
  case and needs no iteration from the active-set solver;
- ``lowrank`` (with ``--kinds``): a product of m × m/2 and m/2 × 2m normal matrices, so G is
  singular; the exchanges can stall there and Lawson and Hanson's method finishes those
  projections. quadprog, which needs G positive definite, is skipped.

The sizes cover the active-set solver's three regimes: a closed form for m ≤ 2, block pivoting
with Cholesky solves up to m = 40, conjugate gradients above. The two solvers are interleaved in
the same rounds of one process, on one torch thread (printed). Times are medians over the rounds
of the wall-clock time and of the CPU time of the thread (whose ratios hold up better when other
processes share the cores); the ratio is quadprog's CPU time over the active-set solver's. The
last column is the largest difference between the two weight vectors, relative to the largest
weight. quadprog is run a single time at m = 512, where one call takes minutes
(``--skip-quadprog-above M`` skips it above a size).

Run: ``python tests/benchmarks/bench_dual_cone.py [--sizes 2 4 8 16 32 128 512] [--rounds 15]
[--kinds normal agree lowrank]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from jdoptim.aggregation import UPGradWeighting

SOLVERS = ("active_set", "quadprog")


def _jacobian(kind: str, m: int, generator: torch.Generator) -> Tensor:
    n = 2 * m
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if kind == "agree":
        J = J + torch.randn(1, n, generator=generator, dtype=torch.float64)
    if kind == "lowrank":  # rank m/2: singular G, which quadprog cannot take
        left = torch.randn(m, max(m // 2, 1), generator=generator, dtype=torch.float64)
        J = left @ J[: left.shape[1]]
    return J


def _timed(weighting: Callable[[Tensor], Tensor], G: Tensor) -> tuple[float, float, Tensor]:
    wall, cpu = time.perf_counter(), time.thread_time()
    out = weighting(G)
    return time.perf_counter() - wall, time.thread_time() - cpu, out


def _rounds(m: int, rounds: int) -> dict[str, int]:
    if m >= 512:
        return {"active_set": min(rounds, 5), "quadprog": 1}
    if m >= 128:
        return {"active_set": min(rounds, 9), "quadprog": min(rounds, 5)}
    return {"active_set": rounds, "quadprog": rounds}


def _median_ms(times: list[tuple[float, float]], which: int) -> float:
    return 1e3 * statistics.median(t[which] for t in times)


def _row(G: Tensor, counts: dict[str, int]) -> list[str]:
    """Time both solvers on G, interleaved, and format one table row (without J and m)."""
    weightings = {solver: UPGradWeighting(solver=solver) for solver in SOLVERS}
    if G.shape[0] < 512:
        for solver in SOLVERS:
            if counts[solver]:
                weightings[solver](G)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {solver: [] for solver in SOLVERS}
    weights: dict[str, Tensor] = {}
    for r in range(max(counts.values())):
        for solver in SOLVERS:
            if r < counts[solver]:
                wall, cpu, weights[solver] = _timed(weightings[solver], G)
                times[solver].append((wall, cpu))
    active, quadprog = times["active_set"], times["quadprog"]
    row = [f"{_median_ms(active, 0):.3g}", f"{_median_ms(active, 1):.3g}"]
    if not quadprog:
        return [*row, "skipped", "skipped", "", ""]
    difference = (weights["active_set"] - weights["quadprog"]).abs().max()
    relative = float(difference / weights["quadprog"].abs().max())
    runs = "" if counts["quadprog"] > 1 else " (1 run)"
    return [
        *row,
        f"{_median_ms(quadprog, 0):.4g}{runs}",
        f"{_median_ms(quadprog, 1):.4g}",
        f"{_median_ms(quadprog, 1) / _median_ms(active, 1):.1f}×",
        f"{relative:.1e}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32, 128, 512])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--skip-quadprog-above", type=int, default=None, metavar="M")
    parser.add_argument(
        "--kinds", nargs="+", default=["normal", "agree"], choices=["normal", "agree", "lowrank"]
    )
    args = parser.parse_args()

    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}"
    )
    print()
    print(
        "| J | m | active_set wall (ms) | active_set CPU (ms) | quadprog wall (ms) "
        "| quadprog CPU (ms) | speed-up (CPU) | max weight difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")

    generator = torch.Generator().manual_seed(0)
    for m in args.sizes:
        for kind in args.kinds:
            J = _jacobian(kind, m, generator)
            counts = _rounds(m, args.rounds)
            skip = args.skip_quadprog_above is not None and m > args.skip_quadprog_above
            if skip or kind == "lowrank":
                counts["quadprog"] = 0
            row = [kind, str(m), *_row(J @ J.T, counts)]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
