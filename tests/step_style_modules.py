"""LightningModules written in the styles public projects use, to check that the callbacks are drop-in.

Our own code, following three public patterns (no knowledge of lightning-tricks):

* :class:`LitResnetStyle`: the Lightning tutorials' CIFAR-10 baseline ``LitResnet``: ``forward`` returns
  ``F.log_softmax(self.model(x), dim=1)``, the loss is ``F.nll_loss``, accuracy from
  ``torchmetrics.functional.accuracy`` in the step, ``OneCycleLR`` stepped every batch.
* :class:`ImageNetStyle`: Lightning's ``examples/pytorch/domain_templates/imagenet.py``: the steps call
  the submodule, ``output = self.model(images)``, ``F.cross_entropy``, a top-k accuracy computed by hand,
  a constructor argument that is not a hyper-parameter of the network (``data_path``).
* :class:`TemplateStyle`: a popular project template's module: ``net`` passed in as an ``nn.Module``,
  ``self.criterion = nn.CrossEntropyLoss()``, a ``model_step`` calling ``self.forward(x)`` (which
  bypasses module hooks), torchmetrics ``Accuracy``/``MeanMetric`` objects updated in the steps.

The networks are small (CPU tests); the step code is what matters.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import Accuracy
from torchmetrics.functional import accuracy

CLASSES = 4


def create_model(in_channels: int = 1, num_classes: int = CLASSES) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, num_classes))


class LitResnetStyle(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return F.log_softmax(out, dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", accuracy(torch.argmax(logits, dim=1), y, task="multiclass", num_classes=CLASSES))
        return loss

    def evaluate(self, batch: Any, stage: str | None = None) -> None:
        x, y = batch
        logits = self(x)
        loss = F.nll_loss(logits, y)
        preds = torch.argmax(logits, dim=1)
        acc = accuracy(preds, y, task="multiclass", num_classes=CLASSES)
        if stage:
            self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
            self.log(f"{stage}_acc", acc, prog_bar=True, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = OneCycleLR(optimizer, 0.1, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ImageNetStyle(pl.LightningModule):
    def __init__(self, data_path: str = "unused", lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_path = data_path
        self.model = create_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, target = batch
        output = self.model(images)
        loss_train = F.cross_entropy(output, target)
        acc1, acc2 = self.__accuracy(output, target, topk=(1, 2))
        self.log("train_loss", loss_train, on_step=True, on_epoch=True, logger=True)
        self.log("train_acc1", acc1, on_step=True, prog_bar=True, on_epoch=True, logger=True)
        self.log("train_acc2", acc2, on_step=True, on_epoch=True, logger=True)
        return loss_train

    def eval_step(self, batch: Any, batch_idx: int, prefix: str) -> torch.Tensor:
        images, target = batch
        output = self.model(images)
        loss_val = F.cross_entropy(output, target)
        acc1, acc2 = self.__accuracy(output, target, topk=(1, 2))
        self.log(f"{prefix}_loss", loss_val, on_step=True, on_epoch=True, sync_dist=True)
        self.log(f"{prefix}_acc1", acc1, on_step=True, prog_bar=True, on_epoch=True, logger=True, sync_dist=True)
        self.log(f"{prefix}_acc2", acc2, on_step=True, on_epoch=True, logger=True, sync_dist=True)
        return loss_val

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.eval_step(batch, batch_idx, "test")

    @staticmethod
    def __accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[torch.Tensor]:
        """Computes the accuracy over the k top predictions for the specified values of k."""
        with torch.no_grad():
            maxk = max(topk)
            batch_size = target.size(0)
            _, pred = output.topk(maxk, 1, True, True)
            pred = pred.t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            res = []
            for k in topk:
                correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
                res.append(correct_k.mul_(100.0 / batch_size))
            return res

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                                    weight_decay=self.hparams.weight_decay)
        scheduler = LambdaLR(optimizer, lambda epoch: 0.1 ** (epoch // 30))
        return [optimizer], [scheduler]


class TemplateStyle(pl.LightningModule):
    def __init__(self, net: nn.Module | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net if net is not None else create_model()
        self.criterion = torch.nn.CrossEntropyLoss()
        self.train_acc = Accuracy(task="multiclass", num_classes=CLASSES)
        self.val_acc = Accuracy(task="multiclass", num_classes=CLASSES)
        self.test_acc = Accuracy(task="multiclass", num_classes=CLASSES)
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_start(self) -> None:
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_acc_best.reset()

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self.forward(x)
        loss = self.criterion(logits, y)
        preds = torch.argmax(logits, dim=1)
        return loss, preds, y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, preds, targets = self.model_step(batch)
        self.train_loss(loss)
        self.train_acc(preds, targets)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, targets = self.model_step(batch)
        self.val_loss(loss)
        self.val_acc(preds, targets)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, targets = self.model_step(batch)
        self.test_loss(loss)
        self.test_acc(preds, targets)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(params=self.trainer.model.parameters(), lr=1e-3)
        return {"optimizer": optimizer}


STYLES = {LitResnetStyle: "test_loss", ImageNetStyle: "test_loss_epoch", TemplateStyle: "test/loss"}
"""Each style and the key of the test loss it logs."""
