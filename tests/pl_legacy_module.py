"""A LightningModule written against the older package name, ``import pytorch_lightning as pl`` (issue 20, point 4).

Public code still does this; ``pytorch_lightning.LightningModule`` is not a subclass of
``lightning.pytorch.LightningModule``. The module trains on its own loaders (scikit-learn's digits, 8x8), so
the CLI needs no ``--data``; ``LegacyDigits`` is the same data as a ``pytorch_lightning`` datamodule.
"""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_split(train: bool, n_train: int = 1200) -> TensorDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x = (x - 0.3) / 0.4
    return TensorDataset(x[:n_train], y[:n_train]) if train else TensorDataset(x[n_train:], y[n_train:])


class LegacyNet(pl.LightningModule):
    """A small CNN classifier on digits; ``forward`` returns logits."""

    def __init__(self, lr: float = 0.05, hidden: int = 32, num_classes: int = 10, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(8 * 4 * 4, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.hidden(self.features(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(digits_split(True), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(digits_split(False), batch_size=256)

    def test_dataloader(self):
        return self.val_dataloader()


class LegacyDigits(pl.LightningDataModule):
    """The same digits split, as a ``pytorch_lightning`` datamodule."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(digits_split(True), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(digits_split(False), batch_size=256)

    def test_dataloader(self):
        return self.val_dataloader()
