"""Collect the Gramians that UPGrad's weighting receives in real training, without label smoothing.

The examples' per-sample and multi-task setups are trained with `UPGrad` for many epochs, with
plain cross-entropies (no label smoothing): on separable data, well-classified samples'
gradients shrink to tiny or exactly zero values, batches repeat samples' gradients, and
Gramians formed in float32 are indefinite by rounding: the inputs the dual-cone solver must
handle. Every Gramian handed to the weighting is captured as produced (float32); a sample of
them, half spread over each run's steps, half over the Gramians with zero or tiny diagonal
entries, is saved to ``tests/data/gramian_corpus.npz`` (format: `tests.gramian_corpus`), each
marked if `UPGradWeighting` raises or returns non-finite weights on it.

Setups (models and data are those of the examples, imported from ``examples/``):

- ``iwrm``: ``examples/iwrm.py``, digits, one loss per sample, batch 32, jacobian mode (m = 32);
- ``iwmtl``: ``examples/iwmtl.py``, three tasks, batches of 32 (m = 96) and 42 (m = 126), gramian
  mode;
- ``digits_mtl``: ``examples/multi_task_digits.py``, two task losses, shared trunk (m = 2);
- ``digits_iwmtl``: the same model, one loss per sample and per task (m = 64);
- ``partial_jd``: ``examples/partial_jd.py`` (conv features), gramian mode on the whole
  model and on the head only (m = 32).

Training uses UPGrad's exact weights from the reference (`tests.dual_cone_reference`), so that
the runs, and this script's time, do not depend on the solver being tested. Partial JD uses the
library's weights (the reference's where they fail): there the weights also move parameters
outside the Gramian, and on a singular Gramian NNLS's weights, exact in ``Jᵀw`` but not
minimal, can be large enough to make training diverge.

Run: ``python tests/benchmarks/make_gramian_corpus.py [--epochs-scale 1.0] [--out PATH]``
(a few minutes on one core). Prints, per setup, the number of Gramians seen and kept, their
sizes, how many have zero or tiny (< 1e-10 of the largest) diagonal entries, how many are
indefinite in float64, how many of the kept ones the solver fails on (raises or gives non-finite
weights), and the time.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jdoptim import JDOptimizer, UPGrad, UPGradWeighting  # noqa: E402
from tests.dual_cone_reference import upgrad_reference  # noqa: E402
from tests.gramian_corpus import CORPUS_PATH, CorpusGramian, save_corpus  # noqa: E402

Step = Callable[[], None]


def example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Captures the Gramians handed to an `UPGrad`'s weighting, with the epoch and step."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.epoch = 0
        self.step = 0
        self.seen: list[CorpusGramian] = []

    def upgrad(self, library_weights: bool = False) -> UPGrad:
        """An `UPGrad` whose weighting records its Gramians and returns the reference weights,
        or with ``library_weights`` its own (the reference's where it fails)."""
        aggregator = UPGrad()
        weighting = aggregator.weighting
        solve = weighting._weights

        def recording(matrix: Tensor) -> Tensor:
            self.seen.append(
                CorpusGramian(matrix.detach().cpu().numpy().copy(), self.source, self.epoch,
                              self.step, failed=False)
            )  # fmt: skip
            if library_weights and not solver_fails(matrix.detach().cpu().numpy()):
                return solve(matrix)
            return torch.from_numpy(upgrad_reference(matrix)).to(matrix.dtype)

        weighting._weights = recording
        return aggregator

    def run(self, epochs: int, batches: Callable[[], list[Tensor]], step: Callable) -> None:
        for self.epoch in range(1, epochs + 1):
            for batch in batches():
                self.step += 1
                step(batch)


def iwrm(epochs: int) -> Recorder:
    recorder = Recorder("iwrm")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x, y = x[:1000], y[:1000]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.3), recorder.upgrad(), mode="jacobian"
    )
    generator = torch.Generator().manual_seed(0)

    def step(batch: Tensor) -> None:
        optimizer.zero_grad()
        optimizer.step(nnf.cross_entropy(model(x[batch]), y[batch], reduction="none"))

    recorder.run(epochs, lambda: torch.randperm(len(x), generator=generator).split(32), step)
    return recorder


def iwmtl(epochs: int, batch_size: int) -> Recorder:
    module = example("iwmtl")
    recorder = Recorder(f"iwmtl{batch_size}")
    x, labels = module.make_data(2048, 16, 3, seed=0)
    torch.manual_seed(0)
    model = module.MultiTaskNet(16, 3, width=64)
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), recorder.upgrad(), mode="gramian",
        modules=model,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)

    def step(batch: Tensor) -> None:
        logits = model(x[batch]).transpose(1, 2)
        optimizer.zero_grad()
        optimizer.step(nnf.cross_entropy(logits, labels[batch], reduction="none"))

    recorder.run(
        epochs, lambda: torch.randperm(len(x), generator=generator).split(batch_size), step
    )
    return recorder


def digits(epochs: int, per_sample: bool) -> Recorder:
    module = example("multi_task_digits")
    from sklearn.datasets import load_digits

    recorder = Recorder("digits_iwmtl" if per_sample else "digits_mtl")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    generator = torch.Generator().manual_seed(0)
    x, y = module.multi_digits(images, torch.tensor(data.target), 2000, generator)
    torch.manual_seed(0)
    model = module.TwoHeads(64)
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), recorder.upgrad(),
        shared_params=model.trunk,
    )  # fmt: skip
    reduction = "none" if per_sample else "mean"

    def step(batch: Tensor) -> None:
        logits = model(x[batch])
        losses = torch.stack(
            [nnf.cross_entropy(logits[k], y[batch, k], reduction=reduction) for k in range(2)],
            dim=-1,
        )
        optimizer.zero_grad()
        optimizer.step(losses)

    size = 32 if per_sample else 64
    recorder.run(epochs, lambda: torch.randperm(len(x), generator=generator).split(size), step)
    return recorder


