"""Mixed precision with Jacobian descent: autocast, a GradScaler, and JDOptimizer(scaler=...).

The forward pass runs under ``torch.autocast`` (bfloat16 on the CPU, float16 on a GPU); the
vector of task losses is computed in float32 from its outputs. As in plain AMP, the losses are
multiplied by the scaler's scale before the backward pass, and the scaler steps::

    optimizer = JDOptimizer(torch.optim.SGD(...), UPGrad(), scaler=scaler)
    optimizer.zero_grad()
    optimizer.backward(scaler.scale(losses))
    scaler.step(optimizer)
    scaler.update()

Given the scaler, `jdoptim.JDOptimizer` hands the aggregator the *unscaled* Jacobian (or
Gramian, in gramian mode), so `UPGrad` sees the same numbers as without scaling, and writes the
update back into ``.grad`` multiplied by the scale, which ``scaler.step`` divides out before
the inner optimizer steps. When the scaled Jacobian overflows, the optimizer fills ``.grad``
with infinities: ``scaler.step`` then skips the step and ``scaler.update`` halves the scale,
exactly as it does for ordinary gradients.

The script trains a small multi-task regression model this way and prints, every few steps,
the scale and the task losses; a step whose scale went down was skipped for an overflow. A
second copy of the model is trained from the same initialisation in float32, without autocast
or scaler, for comparison. bfloat16 has the exponent range of float32, so on the CPU a scaler
is rarely needed; the calls are the same as for float16 on a GPU (``--device cuda``). Start
from a huge scale (``--init-scale 1e38``) to see overflowing steps being skipped.

In gramian mode (``--mode gramian``) the engine computes the Gramian of the *scaled* losses,
which is the square of the scale times the Gramian, before dividing it out; where that square
leaves float32's range (the scale times the largest gradient norm above about 1.8e19), the
Gramian is formed in float64, so gramian mode takes the same scales as jacobian mode.

Run ``python examples/amp.py`` (a few seconds on one CPU core); see ``--help``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer, UPGrad


def make_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[n, 8]`` and three regression targets ``[n, 3]`` of different scales."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    directions = torch.randn(8, 3, generator=generator)
    targets = torch.tanh(x @ directions) * torch.tensor([0.5, 1.0, 2.0])
    return x, targets + 0.05 * torch.randn(n, 3, generator=generator)


def task_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The mean squared error of each task, in float32: shape ``[3]``."""
    return ((model(x).float() - y) ** 2).mean(dim=0)


def format_losses(losses: Tensor) -> str:
    return " ".join(f"{v:.4f}" for v in losses.tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--init-scale", type=float, default=2.0**16, help="GradScaler's start")
    parser.add_argument("--growth-interval", type=int, default=50, help="steps between growths")
    parser.add_argument("--mode", choices=["jacobian", "gramian"], default="jacobian")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    x_all, y_all = make_data(4096, args.seed)
    x_all, y_all = x_all.to(device), y_all.to(device)
    torch.manual_seed(args.seed)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    model = model.to(device)
    reference = copy.deepcopy(model)  # trained in float32, without autocast or scaler

    scaler = torch.amp.GradScaler(
        device.type, init_scale=args.init_scale, growth_interval=args.growth_interval
    )
    optimizer = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr),
        UPGrad(),
        mode=args.mode,
        modules=model,  # used by gramian mode, which records the forward pass
        scaler=scaler,
    )
    plain = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=args.lr), UPGrad())

    print(
        f"Autocast to {str(dtype).removeprefix('torch.')} on {device.type}, {args.mode} mode, "
        f"GradScaler starting at {args.init_scale:g}; UPGrad, SGD lr={args.lr}."
    )
    print(f"{'step':>5}  {'scale':>10}  task losses (autocast)   task losses (float32)")
    generator = torch.Generator().manual_seed(args.seed + 1)
    skipped = 0
    report_every = max(1, args.steps // 10)
    for step in range(1, args.steps + 1):  # the lines printed every few steps show progress
        batch = torch.randint(0, len(x_all), (args.batch_size,), generator=generator)
        x, y = x_all[batch.to(device)], y_all[batch.to(device)]
        with torch.autocast(device.type, dtype=dtype):
            losses = task_losses(model, x, y)
        optimizer.zero_grad()
        optimizer.backward(scaler.scale(losses))
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped if the scaled Jacobian overflowed
        scaler.update()
        skipped += int(scaler.get_scale() < scale)

        reference_losses = task_losses(reference, x, y)
        plain.zero_grad()
        plain.step(reference_losses)
        if step % report_every == 0 or step == 1:
            cells, reference_cells = format_losses(losses), format_losses(reference_losses)
            print(f"{step:>5}  {scale:10.4g}  {cells}   {reference_cells}", flush=True)

    print(
        f"{skipped} of {args.steps} steps were skipped for an overflow; final scale "
        f"{scaler.get_scale():g}."
    )
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        final = task_losses(model, x_all, y_all)
    with torch.no_grad():
        final_reference = task_losses(reference, x_all, y_all)
    print(f"Task losses on all data, autocast + GradScaler: {format_losses(final)}")
    print(f"Task losses on all data, float32:               {format_losses(final_reference)}")


if __name__ == "__main__":
    main()
