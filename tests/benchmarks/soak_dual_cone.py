"""Soak test of the dual-cone weightings: many Gramians, every dtype, failures counted.

Solves ``--n`` Gramians (default 100,000) with `UPGradWeighting` and `DualProjWeighting`: a
share (``--corpus-share``, default a third) from the corpus of real training Gramians
(``tests/data/gramian_corpus.npz``, rows in a random order), the rest random degenerate ones
(`tests.strategies.degenerate_gramian` of a `tests.strategies` degenerate Jacobian: zero,
duplicated and tiny rows, low rank, a common component, weakly stationary points, spread norms,
scales from 1e-60 to 1e60, formed in float64 or in the dtype), each in float64, float32,
bfloat16 and float16 in turn. A failure is an exception, a non-finite weight, a cosine with a
row below the dtype's bar where the update is not negligible, or (on one Gramian in
``--reference-every``, default 50) an update farther from the reference
(`tests.dual_cone_reference`, NNLS in float64) than the dtype's bar; the bars are
`tests.dual_cone_reference.BARS`. Gramians that are not positive semi-definite up to their
rounding relative to their rows' norms (`tests.dual_cone_reference.resolved`: subnormal products
of tiny rows in the corpus's float32 matrices) define no projection: only exceptions and
non-finite weights count there, and they are counted apart.

Run: ``python tests/benchmarks/soak_dual_cone.py [--n 100000] [--seed 0]``. Prints the
thread count (one), the Gramians per kind and dtype, the failures by kind with the first
examples, the worst conflict (most negative cosine) per dtype and the CPU time.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jdoptim import DualProjWeighting, UPGradWeighting
from tests.dual_cone_reference import (
    BARS,
    cosines,
    dualproj_reference,
    gramian_root,
    largest_row_norm,
    resolved,
    update_norm,
    upgrad_reference,
    violations,
)
from tests.gramian_corpus import CORPUS_PATH, load_corpus
from tests.strategies import (
    _GRAMIAN_LOG_SCALE,
    DEGENERACIES,
    FLOAT_DTYPES,
    _degenerate,
    degenerate_gramian,
)

METHODS = {
    "upgrad": (UPGradWeighting(), upgrad_reference),
    "dualproj": (DualProjWeighting(), dualproj_reference),
}
DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in FLOAT_DTYPES}


def random_gramian(rng: random.Random, dtype: torch.dtype, max_m: int) -> tuple[torch.Tensor, str]:
    """A random degenerate Gramian in ``dtype`` and a description to reproduce it."""
    m = rng.randint(1, max_m)
    n = rng.randint(1, 16)
    degeneracies = frozenset(d for d in DEGENERACIES if rng.random() < 0.4)
    rank = rng.randint(1, max(1, min(m, n) - 1))
    tiny, spread = rng.uniform(-20.0, -6.0), rng.uniform(0.0, 6.0)
    seed = rng.randrange(2**31)
    low, high = _GRAMIAN_LOG_SCALE[dtype]
    scale = 0.0 if rng.random() < 0.3 else rng.uniform(low, high)
    formed = dtype != torch.float64 and rng.random() < 0.5
    J = _degenerate(m, n, degeneracies, rank, tiny, spread, 0.0, seed, torch.float64)
    description = (
        f"_degenerate({m}, {n}, {sorted(degeneracies)}, {rank}, {tiny:.3f}, {spread:.3f}, 0.0, "
        f"{seed}, float64) -> degenerate_gramian(J, {dtype}, {scale:.3f}, {formed})"
    )
    return degenerate_gramian(J, dtype, scale, formed), description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="Gramians to solve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-m", type=int, default=24, help="largest random Gramian")
    parser.add_argument("--reference-every", type=int, default=50)
    parser.add_argument("--examples", type=int, default=3, help="examples printed per failure")
    parser.add_argument("--corpus", type=Path, default=CORPUS_PATH)
    parser.add_argument("--corpus-share", type=float, default=1 / 3, help="share of corpus draws")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}")
    rng = random.Random(args.seed)
    corpus = load_corpus(args.corpus)

    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: collections.Counter[tuple[str, str, str]] = collections.Counter()
    examples: dict[tuple[str, str, str], list[str]] = collections.defaultdict(list)
    worst: dict[str, tuple[float, str]] = {}
    checked_error = 0
    unresolved: collections.Counter[str] = collections.Counter()
    solve_time = 0.0
    start = time.process_time()
    for i in range(args.n):
        dtype = FLOAT_DTYPES[i % len(FLOAT_DTYPES)]
        if rng.random() < args.corpus_share:
            kind = "corpus"
            item = corpus[rng.randrange(len(corpus))]
            order = torch.randperm(
                item.gramian.shape[0], generator=torch.Generator().manual_seed(i)
            )
            G = torch.from_numpy(item.gramian)[order][:, order]
            if dtype == torch.float16:  # scaled to fit (the weights do not depend on the scale)
                G = G / float(G.abs().max().clamp(min=1e-30))
            G = G.to(dtype)
            description = f"corpus {item.name}, rows permuted with seed {i}, {dtype}"
        else:
            kind = "random"
            G, description = random_gramian(rng, dtype, args.max_m)
        dtype = G.dtype  # formed in float64 where the dtype's products would be subnormal
        counts[kind, DTYPE_NAMES[dtype]] += 1
        values = G.double().numpy()
        defined = resolved(values, dtype)
        unresolved[kind] += not defined
        with_reference = defined and i % args.reference_every == 0
        root = gramian_root(values)
        for method, (weighting, reference) in METHODS.items():
            key_base = (method, DTYPE_NAMES[dtype])
            tick = time.process_time()
            try:
                weights = weighting(G)
            except Exception as error:
                solve_time += time.process_time() - tick
                key = (*key_base, f"raised {type(error).__name__}")
                failures[key] += 1
                if len(examples[key]) < args.examples:
                    examples[key].append(f"{description}: {str(error)[:120]}")
                continue
            solve_time += time.process_time() - tick
            expected = reference(values) if with_reference else np.zeros(G.shape[0])
            found = violations(weights, expected, values, BARS[dtype], root, with_reference)
            if not defined:  # no projection defined: only finiteness counts
                found = [problem for problem in found if problem.startswith("non-finite")]
            checked_error += with_reference
            for problem in found:
                key = (*key_base, problem.split()[0] + " " + problem.split()[1].rstrip(":"))
                failures[key] += 1
                if len(examples[key]) < args.examples:
                    examples[key].append(f"{description}: {problem}")
            w = weights.double().numpy()
            if (
                defined
                and np.all(np.isfinite(w))
                and update_norm(w, root) > (BARS[dtype].negligible * largest_row_norm(values))
            ):
                cosine = float(np.min(cosines(w, values, root), initial=0.0))
                name = DTYPE_NAMES[dtype]
                if name not in worst or cosine < worst[name][0]:
                    worst[name] = (cosine, f"{method} on {description}")
    total = time.process_time() - start

    print(f"Gramians solved: {args.n} (each by {', '.join(METHODS)})")
    for kind in ("corpus", "random"):
        row = ", ".join(f"{name} {counts[kind, name]}" for name in DTYPE_NAMES.values())
        print(f"  {kind:<7} {row}")
    print(
        f"compared with the reference: {checked_error} solves (1 Gramian in {args.reference_every})"
    )
    print(
        "not positive semi-definite up to their rounding (subnormal products; only finiteness "
        f"checked): corpus {unresolved['corpus']}, random {unresolved['random']}"
    )
    print(f"failures: {sum(failures.values())}")
    for key, count in sorted(failures.items(), key=lambda item: -item[1]):
        print(f"  {count:7d}  {' / '.join(key)}")
        for line in examples[key]:
            print(f"             e.g. {line}")
    print("worst conflict (most negative cosine where the update is not negligible):")
    for name in DTYPE_NAMES.values():
        if name in worst:
            print(f"  {name:<9} {worst[name][0]: .3e}  ({worst[name][1]})")
    print(f"CPU time: {total:.1f} s in all, {solve_time:.1f} s in the weightings")


if __name__ == "__main__":
    main()
