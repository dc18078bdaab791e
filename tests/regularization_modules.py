"""Modules, data and recorders shared by the Cutout / Mixup / WeightPenalty tests.

The LightningModules are written as users write them: plain ``F.cross_entropy``, accuracy from ``y``,
no knowledge of lightning-tricks (except ``MixinTupleModule``, which adds the mixin the error asks for).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_tricks import BatchTransformMixin
from lightning_tricks.regularization.mixup import MixedLabels


class ImageDataset(Dataset):
    """``n`` images of shape ``shape`` (ones, or seeded noise) with labels ``i % classes``."""

    def __init__(self, n: int = 24, shape: tuple[int, ...] = (1, 8, 8), classes: int = 4, ones: bool = True,
                 kind: str = "tuple") -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.ones(n, *shape) if ones else torch.randn(n, *shape, generator=g)
        self.y = torch.arange(n) % classes
        self.kind = kind

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Any:
        if self.kind == "dict":
            return {"image": self.x[i], "label": self.y[i]}
        return self.x[i], self.y[i]


def tuple_collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*items, strict=True)
    return torch.stack(xs), torch.stack(ys)


class ImageData(pl.LightningDataModule):
    """Train/val loaders over :class:`ImageDataset`; ``kind`` is ``list`` (default collate), ``dict`` or ``tuple``."""

    def __init__(self, n: int = 24, shape: tuple[int, ...] = (1, 8, 8), classes: int = 4, batch_size: int = 8,
                 kind: str = "list", ones: bool = True, shuffle: bool = False, num_classes_attr: bool = True) -> None:
        super().__init__()
        self.n, self.shape, self.classes, self.batch_size = n, shape, classes, batch_size
        self.kind, self.ones, self.shuffle = kind, ones, shuffle
        if num_classes_attr:
            self.num_classes = classes

    def _loader(self, shuffle: bool) -> DataLoader:
        dataset = ImageDataset(self.n, self.shape, self.classes, self.ones, "dict" if self.kind == "dict" else "tuple")
        collate = tuple_collate if self.kind == "tuple" else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader(False)


def small_net(in_channels: int = 1, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes))


class ListModule(pl.LightningModule):
    """What users write: ``x, y = batch``, ``F.cross_entropy``, accuracy from ``y``."""

    def __init__(self, in_channels: int = 1, classes: int = 4, lr: float = 0.05) -> None:
        super().__init__()
        self.net = small_net(in_channels, classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DictModule(ListModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = nn.CrossEntropyLoss()(logits, batch["label"])
        self.log("train_acc", (logits.argmax(1) == batch["label"]).float().mean())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_acc", (self(batch["image"]).argmax(1) == batch["label"]).float().mean())


class MixinTupleModule(BatchTransformMixin, ListModule):
    """The fix the tuple-batch error message asks for."""


class Recorder(Callback):
    """Records what the training step and the validation step receive (put it after the callback under test)."""

    def __init__(self) -> None:
        self.train: list[tuple[torch.Tensor, Any]] = []
        self.val: list[torch.Tensor] = []
        self.batch_types: list[type] = []
        self.plans: list[Any] = []  # Mixup's MixPlan of each batch (targets="labels")

    @staticmethod
    def _split(batch: Any) -> tuple[torch.Tensor, Any]:
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        x, y = self._split(batch)
        self.batch_types.append(type(batch))
        if isinstance(y, MixedLabels):
            self.plans.append(y._mix_state.plan)
        self.train.append((x.detach().clone(), y.detach().as_subclass(torch.Tensor).clone()
                           if isinstance(y, torch.Tensor) else y))

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self.val.append(self._split(batch)[0].detach().clone())


class SegModule(pl.LightningModule):
    """A segmentation module as public projects write it: ``[B, C, H, W]`` logits, masks, per-pixel cross-entropy.

    ``kind`` is the batch: ``"list"`` ``[images, masks]``, ``"tuple"``, or ``"dict"`` ``{"image", "mask"}``.
    Every training batch the step receives is kept in ``seen`` (images, targets).
    """

    def __init__(self, classes: int = 3, channels: int = 2, loss: str = "ce") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Conv2d(channels, classes, 3, padding=1)
        self.loss_kind = loss
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["image"], batch["mask"]) if isinstance(batch, dict) else batch
        self.seen.append((x.detach().clone(), y.detach().as_subclass(torch.Tensor).clone()))
        logits = self(x)
        if self.loss_kind == "bce":
            loss = F.binary_cross_entropy_with_logits(logits, y)
        elif self.loss_kind == "nll":
            loss = F.nll_loss(F.log_softmax(logits, dim=1), y)
        else:
            loss = F.cross_entropy(logits, y)
        self.losses.append(loss.detach())
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the losses of the same weights


def seg_loader(n: int = 8, size: int = 8, classes: int = 3, kind: str = "list", batch_size: int = 4,
               targets: torch.Tensor | None = None) -> DataLoader:
    """Images whose channel 0 is ``mask + 1`` (so any geometric change shows in both), and their masks."""
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, classes, (n, size, size), generator=g) if targets is None else targets
    base = masks if masks.ndim == 3 else masks[:, 0]
    images = torch.stack((base.float() + 1, torch.randn(n, size, size, generator=g)), dim=1)
    if kind == "dict":
        items: Any = [{"image": images[i], "mask": masks[i]} for i in range(n)]
        return DataLoader(items, batch_size=batch_size)
    pairs = [(images[i], masks[i]) for i in range(n)]
    collate = (lambda b: tuple(torch.stack(t) for t in zip(*b, strict=True))) if kind == "tuple" else None  # noqa: E731
    return DataLoader(pairs, batch_size=batch_size, collate_fn=collate)
