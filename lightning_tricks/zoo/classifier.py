"""``ImageClassifier``: the zoo's LightningModule, written the way users write theirs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks.core.validation import (
    InvalidArgumentError,
    check_choice,
    check_int,
    check_non_negative,
    check_positive,
    check_range,
)
from lightning_tricks.zoo.backbones import build_backbone

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "cosine", "step")


class ImageClassifier(pl.LightningModule):
    """An image classifier with a backbone chosen by name, an optimizer and a learning-rate schedule.

    Its ``training_step`` is plain ``F.cross_entropy(logits, y)`` on a ``(x, y)`` batch, as users write
    it, so every trick is tested against the code it must serve. Soft targets (class probabilities,
    as produced by mixup) work because ``F.cross_entropy`` accepts them; accuracy then uses their argmax.
    Accuracy is a torchmetrics metric, so it is synchronized across DDP ranks; the loss is logged with
    ``sync_dist=True``.

    Args:
        backbone: ``simple_cnn``, ``mlp``, ``resnet20``/``32``/``44``/``56``/``110`` (CIFAR-style), or any
            torchvision / timm model name (random init; prefix ``tv:`` or ``timm:`` to choose).
        num_classes: number of classes.
        in_channels: image channels (1 for digits, 3 for CIFAR-10).
        image_size: input side (only the ``mlp`` backbone needs it).
        backbone_kwargs: extra constructor arguments of the backbone (e.g. ``{width: 64}``).
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam/AdamW).
        weight_decay: the optimizer's weight decay.
        schedule: ``none``, ``cosine`` (to zero over ``max_epochs``) or ``step``.
        step_size: epochs between decays for ``step``.
        gamma: decay factor for ``step``.

    Examples:
        >>> model = ImageClassifier("simple_cnn", num_classes=10, in_channels=1)
        >>> model(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        backbone: str = "simple_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: str = "cosine",
        step_size: int = 30,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, 2)
        check_int("in_channels", in_channels, 1)
        check_int("image_size", image_size, 1)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_positive("lr", lr)
        check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        check_non_negative("weight_decay", weight_decay)
        check_choice("schedule", schedule, SCHEDULES)
        check_int("step_size", step_size, 1)
        check_range("gamma", gamma, 0.0, 1.0, low_inclusive=False)
        self.save_hyperparameters()
        self.model = build_backbone(backbone, num_classes, in_channels, image_size, **(backbone_kwargs or {}))
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr, mine in (("num_classes", self.hparams.num_classes), ("num_channels", self.hparams.in_channels)):
            theirs = getattr(datamodule, attr, None)
            if theirs is not None and theirs != mine:
                arg = "num_classes" if attr == "num_classes" else "in_channels"
                raise InvalidArgumentError(
                    f"`{arg}`={mine} does not match the datamodule's {attr}={theirs}: "
                    f"set --model.init_args.{arg}={theirs}."
                )

    @staticmethod
    def _hard(y: torch.Tensor) -> torch.Tensor:
        return y.argmax(dim=1) if y.is_floating_point() and y.ndim == 2 else y

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, self._hard(y))
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}_loss", loss, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}_acc", metric, prog_bar=stage == "val")
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.parameters()
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                                                         weight_decay=hp.weight_decay, nesterov=hp.momentum > 0)
        elif hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.schedule == "none":
            return opt
        if hp.schedule == "cosine":
            epochs = self.trainer.max_epochs if self._trainer is not None else None
            if epochs is None or epochs < 1:
                raise InvalidArgumentError("`schedule`='cosine' needs a finite trainer.max_epochs; set it or use 'step'/'none'.")
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.step_size, gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
