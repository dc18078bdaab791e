"""Lightning's per-stage evaluation hooks routed to three stage-generic methods (a base of TestTimeAugmentation)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class StageHooks(Callback):
    """Calls ``_wrap`` when a validate/test/predict stage starts, ``_batch_start``/``_batch_end`` around each of its
    batches and ``_unwrap`` when it ends, with the stage's name (Lightning's: ``validate``, ``test``, ``predict``)."""

    def _wrap(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        raise NotImplementedError

    def _batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, batch: Any,
                     batch_idx: int, dataloader_idx: int) -> None:
        raise NotImplementedError

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        raise NotImplementedError

    def _unwrap(self) -> None:
        raise NotImplementedError

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(trainer, pl_module, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(trainer, pl_module, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrap(trainer, pl_module, "predict")

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, pl_module, "validate", batch, batch_idx, dataloader_idx)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, pl_module, "test", batch, batch_idx, dataloader_idx)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._batch_start(trainer, pl_module, "predict", batch, batch_idx, dataloader_idx)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, "validate")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, "test")

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, "predict")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()


__all__ = ["StageHooks"]
