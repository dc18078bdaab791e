"""The Ensemble's Lightning hooks: refuse ``fit``, evaluate every member on each batch, log the metrics side by side,
and screen members and fit voting weights when a stage starts.

:class:`EvaluationHooks` is a mixin of :class:`~lightning_tricks.ensemble.module.Ensemble`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchmetrics import Metric

from lightning_tricks.core.task import TaskNotSupportedError
from lightning_tricks.core.validation import ConfigError, InvalidArgumentError
from lightning_tricks.ensemble import stages
from lightning_tricks.ensemble.inputs import (
    adopt_trainer_standardize,
    batch_inputs,
    batch_targets,
    split_batch,
)
from lightning_tricks.ensemble.metrics import epoch_values, stage_metrics, update_metrics, warn_padding
from lightning_tricks.exact_evaluation import install_exact_evaluation, uninstall_exact_evaluation


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    try:
        return module.trainer
    except RuntimeError:  # "is not attached to a `Trainer`"
        return None


class EvaluationHooks:
    """The validate/test/predict hooks of an :class:`~lightning_tricks.ensemble.module.Ensemble` (a mixin)."""

    _metrics: dict[str, dict[str, Metric]]

    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise ConfigError("An Ensemble only evaluates (validate, test, predict): train its members on their own, "
                              "or use the SnapshotEnsemble callback while training one model.")
        self.load_members()
        trainer = attached_trainer(self)
        datamodule = trainer.datamodule if trainer is not None else None
        theirs = getattr(datamodule, "num_classes", None)
        mine = self.expected_num_classes()
        if isinstance(theirs, int) and mine is not None and theirs != mine:
            raise InvalidArgumentError(f"The ensemble's members predict {mine} classes but the datamodule has "
                                       f"num_classes={theirs}.")
        if trainer is not None:
            adopt_trainer_standardize(self, trainer)
        rank_zero_info("Ensemble members: " + ", ".join(f"{i}: {n}" for i, n in enumerate(self.member_names)))
        if trainer is not None and stage in ("validate", "test"):
            # no DistributedSampler padding: DDP metrics equal the single-process ones (lightning_tricks.exact_evaluation)
            install_exact_evaluation(trainer, self, ["validate", "test"])

    def teardown(self, stage: str) -> None:
        trainer = attached_trainer(self)
        if trainer is not None:
            uninstall_exact_evaluation(trainer, self)

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = split_batch(batch, self.input_key, self.target_key)
        outputs = self.member_outputs(x, sync=True)
        self._read_task(outputs, y)
        logits = self._as_logits(outputs)
        if self.task == "multilabel":
            raise TaskNotSupportedError("Ensemble logs single-label metrics only; for a multi-label model use "
                                        "trainer.predict(ensemble) (mean sigmoid probabilities) and your own metric.")
        scores, preds = self.vote(logits)
        if stage not in self._metrics:
            self._metrics[stage] = stage_metrics(len(self.members), logits.shape[-1], self.voting != "hard",
                                                  logits.device)
        update_metrics(self._metrics[stage], logits, scores, preds, y)

    def _log_epoch(self, stage: str) -> None:
        metrics = self._metrics.pop(stage, None)
        for name, value in (epoch_values(metrics) if metrics is not None else {}).items():
            self.log(f"{stage}_{name}", value, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        x = batch_inputs(batch, self.input_key)
        outputs = self.member_outputs(x, sync=True)
        self._read_task(outputs, batch_targets(batch, self.input_key, self.target_key))
        logits = self._as_logits(outputs)
        scores, preds = self.vote(logits)
        return {"probs": scores, "preds": preds}

    def _warn_padding(self, loaders: Any) -> None:
        warn_padding(loaders, self.trainer.world_size)

    def on_validation_start(self) -> None:
        self._warn_padding(self.trainer.val_dataloaders)
        stages.screen_before(self, "validate")
        stages.fit_weights_on_validation_set(self, "validate")

    def on_test_start(self) -> None:
        self._warn_padding(self.trainer.test_dataloaders)
        stages.screen_before(self, "test")
        stages.fit_weights_on_validation_set(self, "test")

    def on_predict_start(self) -> None:
        stages.screen_before(self, "predict")
        stages.fit_weights_on_validation_set(self, "predict")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


__all__ = ["EvaluationHooks", "attached_trainer"]
