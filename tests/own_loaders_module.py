"""A LightningModule in the style of Lightning's ImageNet example: its own dataloaders, built from ``data_path``.

Used by the CLI tests (no ``--data``). ``data_path`` is a ``torch.save`` file holding ``{"x": (N, 3, 16, 16),
"y": (N,)}``; the module counts the batches its own loaders served, so a test can tell which data it trained on.
"""

import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class OwnLoadersModule(pl.LightningModule):
    def __init__(self, data_path: str, batch_size: int = 16, lr: float = 0.05, report: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(8, 4))
        self.train_batches_served = 0

    def training_step(self, batch, batch_idx):
        images, target = batch
        loss = F.cross_entropy(self.model(images), target)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, target = batch
        output = self.model(images)
        self.log("val_loss", F.cross_entropy(output, target))
        self.log("val_acc", (output.argmax(1) == target).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def _loader(self, shuffle: bool) -> DataLoader:
        data = torch.load(self.hparams.data_path, weights_only=True)
        return DataLoader(TensorDataset(data["x"], data["y"]), batch_size=self.hparams.batch_size, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader(shuffle=True)

    def val_dataloader(self):
        return self._loader(shuffle=False)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.train_batches_served += 1

    def on_fit_end(self):
        if self.hparams.report:
            with open(self.hparams.report, "w") as f:
                f.write(str(self.train_batches_served))


class WarningModule(OwnLoadersModule):
    """Emits a warning about the user's own code once per fit (the CLI must not hide it)."""

    def on_train_start(self):
        warnings.warn("my_module: the user's own warning", UserWarning, stacklevel=1)


def write_data(path, n: int = 48, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    torch.save({"x": torch.randn(n, 3, 16, 16, generator=g), "y": torch.randint(0, 4, (n,), generator=g)}, path)
    return str(path)
