"""UPGrad's weighting on per-sample Gramians, with and without the low-rank preconditioner.

The Gramians are those of `bench_gramian.py`'s workloads (one cross-entropy loss per sample of an
MLP 784-256-256-10 and of a small CNN, 10 classes, random inputs and labels, the models at
initialisation), formed by `GramianEngine` at each batch of ``--batches``. Their unit-diagonal
forms have 9 eigenvalues far above the rest (the directions of the logits), which the solver's
``_Outliers`` preconditioner moves; the ``without`` column solves the same Gramians with it
disabled (the solver before it). Both are interleaved in the same rounds of one process, on one
torch thread (printed); times are medians of the process CPU time of `UPGrad().weighting`.
Columns: the condition number of the unit-diagonal Gramian and of its bulk (without the
outliers), the number of outliers (the eigenvalues before the widest gap), the ratio of the
largest eigenvalue to the bulk's, whether the solver builds the preconditioner (only from
m = 256 and where that ratio is at least 20), the two times and their ratio, and
the largest difference between the two weight vectors relative to the largest weight (both are
certified solutions of the same problems, so it is at the solver's tolerance).

Run: ``python tests/benchmarks/bench_outliers.py [--rounds 3] [--batches 256 512 1024]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as nnf

sys.path.insert(0, str(Path(__file__).parent))

from bench_gramian import make_data, make_model

from jdoptim import UPGrad
from jdoptim.gramian import GramianEngine
from jdoptim.linalg import _dual_cone


def per_sample_gramian(kind: str, batch: int) -> torch.Tensor:
    torch.manual_seed(batch)
    model = make_model(kind)
    x, y = make_data(kind, batch)
    engine = GramianEngine(model)
    G = engine.gramian(nnf.cross_entropy(model(x), y, reduction="none")).detach().clone()
    engine.close()
    return G


def spectrum(G: torch.Tensor) -> tuple[float, float, float, int, bool]:
    """The condition numbers of the unit-diagonal Gramian and of its bulk, the ratio of its
    largest eigenvalue to the bulk's, the number of eigenvalues before the widest gap among the
    first 16 ratios of consecutive eigenvalues, and whether the solver builds the preconditioner."""
    G = G.double()
    norms = G.diagonal().sqrt()
    G = G / norms.unsqueeze(1) / norms
    values = torch.linalg.eigvalsh(G).flip(0)
    k = int((values[:16] / values[1:17]).argmax()) + 1
    used = _dual_cone._Outliers.of(G) is not None
    return (
        float(values[0] / values[-1]),
        float(values[k] / values[-1]),
        float(values[0] / values[k]),
        k,
        used,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--kinds", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, rounds: {args.rounds}")
    print(
        "| workload | m | κ | κ of the bulk | outliers | largest / bulk | built | with ms "
        "| without ms | speed-up | diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    weighting = UPGrad().weighting
    build = _dual_cone._Outliers.of
    for kind in args.kinds:
        for batch in args.batches:
            G = per_sample_gramian(kind, batch)
            condition, bulk, ratio, k, used = spectrum(G)
            times: dict[bool, list[float]] = {True: [], False: []}
            weights: dict[bool, torch.Tensor] = {}
            for _ in range(args.rounds):
                for preconditioned in (True, False):
                    _dual_cone._Outliers.of = (  # type: ignore[method-assign]
                        build if preconditioned else classmethod(lambda cls, G: None)
                    )
                    start = time.process_time()
                    weights[preconditioned] = weighting(G)
                    times[preconditioned].append(time.process_time() - start)
            _dual_cone._Outliers.of = build  # type: ignore[method-assign]
            with_ms = 1e3 * statistics.median(times[True])
            without_ms = 1e3 * statistics.median(times[False])
            diff = (weights[True] - weights[False]).abs().max() / weights[False].abs().max()
            print(
                f"| {kind.upper()} | {batch} | {condition:.3g} | {bulk:.3g} | {k} | {ratio:.1f} | "
                f"{'yes' if used else 'no'} | "
                f"{with_ms:.1f} | {without_ms:.1f} | {without_ms / with_ms:.2f}× | "
                f"{float(diff):.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
