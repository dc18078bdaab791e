"""LightningModules in the training styles public projects use beyond one optimizer and tuple batches.

Our own code, written the way public projects write theirs (Lightning's "Basic GAN" tutorial, torchgeo's
dict batches), with no knowledge of lightning-tricks:

* :class:`ToyGAN`: ``automatic_optimization = False``, two optimizers (generator, discriminator), each
  stepped once per batch, ``training_step`` logs ``g_loss`` and ``d_loss`` and returns nothing.
  ``nan_at_batch`` makes both losses NaN from that training batch on (a diverging run, scripted);
  ``log_losses=False`` logs nothing (nothing for a loss watcher to read).
* :class:`DictBatchNet`: a classifier whose batches are ``{"image": x, "label": y}``.
* :func:`dict_loader`: digits-sized synthetic data as dict batches.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class ToyGAN(pl.LightningModule):
    def __init__(self, latent_dim: int = 8, lr: float = 0.0002, nan_at_batch: int | None = None,
                 log_losses: bool = True, batches: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(latent_dim, 16), nn.ReLU(), nn.Linear(16, 64), nn.Tanh())
        self.discriminator = nn.Sequential(nn.Linear(64, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.batches_seen = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch if isinstance(batch, (list, tuple)) else (batch,)
        real = real.flatten(1)
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=real.device)
        poison = (self.hparams.nan_at_batch is not None and self.batches_seen >= self.hparams.nan_at_batch)
        self.batches_seen += 1
        # generator
        fake = self(z)
        ones = torch.ones(real.shape[0], 1, device=real.device)
        g_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake), ones)
        if poison:
            g_loss = g_loss * float("nan")
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        # discriminator
        real_loss = F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
        fake_loss = F.binary_cross_entropy_with_logits(self.discriminator(fake.detach()), torch.zeros_like(ones))
        d_loss = (real_loss + fake_loss) / 2
        if poison:
            d_loss = d_loss * float("nan")
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        if self.hparams.log_losses:
            self.log("g_loss", g_loss, prog_bar=True)
            self.log("d_loss", d_loss, prog_bar=True)

    def configure_optimizers(self) -> Any:
        lr = self.hparams.lr
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        return [opt_g, opt_d], []

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.rand(4 * self.hparams.batches, 1, 8, 8, generator=g) * 2 - 1),
                          batch_size=4)


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, image_key: str = "image", label_key: str = "label") -> None:
        self.x, self.y, self.image_key, self.label_key = x, y, image_key, label_key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {self.image_key: self.x[i], self.label_key: self.y[i], "id": i}


def synthetic(n: int = 96, seed: int = 0, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable-ish 8x8 images: class c brightens row block c (so a small net learns it)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for c in range(classes):
        x[y == c, :, 2 * c:2 * c + 2, :] += 1.5
    return x * 3 + 5, y  # far from zero mean and unit std: Standardize matters


def dict_loader(n: int = 96, seed: int = 0, batch_size: int = 32, **keys: str) -> DataLoader:
    """Dict batches of :func:`synthetic` images, centred (``(x - 5) / 3``: what plain SGD trains on quickly)."""
    x, y = synthetic(n, seed)
    return DataLoader(DictDataset((x - 5) / 3, y, **keys), batch_size=batch_size)


class DictBatchNet(pl.LightningModule):
    """A torchgeo-style classifier: ``batch["image"]``, ``batch["label"]``."""

    def __init__(self, num_classes: int = 4, lr: float = 0.1, image_key: str = "image",
                 label_key: str = "label") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch[self.hparams.image_key]), batch[self.hparams.label_key])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class DictData(pl.LightningDataModule):
    """Dict batches ``{"image", "label", "id"}`` (or other keys) of the synthetic 4-class images."""

    num_classes = 4

    def __init__(self, batch_size: int = 32, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__()
        self.batch_size, self.image_key, self.label_key = batch_size, image_key, label_key

    def train_dataloader(self) -> DataLoader:
        return dict_loader(seed=0, batch_size=self.batch_size, image_key=self.image_key, label_key=self.label_key)

    def val_dataloader(self) -> DataLoader:
        return dict_loader(seed=1, batch_size=self.batch_size, image_key=self.image_key, label_key=self.label_key)
