"""Add lightning-tricks to a project you already have: your LightningModule stays as it is.

Run:  python examples/add_to_existing_project.py [--epochs 10] [--devices 1]

Everything below `MyClassifier` is what a user already has. The only lightning-tricks lines are the
imports and the `callbacks=[...]` list handed to the Trainer.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks import DigitsDataModule  # the embedded digits data; use your own datamodule instead

# from lightning_tricks import ...  # tricks are added here as they land (see the README's feature table)


class MyClassifier(pl.LightningModule):
    """An ordinary LightningModule: list batches, plain cross-entropy, accuracy from the labels."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(dim=1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    pl.seed_everything(0)
    callbacks: list[pl.Callback] = [
        # the tricks go here, e.g. lightning_tricks.<Trick>(...)
    ]
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(MyClassifier(), DigitsDataModule(batch_size=64))
    if trainer.is_global_zero:
        print(f"Final validation accuracy: {float(trainer.callback_metrics['val_acc']):.4f}")


if __name__ == "__main__":
    main()
