"""A recurrent network trained with Jacobian descent: one objective per sequence.

The task is the adding problem: each sequence holds random values in ``[0, 1]`` on its first
channel and, on its second, two markers; the target is the sum of the two marked values. A GRU
(or an LSTM, ``--cell lstm``) with ``batch_first=True`` reads the sequence and a linear layer
reads its last hidden state. Each sequence's squared error is an objective of its own
(``reduction="none"``: losses of shape ``[batch]``), aggregated with `UPGrad` inside Adam; a
second copy of the model is trained with `Mean` (the usual mean loss) for comparison.

Which mode: the optimizer is built with ``mode="auto", modules=model``, and picks jacobian
mode. The Gramian engine has closed forms for linear, convolution, embedding and normalisation
layers, but not for recurrent ones: for a GRU or an LSTM it falls back to per-sample gradients
from ``torch.func``, one sample at a time, since ``torch.func`` cannot vectorise these layers.
For the GRU here that is several times slower than the one batched backward pass of jacobian
mode (for the LSTM, about as fast). The script prints the mode chosen and the modules without
a closed form; ``--mode gramian`` forces gramian mode to compare the time per step (the steps
are the same, up to rounding). Giving gramian mode only the linear head as ``modules``
(partial Jacobian descent, see ``examples/partial_jd.py``) avoids the fallback altogether.

Run ``python examples/rnn.py`` (about 15 s on one CPU core); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer, Mean, UPGrad
from jdoptim.gramian import GramianEngine

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: fall back to plain progress lines
    tqdm = None


def adding_problem(n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences ``[n, length, 2]`` (values, markers) and their targets ``[n]``."""
    values = torch.rand(n, length, generator=generator)
    first = torch.randint(0, length // 2, (n,), generator=generator)
    second = torch.randint(length // 2, length, (n,), generator=generator)
    markers = torch.zeros(n, length)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    return torch.stack([values, markers], dim=2), (values * markers).sum(dim=1)


class SequenceRegressor(nn.Module):
    """A recurrent layer (batch first), then a linear layer on its last output."""

    def __init__(self, cell: str, hidden: int) -> None:
        super().__init__()
        recurrent = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = recurrent(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        outputs, _ = self.rnn(x)  # [batch, length, hidden]
        return self.head(outputs[:, -1]).squeeze(1)  # [batch]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    parser.add_argument("--mode", choices=["auto", "jacobian", "gramian"], default="auto")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=12, help="sequence length")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    x_test, y_test = adding_problem(1024, args.length, generator)
    torch.manual_seed(args.seed)
    initial = SequenceRegressor(args.cell, hidden=32)
    with GramianEngine(initial) as engine:
        fallback = engine.fallback_modules
    runs = {}
    for name, aggregator in [("Mean", Mean()), ("UPGrad", UPGrad())]:
        model = copy.deepcopy(initial)
        optimizer = JDOptimizer(
            torch.optim.Adam(model.parameters(), lr=args.lr),
            aggregator,
            mode=args.mode,
            modules=model,  # lets mode="auto" consider gramian mode, which records the forward
        )
        runs[name] = {"model": model, "optimizer": optimizer, "seconds": 0.0}

    mode = runs["UPGrad"]["optimizer"].resolved_mode
    print(
        f"Adding problem, sequences of {args.length}, batches of {args.batch_size} (one loss "
        f"per sequence); {args.cell.upper()} with batch_first=True; Adam lr={args.lr}."
    )
    print(
        f"mode={args.mode!r} resolved to {mode!r}; modules without a closed form in the Gramian "
        f"engine: {', '.join(fallback) or 'none'}."
    )
    baseline = ((y_test - y_test.mean()) ** 2).mean().item()
    print(f"Test MSE of always predicting the mean target: {baseline:.4f}")
    report_every = max(1, args.steps // 5)
    steps = range(1, args.steps + 1)
    with warnings.catch_warnings():
        # In gramian mode, the engine warns once that torch.func cannot vectorise the layer,
        # and torch that it has no batching rule for the LSTM's kernels.
        warnings.filterwarnings("ignore", message="Per-sample gradients of module")
        warnings.filterwarnings("ignore", message="There is a performance drop")
        for step in steps if tqdm is None else tqdm(steps, desc="steps"):
            x, y = adding_problem(args.batch_size, args.length, generator)
            for run in runs.values():
                start = time.perf_counter()
                losses = (run["model"](x) - y) ** 2  # [batch]: one objective per sequence
                run["optimizer"].zero_grad()
                run["optimizer"].step(losses)
                run["seconds"] += time.perf_counter() - start
            if tqdm is None and (step % report_every == 0 or step == args.steps):
                print(f"step {step}/{args.steps}", flush=True)

    print("          test MSE  ms/step")
    for name, run in runs.items():
        with torch.no_grad():
            mse = ((run["model"](x_test) - y_test) ** 2).mean().item()
        print(f"  {name:<6}  {mse:8.4f}  {1000 * run['seconds'] / args.steps:7.2f}")


if __name__ == "__main__":
    main()
