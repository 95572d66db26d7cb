"""CPU time, route and peak memory of UPGrad's weighting with the default dual-cone solver.

UPGrad projects each of its m rows onto the dual cone of all of them: m quadratic programs on the
m × m Gramian. ``UPGradWeighting()`` (default solver, the Gramian divided by its trace, no
regularisation) is timed on G = J Jᵀ for these kinds of J:

- ``normal``: m × 2m, i.i.d. standard normal entries; about half the pairs of rows conflict, so
  every projection has work to do; G has full rank;
- ``agree``: the same plus a common random direction of the same size; no pair of rows
  conflicts, so every projection returns at once (quadprog's worst case);
- ``lowrank``: a product of m × m/2 and m/2 × 2m normal matrices: G has rank m/2, so the pivoted
  Cholesky factorisation stops early and the exact method solves every conflicting projection;
- ``rank3`` (with ``--large``): m × 3 normal entries, the per-sample losses of a 3-parameter model.

The sizes cover the solver's regimes (a closed form for m ≤ 2, block pivoting with Cholesky
solves up to m = 40, conjugate gradients above, Goldfarb and Idnani's method on a square root of
G for rank-deficient or uncertified problems). In each size the kinds (and quadprog, the
reference, at m ≤ 128 on full-rank G) are interleaved in the same rounds of one process, on one
torch thread (printed). Times are the CPU time of the process (``time.process_time``), median and
worst over the rounds; ``growth`` is the log-log slope of the median between this size and the
previous one of the same kind. ``exact`` is the number of projections per call that the exact
method solved (counted by wrapping the solver's ``_goldfarb_idnani`` in this script), out of m.
``peak`` is the rise of the resident set's high-water mark (``ru_maxrss``) during one call in a
fresh process that has loaded G, next to the size of G itself (``--no-memory`` skips it). The
quadprog column gives its median CPU time and the largest difference between the two weight
vectors, relative to the largest weight.

``--large`` adds m = 4096 for ``normal`` and ``rank3``: one call each, timed in the fresh process
that measures the memory, abandoned (with a note) after ``--large-limit`` seconds. The last line
times the singular case m = 128 of rank 64 over ``--seeds`` random Jacobians (one call each,
after a warm-up) against the goal of a median of at most 30 ms and a worst of at most 100 ms.

Run: ``python tests/benchmarks/bench_dual_cone.py [--sizes 2 4 8 16 32 128 512 1024]
[--rounds 9] [--kinds normal agree lowrank] [--large] [--large-limit 180] [--seeds 30]``.
"""

from __future__ import annotations

import argparse
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import jdoptim.linalg._dual_cone as dual_cone
from jdoptim.aggregation import UPGradWeighting

KINDS = ("normal", "agree", "lowrank", "rank3")
QUADPROG_MAX = 128
LARGE = 4096
SINGULAR_GOAL_MS = (30.0, 100.0)


class _ExactCounter:
    """Wraps the solver's exact method to count the projections it is given."""

    def __init__(self) -> None:
        self.problems = 0
        self._exact = dual_cone._goldfarb_idnani

    def __call__(self, u_hat: Tensor, *args: Tensor) -> Tensor:
        self.problems += u_hat.shape[0]
        return self._exact(u_hat, *args)


