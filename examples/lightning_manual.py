"""Jacobian descent inside a Lightning training loop, with manual optimisation.

Run with ``python examples/lightning_manual.py`` (needs ``pip install lightning``). Lightning calls
``configure_optimizers`` for the `JDOptimizer`; the training step computes one loss per task,
hands the loss vector to the optimizer's ``backward`` and lets Lightning step it.
"""

from __future__ import annotations

import argparse

import lightning
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jdoptim import JDOptimizer, UPGrad


class MultiTaskRegression(lightning.LightningModule):
    """A shared trunk and one head per task, trained by Jacobian descent on the trunk."""

    def __init__(self, tasks: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        self.automatic_optimization = False  # the optimizer needs the vector of losses
        self.lr = lr
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        losses = ((self(x) - y) ** 2).mean(dim=0)  # one loss per task
        optimizer = self.optimizers()
        optimizer.zero_grad()
        optimizer.optimizer.backward(losses)  # the JDOptimizer: Jacobian -> UPGrad -> .grad
        optimizer.step()
        self.log_dict({f"loss_{t}": loss for t, loss in enumerate(losses.detach())})

    def configure_optimizers(self) -> JDOptimizer:
        sgd = torch.optim.SGD(self.parameters(), lr=self.lr)
        return JDOptimizer(sgd, UPGrad(), shared_params=self.trunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.samples, 8)
    directions = torch.randn(8, 3)
    y = torch.tanh(x @ directions) + 0.1 * torch.randn(args.samples, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = MultiTaskRegression()
    trainer = lightning.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    with torch.no_grad():
        final = ((model(x) - y) ** 2).mean(dim=0)
    print(f"Trained {args.epochs} epochs with Lightning; task losses: {final.tolist()}")


if __name__ == "__main__":
    main()
