"""Add lightning-tricks to a project you already have: your LightningModule stays exactly as it is.

Run:  python examples/add_to_existing_project.py [--epochs 10] [--devices 1] [--fast]

``MyClassifier`` is written the way public projects write theirs: its own ``nn.Module`` in
``self.model``, steps that call ``self.model(x)``, torchmetrics for accuracy, OneCycleLR. The only
lightning-tricks lines are the import and the ``tricks`` list handed to the Trainer:

* ``WeightInit``: Kaiming init for the ReLU layers (the lectures' init; the classifier keeps its small
  default init, so the first loss stays near log(10)), the same on every rank;
* ``Cutout``: a random square hole per training image (regularization, no change to your step);
* ``WeightPenalty``: L2 on the weights only, applied to the gradients (not to biases and norms);
* ``InitialLossCheck``: the first loss against log(10), before any update;
* ``DivergenceStop``: stops the run if the loss turns NaN or exceeds 3x the first loss;
* ``EarlyStopping``: stops when ``val_acc`` stalls and restores the best epoch's weights.

``--fast`` trains a few batches of one epoch (a smoke test). Nothing is written to disk.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lightning_tricks import (
    Cutout,
    DigitsDataModule,  # the embedded digits data; use your own datamodule instead
    DivergenceStop,
    EarlyStopping,
    InitialLossCheck,
    WeightInit,
    WeightPenalty,
)


class MyClassifier(pl.LightningModule):
    """An ordinary LightningModule: its own network, `self.model(x)` in the steps, torchmetrics, OneCycleLR."""

    def __init__(self, lr: float = 0.05, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def training_step(self, batch, batch_idx):
        images, target = batch
        output = self.model(images)
        loss = F.cross_entropy(output, target)
        self.train_acc(output, target)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, target = batch
        output = self.model(images)
        self.val_acc(output, target)
        self.log("val_loss", F.cross_entropy(output, target), sync_dist=True)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr,
                                                        total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--fast", action="store_true", help="one epoch of a few batches (a smoke test)")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    tricks: list[pl.Callback] = [
        WeightInit(scheme="kaiming_normal", nonlinearity="relu", exclude=["model.8"]),  # not the classifier
        Cutout(length=4),
        WeightPenalty(l2=2.5e-4),
        InitialLossCheck(num_classes=10),
        DivergenceStop(factor=3.0),
        EarlyStopping(monitor="val_acc", mode="max", patience=3),
    ]
    limits = dict(max_epochs=1, limit_train_batches=4, limit_val_batches=2) if args.fast else \
        dict(max_epochs=args.epochs)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, callbacks=tricks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **limits)
    model = MyClassifier()
    trainer.fit(model, DigitsDataModule(batch_size=64))
    # the restored (best) weights, scored again: the last epoch's metrics describe weights EarlyStopping replaced
    metrics = trainer.validate(model, DigitsDataModule(batch_size=64), verbose=False)[0]
    if trainer.is_global_zero:
        print(f"Final validation accuracy: {metrics['val_acc']:.4f}")


if __name__ == "__main__":
    main()
