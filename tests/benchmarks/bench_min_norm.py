"""MGDA's weighting: the exact solver (Wolfe's algorithm) against TorchJD's Frank-Wolfe iteration.

``MGDAWeighting(solver=...)`` is timed on G = J Jᵀ for three kinds of J with n = 4m columns:

- ``normal``: i.i.d. standard normal entries;
- ``spread``: normal rows scaled by norms from 1 to 100 (Frank-Wolfe's hard case);
- ``lowrank``: a product of m × m/4 and m/4 × n normal matrices, plus a common direction.

The two solvers are interleaved in the same rounds of one process, on one torch thread
(printed). Times are medians of the CPU time of the thread; the ratio is the exact solver's over
Frank-Wolfe's (``epsilon=1e-3, max_iters=100``, TorchJD's defaults). ``fw excess`` is how much
larger Frank-Wolfe's squared norm |Jᵀw|² is than the exact minimum, relative to it (the median
over the rounds' matrices), and ``fw conflict`` the largest conflict of its update with a row,
``-min_i gᵢᵀd / (|gᵢ| |d|)``, over the rounds (the exact solver's is at the rounding level).

Run: ``python tests/benchmarks/bench_min_norm.py [--sizes 2 8 32 128] [--rounds 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from jdoptim.aggregation import MGDAWeighting

KINDS = ("normal", "spread", "lowrank")


def _jacobian(kind: str, m: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = 4 * m
    if kind == "lowrank":
        rank = max(1, m // 4)
        J = torch.randn(m, rank, generator=generator, dtype=torch.float64) @ torch.randn(
            rank, n, generator=generator, dtype=torch.float64
        )
        return J + torch.randn(1, n, generator=generator, dtype=torch.float64)
    J = torch.randn(m, n, generator=generator, dtype=torch.float64)
    if kind == "spread":
        J = J * torch.logspace(0, 2, m, dtype=torch.float64)[:, None]
    return J


def _timed(weighting: MGDAWeighting, G: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.process_time()
    weights = weighting(G)
    return time.process_time() - start, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[2, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    exact, frank_wolfe = MGDAWeighting("active_set"), MGDAWeighting("frank_wolfe")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64")
    print(
        f"{'kind':8s} {'m':>4s} {'exact ms':>9s} {'fw ms':>8s} {'ratio':>6s} "
        f"{'fw excess':>10s} {'fw conflict':>12s}"
    )
    for kind in KINDS:
        for m in args.sizes:
            times = {"exact": [], "fw": []}
            excess, conflict = [], 0.0
            for seed in range(args.rounds):
                J = _jacobian(kind, m, seed)
                G = J @ J.T
                elapsed, w_exact = _timed(exact, G)
                times["exact"].append(elapsed)
                elapsed, w_fw = _timed(frank_wolfe, G)
                times["fw"].append(elapsed)
                best, d = w_exact @ G @ w_exact, w_fw @ J
                excess.append(((d @ d - best) / best).item() if best > 0 else 0.0)
                cosines = (J @ d) / (J.norm(dim=1) * d.norm()).clamp(min=1e-300)
                conflict = max(conflict, -cosines.min().item())
            exact_ms = 1e3 * statistics.median(times["exact"])
            fw_ms = 1e3 * statistics.median(times["fw"])
            print(
                f"{kind:8s} {m:4d} {exact_ms:9.3f} {fw_ms:8.3f} {exact_ms / fw_ms:6.2f} "
                f"{statistics.median(excess):10.2e} {conflict:12.2e}"
            )


if __name__ == "__main__":
    main()
