"""A LightningModule written like the Lightning tutorials' CIFAR-10 baseline (``LitResnet``), on the 8x8 digits.

The pattern, in our own code: a torchvision ResNet whose stem is adapted to small images, ``forward``
returning ``F.log_softmax``, ``F.nll_loss`` in the steps, a torchmetrics accuracy, SGD with a
step-wise ``OneCycleLR``, and data from a datamodule. Unlike the tutorial, the stem keeps its
``nn.MaxPool2d`` (the tutorial swaps it for ``nn.Identity``) so that fractional max pooling has a layer
to replace. Used by the checkpoint tests (``tests/test_checkpoint.py``).
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torchmetrics.functional import accuracy
from torchvision.models.resnet import BasicBlock, ResNet


def create_model(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return model


class LitResnet(pl.LightningModule):
    def __init__(self, lr: float = 0.05, in_channels: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(in_channels)

    def forward(self, x):
        out = self.model(x)
        return F.log_softmax(out, dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        self.log("train_loss", loss)
        return loss

    def evaluate(self, batch, stage=None):
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = accuracy(preds, y, task="multiclass", num_classes=10)
        if stage:
            self.log(f"{stage}_loss", loss)
            self.log(f"{stage}_acc", acc)

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = OneCycleLR(optimizer, 0.1, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