def _jacobian(kind: str, m: int, generator: torch.Generator) -> Tensor:
    if kind == "rank3":
        return torch.randn(m, 3, generator=generator, dtype=torch.float64)
    n = 2 * m
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if kind == "agree":
        J = J + torch.randn(1, n, generator=generator, dtype=torch.float64)
    if kind == "lowrank":
        left = torch.randn(m, max(m // 2, 1), generator=generator, dtype=torch.float64)
        J = left @ J[: left.shape[1]]
    return J


def _rank(kind: str, m: int) -> int:
    return {"lowrank": max(m // 2, 1), "rank3": min(m, 3)}.get(kind, m)


def _rounds(m: int, rounds: int) -> tuple[int, int]:
    """Rounds of the default solver and of quadprog for size m."""
    if m >= 512:
        return min(rounds, 3), 0
    if m >= 128:
        return min(rounds, 5), min(rounds, 3)
    return rounds, rounds


def _cpu_ms(weighting: Callable[[Tensor], Tensor], G: Tensor) -> tuple[float, Tensor]:
    start = time.process_time()
    out = weighting(G)
    return 1e3 * (time.process_time() - start), out


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _probe(G: Tensor, timeout: float) -> tuple[float, float, int] | None:
    """CPU time (ms), rise of ru_maxrss (MiB) and exact projections of one call, in a fresh process.

    Returns None when the call takes more than ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gramian.pt"
        torch.save(G, path)
        try:
            result = subprocess.run(
                [sys.executable, __file__, "--probe", str(path)],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            )
        except subprocess.TimeoutExpired:
            return None
    cpu, peak, exact = result.stdout.split()
    return float(cpu), float(peak), int(exact)


def _run_probe(path: str) -> None:
    torch.set_num_threads(1)
    counter = _ExactCounter()
    dual_cone._goldfarb_idnani = counter
    G = torch.load(path)
    weighting = UPGradWeighting()
    before = _maxrss_mib()
    cpu, _ = _cpu_ms(weighting, G)
    print(cpu, _maxrss_mib() - before, counter.problems)


def _growth(sizes: dict[str, tuple[int, float]], kind: str, m: int, ms: float) -> str:
    previous = sizes.get(kind)
    sizes[kind] = (m, ms)
    if previous is None or previous[1] <= 0:
        return ""
    return f"{math.log(ms / previous[1]) / math.log(m / previous[0]):.2f}"


def _row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def _size(
    m: int,
    kinds: list[str],
    rounds: int,
    counter: _ExactCounter,
    memory: bool,
    sizes: dict[str, tuple[int, float]],
) -> None:
    """Time every kind at size m, interleaved, and print one row per kind."""
    generator = torch.Generator().manual_seed(m)
    gramians = {kind: _jacobian(kind, m, generator) for kind in kinds}
    gramians = {kind: J @ J.T for kind, J in gramians.items()}
    solver_rounds, quadprog_rounds = _rounds(m, rounds)
    default, reference = UPGradWeighting(), UPGradWeighting(solver="quadprog")
    with_quadprog = [k for k in kinds if _rank(k, m) == m and m <= QUADPROG_MAX]
    for kind in kinds:
        default(gramians[kind])  # warm-up
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    quadprog_times: dict[str, list[float]] = {kind: [] for kind in with_quadprog}
    weights: dict[str, Tensor] = {}
    exact: dict[str, int] = dict.fromkeys(kinds, 0)
    for r in range(solver_rounds):
        for kind in kinds:
            counter.problems = 0
            ms, weights[kind] = _cpu_ms(default, gramians[kind])
            times[kind].append(ms)
            exact[kind] += counter.problems
            if kind in with_quadprog and r < quadprog_rounds:
                ms, weights[kind + "/quadprog"] = _cpu_ms(reference, gramians[kind])
                quadprog_times[kind].append(ms)
    for kind in kinds:
        median, worst = statistics.median(times[kind]), max(times[kind])
        G = gramians[kind]
        peak = ""
        if memory and m >= 128:
            probed = _probe(G, timeout=600)
            peak = "" if probed is None else f"{probed[1]:.0f}"
        reference_cells = ["", ""]
        if kind in with_quadprog:
            difference = (weights[kind] - weights[kind + "/quadprog"]).abs().max()
            relative = float(difference / weights[kind + "/quadprog"].abs().max())
            reference_cells = [f"{statistics.median(quadprog_times[kind]):.3g}", f"{relative:.1e}"]
        _row(
            [
                kind,
                str(m),
                str(_rank(kind, m)),
                str(len(times[kind])),
                f"{median:.3g}",
                f"{worst:.3g}",
                _growth(sizes, kind, m, median),
                f"{exact[kind] / len(times[kind]):.0f}",
                f"{G.numel() * G.element_size() / 2**20:.3g}",
                peak,
                *reference_cells,
            ]
        )


def _large(limit: float, sizes: dict[str, tuple[int, float]]) -> None:
    """One call per kind at m = 4096, in a fresh process (time, memory and route from there)."""
    generator = torch.Generator().manual_seed(LARGE)
    for kind in ("rank3", "normal"):
        J = _jacobian(kind, LARGE, generator)
        G = J @ J.T
        del J
        probed = _probe(G, timeout=limit)
        size = f"{G.numel() * G.element_size() / 2**20:.3g}"
        if probed is None:
            cells = [f"skipped: one call > {limit:.0f} s", "", "", "", size, "", "", ""]
        else:
            cpu, peak, exact = probed
            cells = [
                f"{cpu:.4g}",
                f"{cpu:.4g}",
                _growth(sizes, kind, LARGE, cpu),
                str(exact),
                size,
                f"{peak:.0f}",
                "",
                "",
            ]
        _row([kind, str(LARGE), str(_rank(kind, LARGE)), "1", *cells])


def _singular_target(seeds: int, counter: _ExactCounter) -> None:
    """Time m = 128, rank 64, over ``seeds`` random Jacobians; compare with the goal."""
    m = 128
    weighting = UPGradWeighting()
    generator = torch.Generator().manual_seed(12864)
    warm = _jacobian("lowrank", m, generator)
    weighting(warm @ warm.T)
    times = []
    counter.problems = 0
    for _ in range(seeds):
        J = _jacobian("lowrank", m, generator)
        ms, _ = _cpu_ms(weighting, J @ J.T)
        times.append(ms)
    median, worst = statistics.median(times), max(times)
    goal_median, goal_worst = SINGULAR_GOAL_MS
    met = median <= goal_median and worst <= goal_worst
    print(
        f"Singular target, m = {m}, rank {m // 2}, {seeds} random Jacobians: median "
        f"{median:.3g} ms, worst {worst:.3g} ms (goal: ≤ {goal_median:.0f} ms / "
        f"≤ {goal_worst:.0f} ms): {'goal met' if met else 'goal not met'}; "
        f"{counter.problems / seeds:.0f} projections per call by the exact method."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2, 4, 8, 16, 32, 128, 512, 1024])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--kinds", nargs="+", default=["normal", "agree", "lowrank"], choices=KINDS)
    parser.add_argument("--large", action="store_true", help=f"add m = {LARGE}")
    parser.add_argument("--large-limit", type=float, default=180.0, metavar="SECONDS")
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--probe", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        _run_probe(args.probe)
        return

    torch.set_num_threads(1)
    counter = _ExactCounter()
    dual_cone._goldfarb_idnani = counter
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"torch.get_num_threads() = {torch.get_num_threads()}, CPU time of the process"
    )
    print()
    _row(
        [
            "J",
            "m",
            "rank",
            "rounds",
            "median (ms)",
            "worst (ms)",
            "growth",
            "exact",
            "G (MiB)",
            "peak (MiB)",
            "quadprog (ms)",
            "max weight difference",
        ]
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sizes: dict[str, tuple[int, float]] = {}
    for m in args.sizes:
        _size(m, args.kinds, args.rounds, counter, not args.no_memory, sizes)
    if args.large:
        _large(args.large_limit, sizes)
    if args.seeds:
        print()
        _singular_target(args.seeds, counter)


if __name__ == "__main__":
    main()
