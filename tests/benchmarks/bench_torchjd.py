"""jdoptim's Gramian engine against TorchJD's, on the workloads of ``bench_gramian.py``.

One cross-entropy loss per sample (m = batch = 128) for the MLP 784-256-256-10 and the CNN
of ``bench_gramian.py``. Variants, interleaved in the same rounds of one process on one torch
thread, each from the same model and data:

- ``sgd``: the mean loss, one backward pass, ``SGD.step`` (the reference);
- ``jdoptim+mean``, ``jdoptim+upgrad``: `jdoptim.gramian.GramianEngine`, the weighting of
  ``Mean`` or ``UPGrad``, the engine's weighted backward pass, ``SGD.step``;
- ``torchjd+mean``, ``torchjd+upgrad``: ``torchjd.autogram.Engine.compute_gramian``, TorchJD's
  ``MeanWeighting`` or ``UPGradWeighting``, ``losses.backward(weights)``, ``SGD.step``: the
  usage TorchJD documents for instance-wise risk minimisation.

The table gives the median CPU time of the process over the rounds and its ratio to ``sgd``.
TorchJD is optional (``pip install "torchjd[quadprog_projector]"``, for its UPGrad); it is never
a dependency of jdoptim. Run:

    python tests/benchmarks/bench_torchjd.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as nnf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gramian import make_data, make_model

from jdoptim import Mean, UPGrad
from jdoptim.gramian import GramianEngine

VARIANTS = ["sgd", "jdoptim+mean", "jdoptim+upgrad", "torchjd+mean", "torchjd+upgrad"]


class Setup:
    def __init__(self, kind: str, variant: str) -> None:
        self.variant = variant
        self.model = make_model(kind)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        library, _, method = variant.partition("+")
        if library == "jdoptim":
            self.engine = GramianEngine(self.model)
            self.weighting = (UPGrad() if method == "upgrad" else Mean()).weighting
        elif library == "torchjd":
            from torchjd.aggregation import MeanWeighting, UPGradWeighting
            from torchjd.autogram import Engine

            self.engine = Engine(self.model, batch_dim=0)
            self.weighting = UPGradWeighting() if method == "upgrad" else MeanWeighting()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        output = self.model(x)
        if self.variant == "sgd":
            nnf.cross_entropy(output, y).backward()
        elif self.variant.startswith("jdoptim"):
            losses = nnf.cross_entropy(output, y, reduction="none")
            self.engine.backward(self.weighting(self.engine.gramian(losses)))
        else:
            losses = nnf.cross_entropy(output, y, reduction="none")
            weights = self.weighting(self.engine.compute_gramian(losses))
            losses.backward(weights)
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        version = importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        sys.exit('TorchJD is not installed: pip install "torchjd[quadprog_projector]"')
    print(f"torch {torch.__version__}, torchjd {version}, {torch.get_num_threads()} thread")
    print("| workload | variant | CPU ms | × SGD |\n|---|---|---:|---:|")
    for kind in ("mlp", "cnn"):
        x, y = make_data(kind, args.batch)
        setups = {variant: Setup(kind, variant) for variant in VARIANTS}
        for setup in setups.values():  # warm-up
            setup.step(x, y)
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.rounds):
            for variant, setup in setups.items():
                start = time.process_time()
                setup.step(x, y)
                times[variant].append(1000 * (time.process_time() - start))
        medians = {variant: statistics.median(values) for variant, values in times.items()}
        for variant in VARIANTS:
            ratio = medians[variant] / medians["sgd"]
            name = f"{kind.upper()} batch {args.batch}"
            print(f"| {name} | {variant} | {medians[variant]:.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
