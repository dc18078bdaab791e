"""LightningModules and helpers shared by the ensemble tests, written the way users write theirs."""

from __future__ import annotations

from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_tricks.zoo import DigitsDataModule


# a LightningModule written the way users write theirs: list batches, plain F.cross_entropy, its own scheduler
class PlainNet(pl.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 0.1, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)]


class LrRecorder(Callback):
    """The learning rate each optimizer step used, by step number (1-based)."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def save_member(module: pl.LightningModule, path: Path, class_path: str | None = None, **extra) -> Path:
    """A checkpoint as Lightning writes it (state_dict + hyper_parameters), optionally with a CLI `_class_path`."""
    hparams = dict(module.hparams)
    if class_path:
        hparams["_class_path"] = class_path
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__, **extra}, path)
    return path


def randomize_norm_stats(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
    return module.eval()


def digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(**{"batch_size": 64, "eval_batch_size": 45, **kwargs})  # 270 test images = 6 x 45


class ImageNetStyle(pl.LightningModule):
    """Written like Lightning's ImageNet example: a constructor argument (``data_path``) that is not saved in
    the hyper-parameters, and a step that calls ``self.model(images)``."""

    def __init__(self, data_path: str, width: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["data_path"])
        self.data_path = data_path
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, target = batch
        output = self.model(images)
        return F.cross_entropy(output, target)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
