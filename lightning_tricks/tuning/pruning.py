"""Callbacks a trial runs with: the pruning link to Optuna (same decision on every DDP rank) and the curve recorder.

Optuna's own ``PyTorchLightningPruningCallback`` imports the old ``pytorch_lightning`` package and,
under DDP, needs every rank to reach the study's database. :class:`TrialPruning` talks to the study
on rank zero only (``trial.report`` then ``trial.should_prune``) and broadcasts the decision with
``trainer.strategy.broadcast``, so every rank stops at the same epoch and no collective is ever
called on a subset of ranks.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_tricks.core.validation import ConfigError, check_int

STAGE_STEPS = 100_000
"""Reported steps of stage ``k`` start at ``(k - 1) * STAGE_STEPS``: a pruner compares a trial with the trials
of its own stage only (stage 2's longer runs are not cut by stage 1's epoch-0 values)."""

MAX_CURVE_POINTS = 200
"""Training-loss points kept per trial (evenly thinned): the curves live in the study's database."""


class TrialPruning(Callback):
    """Report the monitored metric to an Optuna trial after each validation and stop the fit when it says prune.

    On rank zero the value of ``monitor`` is reported with ``trial.report(value, step_offset + epoch)`` and the
    pruner is asked ``trial.should_prune()``; the answer is broadcast from rank zero, so every rank
    sets ``trainer.should_stop`` at the same epoch. The fit then ends normally (checkpoints and loggers
    close) and the caller raises ``optuna.TrialPruned``; ``pruned`` and ``stopping_reason`` say why.

    The trial is reached through ``trial`` in the process that built the Trainer; in a spawned or forked
    DDP process the callback reconnects from ``storage``, the study name and the trial number, with the
    study's pruner (which the database does not store).

    Args:
        trial: the ``optuna.Trial`` being run.
        monitor: the logged metric to report (e.g. ``val_acc``).
        storage: the study's database URL (for spawned DDP processes).
        step_offset: added to the epoch to make the reported step (``tune`` uses one range of
            :data:`STAGE_STEPS` steps per stage, so pruners compare trials of the same stage).

    Attributes:
        pruned: whether the pruner stopped the trial.
        stopping_reason: one line, or None.

    Examples:
        >>> pruning = TrialPruning(trial, monitor="val_acc")  # doctest: +SKIP
        >>> pl.Trainer(callbacks=[pruning]).fit(model, datamodule)  # doctest: +SKIP
        >>> if pruning.pruned: raise optuna.TrialPruned(pruning.stopping_reason)  # doctest: +SKIP
    """

    def __init__(self, trial: Any, monitor: str, storage: str | None = None, step_offset: int = 0) -> None:
        if not monitor:
            raise ConfigError("TrialPruning needs `monitor`, the name of a logged validation metric.")
        self.trial, self.monitor, self.storage = trial, monitor, storage
        self.step_offset = check_int("step_offset", step_offset, 0)
        self.study_name = trial.study.study_name if trial is not None else None
        # the database does not store the pruner: a reconnecting process needs the object itself
        self.pruner = getattr(getattr(trial, "study", None), "pruner", None)
        self.trial_number = getattr(trial, "number", None)  # a stand-in trial may have none: no reconnecting
        self.pruned = False
        self.stopping_reason: str | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["trial"] = None  # a database connection does not pickle: spawned processes reconnect
        return state

    def _trial(self) -> Any:
        if os.getpid() != self._pid and self.storage is not None:
            # a forked DDP process must not share the parent's database connections: reconnect by URL
            self.trial, self._pid = None, os.getpid()
        if self.trial is None and self.storage is not None and self.trial_number is not None:
            import optuna

            from lightning_tricks.tuning._optuna_internals import trial_id

            storage = optuna.storages.RDBStorage(self.storage)  # what load_study builds from a URL, kept here
            study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=self.pruner)
            self.trial = optuna.trial.Trial(study, trial_id(storage, self.study_name, self.trial_number))
        return self.trial

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned:
            return
        decision = [False, ""]
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            trial = self._trial()
            if value is not None and trial is not None:
                value = float(value)
                epoch = trainer.current_epoch
                trial.report(value if math.isfinite(value) else float("nan"), self.step_offset + epoch)
                if trial.should_prune():
                    decision = [True, f"pruned by the pruner at epoch {epoch}: {self.monitor}={value:.4g}"]
        # every rank reaches this broadcast at the same point: the decision is rank zero's on all of them
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision[0]:
            self.pruned, self.stopping_reason = True, str(decision[1])
            trainer.should_stop = True


class CurveRecorder(Callback):
    """Keep a trial's curves: training loss per step and the monitored metric per validation (rank zero).

    Attributes:
        train_loss: ``[step, loss]`` pairs (every step; thinned by :meth:`curves`).
        metric: ``[epoch, value]`` pairs.
        epochs: training epochs completed.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.train_loss: list[list[float]] = []
        self.metric: list[list[float]] = []
        self.epochs = 0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.train_loss.append([trainer.global_step, float(loss.detach()) * trainer.accumulate_grad_batches])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs = trainer.current_epoch + 1

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None:
            self.metric.append([trainer.current_epoch, float(value)])

    def best(self, direction: str) -> float | None:
        """The best finite value of the metric over the validations, or None."""
        finite = [v for _, v in self.metric if math.isfinite(v)]
        if not finite:
            return None
        return max(finite) if direction == "maximize" else min(finite)

    def curves(self) -> dict[str, Any]:
        stride = max(1, math.ceil(len(self.train_loss) / MAX_CURVE_POINTS))
        return {"train_loss": self.train_loss[::stride], "metric": self.metric, "epochs": self.epochs}


__all__ = ["CurveRecorder", "TrialPruning"]
