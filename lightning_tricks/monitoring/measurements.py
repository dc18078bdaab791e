"""Logging a measurement taken at one training step: ``pl_module.log`` for the callbacks, the exact step for the loggers.

The monitors' metrics are named ``<trick>/<name>`` (``docs/glossary.md``) and go through
``pl_module.log``, so ``trainer.callback_metrics`` holds them and ``EarlyStopping`` and
``ModelCheckpoint`` can monitor them. A measurement taken at chosen steps (the update ratio every
``every_n_steps`` from step 0, the initial loss at step 0) also goes to the loggers directly at its own
step: Lightning sends an ``on_step`` value to the loggers only at the steps where the count of stepped
batches plus one is a multiple of ``log_every_n_steps``, so ``every_n_steps=50`` with Lightning's default
``log_every_n_steps=50`` would never reach them.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl


def log_measurement(trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: Mapping[str, float],
                    step: int) -> None:
    """Log ``metrics`` measured at training step ``step``, from a training batch hook.

    Through ``pl_module.log`` (``on_step=True``, ``logger=False``: ``trainer.callback_metrics`` keeps the
    last value until the next measurement), and to every logger at ``step`` on rank zero. The values must
    be the same on every rank (no collective is used).
    """
    if not metrics:
        return
    pl_module.log_dict(dict(metrics), on_step=True, on_epoch=False, logger=False)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(metrics), step=step)


__all__ = ["log_measurement"]