def partial_jd(epochs: int, head_only: bool) -> Recorder:
    module = example("partial_jd")
    recorder = Recorder("partial_jd_head" if head_only else "partial_jd_all")
    x, y = module.make_data(1024, seed=0)
    torch.manual_seed(0)
    model = module.Classifier(module.ConvFeatures())
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), recorder.upgrad(library_weights=True),
        mode="gramian",
        modules=model.head if head_only else model,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)

    def step(batch: Tensor) -> None:
        optimizer.zero_grad()
        optimizer.step(nnf.cross_entropy(model(x[batch]), y[batch], reduction="none"))

    recorder.run(epochs, lambda: torch.randperm(len(x), generator=generator).split(32), step)
    return recorder


def tiny_diagonal(G: np.ndarray) -> int:
    diagonal = np.diag(G).astype(np.float64)
    return int(np.sum(diagonal < 1e-10 * diagonal.max())) if diagonal.max() > 0 else len(G)


def select(seen: list[CorpusGramian], keep: int) -> list[CorpusGramian]:
    """Half of ``keep`` evenly spread over the run's steps, half evenly spread over the
    Gramians with a zero or tiny diagonal entry; each marked ``failed`` if the solver of the
    time raises or returns non-finite weights on it."""

    def spread(gramians: list[CorpusGramian], count: int) -> list[CorpusGramian]:
        count = min(count, len(gramians))
        if count == 0:
            return []
        return [gramians[i] for i in np.linspace(0, len(gramians) - 1, count).round().astype(int)]

    chosen = spread(seen, keep - keep // 2)
    steps = {g.step for g in chosen}
    degenerate = [g for g in seen if tiny_diagonal(g.gramian) > 0 and g.step not in steps]
    chosen += spread(degenerate, keep - len(chosen))
    return [
        replace(g, failed=solver_fails(g.gramian)) for g in sorted(chosen, key=lambda g: g.step)
    ]


def solver_fails(G: np.ndarray) -> bool:
    """Whether UPGrad's weighting raises or returns non-finite weights on ``G`` (recorded with
    each matrix: the solver before the corpus existed did both)."""
    try:
        return not bool(UPGradWeighting()(torch.from_numpy(G)).isfinite().all())
    except Exception:  # any exception counts as a failure of the solver
        return True


SETUPS: dict[str, tuple[Callable[[int], Recorder], int, int]] = {
    # name: (run for a number of epochs, epochs, Gramians kept)
    "iwrm": (iwrm, 40, 90),
    "iwmtl32": (lambda e: iwmtl(e, 32), 25, 30),
    "iwmtl42": (lambda e: iwmtl(e, 42), 10, 8),
    "digits_mtl": (lambda e: digits(e, per_sample=False), 20, 25),
    "digits_iwmtl": (lambda e: digits(e, per_sample=True), 12, 40),
    "partial_jd_all": (lambda e: partial_jd(e, head_only=False), 40, 35),
    "partial_jd_head": (lambda e: partial_jd(e, head_only=True), 40, 35),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs-scale", type=float, default=1.0, help="multiply every run's epochs"
    )
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    parser.add_argument("--out", type=Path, default=CORPUS_PATH)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch threads: {torch.get_num_threads()}")
    print(
        f"{'setup':<16}{'epochs':>7}{'seen':>6}{'kept':>6}{'m':>9}{'zero diag':>10}"
        f"{'tiny diag':>10}{'indefinite':>11}{'asym':>5}{'fails':>7}{'s':>7}"
    )
    corpus: list[CorpusGramian] = []
    for name in args.setups:
        run, epochs, keep = SETUPS[name]
        epochs = max(1, round(epochs * args.epochs_scale))
        start = time.process_time()
        seen = run(epochs).seen
        seconds = time.process_time() - start
        kept = select(seen, keep)
        corpus += kept
        sizes = sorted({g.gramian.shape[0] for g in kept})
        zero = sum(bool(np.any(np.diag(g.gramian) == 0)) for g in kept)
        tiny = sum(tiny_diagonal(g.gramian) > 0 for g in kept)
        indefinite = sum(np.linalg.eigvalsh(g.gramian.astype(np.float64)).min() < 0 for g in kept)
        asymmetric = sum(bool(np.any(g.gramian != g.gramian.T)) for g in kept)
        raised = sum(g.failed for g in kept)
        m = f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 1 else str(sizes[0])
        print(
            f"{name:<16}{epochs:>7}{len(seen):>6}{len(kept):>6}{m:>9}{zero:>10}{tiny:>10}"
            f"{indefinite:>11}{asymmetric:>5}{raised:>7}{seconds:>7.1f}",
            flush=True,
        )
    save_corpus(args.out, corpus)
    smallest = min(np.linalg.eigvalsh(g.gramian.astype(np.float64)).min() /
                   max(float(np.abs(g.gramian).max()), 1e-300) for g in corpus)  # fmt: skip
    print(
        f"saved {len(corpus)} Gramians ({args.out.stat().st_size / 1e6:.2f} MB) to {args.out}; "
        f"most negative eigenvalue relative to the largest entry: {smallest:.2e}"
    )


if __name__ == "__main__":
    main()
