"""Counts of contract violations over many degenerate inputs, for every registered method.

The fuzz tests of the suite (`tests/test_hypothesis.py`) run a few hundred inputs per method and
fail on the first violation; this script runs many more and counts them, to show how rare
failures are (the goal is none). Aggregators and weightings get Jacobians from
`tests.strategies.degenerate_jacobians` (zero, duplicated and tiny rows, low rank, a common
component, weakly stationary points, spread norms, scales 1e-30 to 1e30, float64, float32,
bfloat16, float16, any row order), with losses from 1e-30 to 1e30 for the methods that need
them; scalarizers get losses from 1e-30 to 1e30. The checks are
those of `tests.properties`: finite input gives a finite result of the right shape and dtype,
the declared properties hold (non-conflicting, permutation invariant), and non-finite input
gives a ``ValueError`` or a non-finite result.

Run: ``python tests/benchmarks/bench_fuzz.py [--examples 2000] [--methods mgda upgrad]
[--dtypes float32]``.
Prints, per method, the number of inputs, of inputs with a violation, of inputs whose Gramian,
formed in the Jacobian's dtype, overflows or underflows (``unfaith``: the declared properties are
not checked on them, see `tests.properties.faithful_gramian`), the CPU time, and the most
frequent violations with an example each; the thread count is printed (one thread).
"""

from __future__ import annotations

import argparse
import collections
import re
import time

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import jdoptim
from jdoptim.aggregation import GramianWeightedAggregator
from tests.properties import (
    aggregator_violations,
    faithful_gramian,
    scalarizer_violations,
    weighting_violations,
)
from tests.strategies import degenerate_jacobians, loss_vectors

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _kind(violation: str) -> str:
    """The violation without its numbers, to count alike ones together."""
    return re.sub(r"-?\d[\d.e+-]*", "#", violation)[:90]


def run(
    name: str, examples: int, dtypes: tuple[torch.dtype, ...] | None = None
) -> tuple[dict[str, int], collections.Counter, dict[str, str]]:
    spec = jdoptim.get_spec(name)
    counts: collections.Counter = collections.Counter()
    first: dict[str, str] = {}
    totals = {"inputs": 0, "failed": 0, "unfaithful": 0}

    if spec.kind == "scalarizer":
        strategy, check = loss_vectors(), scalarizer_violations
    else:
        chosen = {} if dtypes is None else {"dtypes": dtypes}
        strategy = degenerate_jacobians(min_m=spec.min_objectives, **chosen)
        check = aggregator_violations if spec.kind == "aggregator" else weighting_violations

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy, st.integers(0, 2**31 - 1), st.data())
    def sample(matrix: torch.Tensor, seed: int, data: st.DataObject) -> None:
        context = []
        if spec.kind != "scalarizer" and spec.example(matrix.shape[0]).needs_losses:
            context.append(data.draw(loss_vectors(m=matrix.shape[0], dtypes=(matrix.dtype,))))
        try:
            violations = check(name, matrix, seed, *context)
        except Exception as error:
            violations = [f"the check itself raises {type(error).__name__}: {error}"]
        totals["inputs"] += 1
        totals["failed"] += bool(violations)
        method = spec.example(matrix.shape[0]) if spec.kind == "aggregator" else None
        if isinstance(method, GramianWeightedAggregator) and method.weighting.uses_matrix:
            totals["unfaithful"] += not faithful_gramian(method, matrix)
        for violation in violations:
            kind = _kind(violation)
            counts[kind] += 1
            first.setdefault(kind, f"{violation[:120]} [{matrix.dtype}, {tuple(matrix.shape)}]")

    sample()
    return totals, counts, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="inputs per method")
    parser.add_argument("--methods", nargs="*", help="registry names (default: all)")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPES),
        help="dtypes of the Jacobians (default: all four); scalarizers' losses are not affected",
    )
    args = parser.parse_args()
    dtypes = None if args.dtypes is None else tuple(DTYPES[d] for d in args.dtypes)
    torch.set_num_threads(1)
    names = args.methods or (
        jdoptim.list_aggregators() + jdoptim.list_weightings() + jdoptim.list_scalarizers()
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.examples} inputs")
    print(f"{'method':28s} {'inputs':>7s} {'failed':>7s} {'unfaith':>7s} {'seconds':>8s}")
    grand = collections.Counter()
    for name in names:
        start = time.process_time()
        totals, counts, first = run(name, args.examples, dtypes)
        seconds = time.process_time() - start
        grand.update(totals)
        print(
            f"{name:28s} {totals['inputs']:7d} {totals['failed']:7d} "
            f"{totals['unfaithful']:7d} {seconds:8.1f}"
        )
        for kind, count in counts.most_common(5):
            print(f"{'':28s} {count:7d}  {first[kind]}")
    print(f"{'all':28s} {grand['inputs']:7d} {grand['failed']:7d} {grand['unfaithful']:7d}")


if __name__ == "__main__":
    main()
