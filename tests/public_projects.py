"""LightningModules written the way public projects write them, for the trick x project matrix.

Our own code, no knowledge of lightning-tricks, each following a public pattern:

* :class:`MultiLabelNet` (a): multi-label image tagging as in Kaggle/torchmetrics examples: ``nn.BCEWithLogitsLoss``
  on multi-hot float targets, ``MultilabelAccuracy`` updated in the steps.
* :class:`SegmentationUNet` (b): a tiny UNet (down, up, skip concatenation), logits ``[B, C, H, W]``, masks
  ``[B, H, W]``, ``F.cross_entropy``, per-pixel accuracy.
* :class:`BasicGAN` (c): Lightning's "Basic GAN" tutorial: ``automatic_optimization = False``, two Adam
  optimizers from ``self.optimizers()``, ``toggle_optimizer``/``manual_backward``, logs ``g_loss``/``d_loss``,
  ``training_step`` returns nothing; ``forward(z)`` is the generator; the batch is ``(imgs, _)``.
* :class:`DictBatchClassifier` (d): torchgeo's ``ClassificationTask`` style: ``batch["image"]``/``batch["label"]``,
  ``self.criterion``, torchmetrics ``MulticlassAccuracy``.
* :class:`OldPackageClassifier` (e): a module written against ``import pytorch_lightning as pl`` (trained by
  ``pytorch_lightning.Trainer``).
* :class:`SoftmaxClassifier` (f): ``forward`` returns ``F.softmax`` probabilities; the loss is ``F.nll_loss`` on
  their log.
* :class:`PlainClassifier` (g): the single-label classifier of Lightning's templates: the steps call
  ``self.model(x)`` and take ``F.nll_loss(F.log_softmax(...))``; its body is torchvision ResNet ``BasicBlock``s.

Every module trains in well under a second on CPU on its own synthetic data (3x8x8 images, 16 samples,
batches of 8). :data:`PROJECTS` maps a short name to ``(module factory, datamodule factory, Trainer class)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as L
import pytorch_lightning
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy
from torchvision.models.resnet import BasicBlock

N, BATCH, CHANNELS, SIZE, CLASSES = 16, 8, 3, 8, 4


def _images(seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=g) * 2.0 + 0.5  # not standardized: Standardize has work


def _labels(seed: int, n: int = N, classes: int = CLASSES) -> torch.Tensor:
    return torch.arange(n) % classes


# ------------------------------------------------------------------------------------------------ datamodules


class TupleData(L.LightningDataModule):
    """``(x, y)`` train/val/test loaders over fixed tensors (the targets built by ``targets(x)``)."""

    def __init__(self, targets: Callable[[torch.Tensor], torch.Tensor], seed: int = 0) -> None:
        super().__init__()
        self.targets, self.seed = targets, seed

    def _loader(self, seed: int) -> DataLoader:
        x = _images(seed)
        return DataLoader(TensorDataset(x, self.targets(x)), batch_size=BATCH)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.seed + 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.seed + 2)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.seed + 2)


def multi_hot(x: torch.Tensor) -> torch.Tensor:
    """Label ``k`` is on when channel ``k % 3`` is bright on average (flip-invariant multi-hot ``[B, 4]`` floats)."""
    means = x.mean(dim=(2, 3))
    return torch.stack([(means[:, k % CHANNELS] > 0.5 - 0.3 * (k // CHANNELS)).float() for k in range(CLASSES)], 1)


def masks(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel classes 0..2 from the first channel's value (``[B, H, W]`` int64 masks)."""
    return torch.bucketize(x[:, 0], torch.tensor([0.0, 1.0]))


def class_labels(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(len(x)) % CLASSES


class DictDataset(Dataset):
    """torchgeo-style samples: ``{"label": int, "image": [C, H, W]}``."""

    def __init__(self, seed: int) -> None:
        self.x = _images(seed)
        self.y = class_labels(self.x)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"label": self.y[i], "image": self.x[i]}  # the label first: a trick must look the image up by key


class DictData(L.LightningDataModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(self.seed), batch_size=BATCH)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(self.seed + 1), batch_size=BATCH)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(self.seed + 2), batch_size=BATCH)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(DictDataset(self.seed + 2), batch_size=BATCH)


