"""Training on scikit-learn's digits for the effect benchmarks (not a benchmark itself; MNIST-1D: ``_mnist1d``)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch


def train_digits(backbone: str, callbacks: list, seed: int, epochs: int, lr: float, resize_to: int | None = None,
                 batch_size: int = 64) -> tuple[Any, Any, float]:
    """Train the zoo ImageClassifier on digits (no validation, logging or checkpoints); returns model, data, seconds."""
    import logging
    import warnings

    import lightning.pytorch as pl

    from lightning_tricks.zoo import DigitsDataModule, ImageClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|val_dataloader).*")
    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=batch_size, resize_to=resize_to)
    model = ImageClassifier(backbone, num_classes=10, in_channels=1, image_size=resize_to or 8, lr=lr,
                            schedule="cosine")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    data.setup("test")
    return model.eval(), data, seconds


def top1_accuracy(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of ``model`` (as it is: call ``.eval()`` first) over the ``(x, y)`` batches of ``loader``."""
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total
