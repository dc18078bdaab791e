"""A LightningModule written the way a user writes one, with what the structural tricks act on.

It has its own residual block (a ``residual(x)`` method, the documented way to opt in to stochastic
depth), a ``nn.MaxPool2d`` (fractional pooling), a hidden ``nn.Linear`` before the head (DropConnect),
list batches and plain ``F.cross_entropy``. Used by the structural-trick tests and their CLI test.
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class UserResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()

    def residual(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        return F.relu(self.residual(x) + self.shortcut(x))


class TinyResNet(pl.LightningModule):
    def __init__(self, width: int = 8, hidden: int = 32, lr: float = 0.05, global_pool: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.blocks = nn.Sequential(UserResidualBlock(width), UserResidualBlock(width))
        # without global pooling the head needs the 4x4 map of 8x8 digits after MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        features = width if global_pool else width * 16
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, 10)
        self.train_steps = 0

    def forward(self, x):
        x = self.gap(self.blocks(self.pool(self.stem(x))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.train_steps += 1
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def train_dataloader(self):
        return digits_loader(128)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def digits_loader(n: int = 128, batch_size: int = 32, shuffle: bool = False) -> DataLoader:
    """The first ``n`` of scikit-learn's digits as a (deterministic, unshuffled) loader of ``(x, y)`` lists."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:n], dtype=torch.long)
    return DataLoader(TensorDataset((x - 0.3) / 0.4, y), batch_size=batch_size, shuffle=shuffle)