class OldPackageData(pytorch_lightning.LightningDataModule):
    """The same tuple data, as a ``pytorch_lightning`` datamodule."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed

    def _loader(self, seed: int) -> DataLoader:
        x = _images(seed)
        return DataLoader(TensorDataset(x, class_labels(x)), batch_size=BATCH)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.seed)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.seed + 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.seed + 2)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.seed + 2)


def conv_features(width: int = 8) -> nn.Sequential:
    """conv-bn-relu, max-pool, conv-relu, global average: ``[B, 3, 8, 8] -> [B, width]``."""
    return nn.Sequential(nn.Conv2d(CHANNELS, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ------------------------------------------------------------------------------------------------ (a) multi-label


class MultiLabelNet(L.LightningModule):
    def __init__(self, num_labels: int = CLASSES, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = conv_features()
        self.classifier = nn.Linear(8, num_labels)
        self.criterion = nn.BCEWithLogitsLoss()
        self.train_acc = MultilabelAccuracy(num_labels=num_labels)
        self.val_acc = MultilabelAccuracy(num_labels=num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        self.train_acc(logits, targets.int())
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.val_acc(logits, targets.int())
        self.log("val_loss", self.criterion(logits, targets))
        self.log("val_acc", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images)
        self.log("test_loss", self.criterion(logits, targets))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# ------------------------------------------------------------------------------------------------ (b) segmentation


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegmentationUNet(L.LightningModule):
    def __init__(self, n_classes: int = 3, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.inc = double_conv(CHANNELS, 8)
        self.down = nn.Sequential(nn.MaxPool2d(2), double_conv(8, 16))
        self.up = nn.ConvTranspose2d(16, 8, kernel_size=2, stride=2)
        self.dec = double_conv(16, 8)
        self.outc = nn.Conv2d(8, n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x)
        x2 = self.down(x1)
        x = self.dec(torch.cat([x1, self.up(x2)], dim=1))
        return self.outc(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        img, mask = batch
        logits = self(img)
        loss = F.cross_entropy(logits, mask)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        img, mask = batch
        logits = self(img)
        self.log("val_loss", F.cross_entropy(logits, mask))
        self.log("val_pixel_acc", (logits.argmax(dim=1) == mask).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        img, mask = batch
        self.log("test_loss", F.cross_entropy(self(img), mask))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# ------------------------------------------------------------------------------------------------ (c) GAN


class Generator(nn.Module):
    def __init__(self, latent_dim: int = 16, img_shape: tuple[int, ...] = (CHANNELS, SIZE, SIZE)) -> None:
        super().__init__()
        self.img_shape = img_shape
        self.model = nn.Sequential(nn.Linear(latent_dim, 32), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(32, int(torch.tensor(img_shape).prod())), nn.Tanh())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z).view(z.size(0), *self.img_shape)


class Discriminator(nn.Module):
    def __init__(self, img_shape: tuple[int, ...] = (CHANNELS, SIZE, SIZE)) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(int(torch.tensor(img_shape).prod()), 32), nn.LeakyReLU(0.2, inplace=True),
                                   nn.Linear(32, 1), nn.Sigmoid())

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.model(img.view(img.size(0), -1))


class BasicGAN(L.LightningModule):
    def __init__(self, latent_dim: int = 16, lr: float = 0.0002, b1: float = 0.5, b2: float = 0.999) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim)
        self.discriminator = Discriminator()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def adversarial_loss(self, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy(y_hat, y)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        imgs, _ = batch
        optimizer_g, optimizer_d = self.optimizers()
        z = torch.randn(imgs.shape[0], self.hparams.latent_dim).type_as(imgs)

        self.toggle_optimizer(optimizer_g)
        valid = torch.ones(imgs.size(0), 1).type_as(imgs)
        g_loss = self.adversarial_loss(self.discriminator(self(z)), valid)
        self.log("g_loss", g_loss, prog_bar=True)
        self.manual_backward(g_loss)
        optimizer_g.step()
        optimizer_g.zero_grad()
        self.untoggle_optimizer(optimizer_g)

        self.toggle_optimizer(optimizer_d)
        fake = torch.zeros(imgs.size(0), 1).type_as(imgs)
        real_loss = self.adversarial_loss(self.discriminator(imgs), valid)
        fake_loss = self.adversarial_loss(self.discriminator(self(z).detach()), fake)
        d_loss = (real_loss + fake_loss) / 2
        self.log("d_loss", d_loss, prog_bar=True)
        self.manual_backward(d_loss)
        optimizer_d.step()
        optimizer_d.zero_grad()
        self.untoggle_optimizer(optimizer_d)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        imgs, _ = batch
        self.log("val_d_real", self.discriminator(imgs).mean())

    def configure_optimizers(self) -> Any:
        lr, betas = self.hparams.lr, (self.hparams.b1, self.hparams.b2)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=betas)
        return [opt_g, opt_d], []


# ------------------------------------------------------------------------------------------------ (d) dict batches


class DictBatchClassifier(L.LightningModule):
    def __init__(self, num_classes: int = CLASSES, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(conv_features(), nn.Linear(8, num_classes))
        self.criterion = nn.CrossEntropyLoss()
        self.train_metrics = MulticlassAccuracy(num_classes=num_classes)
        self.val_metrics = MulticlassAccuracy(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        y = batch["label"]
        y_hat = self(x)
        loss = self.criterion(y_hat, y)
        self.log("train_loss", loss)
        self.train_metrics(y_hat, y)
        self.log("train_acc", self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        y_hat = self(x)
        self.log("val_loss", self.criterion(y_hat, y))
        self.val_metrics(y_hat, y)
        self.log("val_acc", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        self.log("test_loss", self.criterion(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch["image"]).softmax(dim=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


# ------------------------------------------------------------------------------------------------ (e) pytorch_lightning


class OldPackageClassifier(pytorch_lightning.LightningModule):
    def __init__(self, num_classes: int = CLASSES, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = conv_features()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


# ------------------------------------------------------------------------------------------------ (f) softmax forward


class SoftmaxClassifier(L.LightningModule):
    def __init__(self, num_classes: int = CLASSES, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(conv_features(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(x), dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        probs = self(x)
        loss = F.nll_loss(torch.log(probs + 1e-8), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        probs = self(x)
        self.log("val_loss", F.nll_loss(torch.log(probs + 1e-8), y))
        self.log("val_acc", (probs.argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.nll_loss(torch.log(self(x) + 1e-8), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


# ------------------------------------------------------------------------------------------------ (g) plain classifier


class PlainClassifier(L.LightningModule):
    def __init__(self, num_classes: int = CLASSES, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(CHANNELS, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), BasicBlock(8, 8), BasicBlock(8, 8),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.nll_loss(F.log_softmax(self.model(x), dim=1), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", F.nll_loss(F.log_softmax(logits, dim=1), y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", F.nll_loss(F.log_softmax(self.model(x), dim=1), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        return {"optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)}


PROJECTS: dict[str, tuple[Callable[[], Any], Callable[[], Any], type]] = {
    "multilabel": (MultiLabelNet, lambda: TupleData(multi_hot), L.Trainer),
    "segmentation": (SegmentationUNet, lambda: TupleData(masks), L.Trainer),
    "gan": (BasicGAN, lambda: TupleData(class_labels), L.Trainer),
    "dict": (DictBatchClassifier, DictData, L.Trainer),
    "pl_package": (OldPackageClassifier, OldPackageData, pytorch_lightning.Trainer),
    "softmax": (SoftmaxClassifier, lambda: TupleData(class_labels), L.Trainer),
    "plain": (PlainClassifier, lambda: TupleData(class_labels), L.Trainer),
}
"""Short name -> (LightningModule class, datamodule factory, the Trainer class its project uses)."""


def trainer(project: str, callbacks: list | None = None, **overrides: Any) -> Any:
    """The cheapest Trainer for a project: CPU, no logger/checkpoint/progress bar, 2 training batches."""
    kwargs: dict[str, Any] = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2,
                                  limit_val_batches=1, limit_test_batches=2, num_sanity_val_steps=0, logger=False,
                                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                  callbacks=callbacks or [])
    kwargs.update(overrides)
    return PROJECTS[project][2](**kwargs)


__all__ = ["PROJECTS", "BasicGAN", "DictBatchClassifier", "MultiLabelNet", "OldPackageClassifier", "PlainClassifier",
           "SegmentationUNet", "SoftmaxClassifier", "trainer"]
