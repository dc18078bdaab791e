"""The Lightning callback: Lightning's ``EarlyStopping`` plus our rules, best weights restored, one decision on every rank."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_tricks._lightning_internals import (
    EarlyStoppingHooks,
    lightning_stopping_decision,
    log_stopping_info,
    stopping_decision,
)
from lightning_tricks.core.distributed import broadcast_module
from lightning_tricks.core.lightning_classes import sharding_strategy_types, weight_averaging_types
from lightning_tricks.core.validation import ConfigError
from lightning_tricks.early_stopping.agreement import agreed_monitor_value
from lightning_tricks.early_stopping.rules import (
    LIGHTNING_REASON,
    TRIGGER_OF_REASON,
    StoppingLogic,
    fmt,
    resolve_mode,
    validate_stopping_arguments,
)
from lightning_tricks.early_stopping.snapshot import WeightSnapshot
from lightning_tricks.errors import MonitorNotFoundError  # noqa: F401  (re-exported)

BEST_WEIGHTS_KEY = "early_stopping_best_weights"
"""Top-level checkpoint key holding ``{state_key: best weights}`` (kept out of the callback's small state)."""


class EarlyStopping(StoppingLogic, EarlyStoppingHooks):
    """Lightning's ``EarlyStopping`` plus restore-best-weights, Keras's baseline and start epoch, and two more triggers.

    A drop-in for ``lightning.pytorch.callbacks.EarlyStopping`` (it passes Lightning's own tests for it):
    the first eleven arguments are Lightning's with the same meaning, except that ``mode`` left out is
    inferred from the monitored name (``"val_acc"`` -> ``"max"``, said once in the log) instead of
    always ``"min"``; the decision goes through Lightning's ``_evaluate_stopping_criteria`` (our rules
    run after Lightning's, through ``_lightning_internals.EarlyStoppingHooks``); ``state_key``, ``stopped_epoch``,
    ``stopping_reason`` and ``stopping_reason_message`` (Lightning's wording, then ours) behave as
    Lightning's, and a checkpoint written by either class loads into the other. The rules of every
    trigger are in the package docstring and the method card (``docs/early_stopping.md``).

    Under DDP every rank first agrees on the monitored value (``strategy.broadcast`` and ``reduce``):
    the value itself when the ranks logged the same, else their mean, with a warning once, so every
    rank reaches the same decision; with ``strict=True`` a key missing on some ranks raises on every
    rank. Rank 0 copies the best weights to host memory at each improvement; they are restored at the
    end of training (early stop, ``max_epochs``, ``max_steps`` or ``max_time``) on rank 0 and
    broadcast to every rank. Counters carry over from one ``fit`` to the next, as Lightning's do; the
    weights never do (a second ``fit`` never receives the first one's weights).

    Args:
        monitor: quantity to be monitored.
        min_delta: minimum change that counts as an improvement (>= 0); see ``threshold_mode``.
        patience: number of checks without improvement after which training stops (>= 0).
        verbose: log every improvement too (the stop and the restore are always logged).
        mode: ``"min"`` or ``"max"``; None (the default) infers it from ``monitor``'s name.
        strict: raise if ``monitor`` is not among the logged metrics at a check (else skip the check).
        check_finite: stop when the monitored value becomes NaN or infinite.
        stopping_threshold: stop once the monitored value is better than this.
        divergence_threshold: stop once the monitored value is worse than this.
        check_on_train_epoch_end: check at the end of the training epoch (True) or of validation
            (False); None chooses as Lightning does.
        log_rank_zero_only: log on rank 0 only.
        restore_best_weights: at the end of training, load the weights of the best check into the model.
        baseline: Keras's: an improvement restarts the patience count only if it also beats this value.
        start_from_epoch: ignore checks before this epoch (Keras's ``start_from_epoch``).
        worse_for: stop after this many consecutive checks each strictly worse than the one before
            (and not a new best); None disables it.
        average_window: with ``min_average_change``, stop when the mean absolute change over this many
            changes is below ``min_average_change``; None disables it.
        min_average_change: the threshold of the average-change trigger (> 0 when ``average_window`` is set).
        threshold_mode: ``"abs"``: improve by more than ``min_delta``; ``"rel"``: by more than
            ``min_delta * |best|`` (skorch's ``threshold_mode``).

    Attributes:
        best_score: the best monitored value (a tensor, as Lightning's).
        best_epoch: the epoch of the best check (-1 before any).
        stopping_trigger: the trigger that stopped training (one of :data:`TRIGGERS`), or None.
        stopping_reason_message: Lightning's sentence, then ours: the trigger, the epoch, the best score and its epoch.
        restored_epoch: the epoch whose weights were restored at the end of training, or None.

    Raises:
        StoppingArgumentError: an argument out of range (at construction); also a ``MisconfigurationException``.
        MonitorNotFoundError: ``strict`` and the monitored key is not logged (at the first check).
        ConfigError: ``restore_best_weights`` with a sharded strategy or with ``WeightAveraging`` (at setup).

    Examples:
        >>> import lightning.pytorch as pl
        >>> import lightning_tricks as lt
        >>> stopper = lt.EarlyStopping(monitor="val_loss", patience=5, worse_for=3)
        >>> trainer = pl.Trainer(max_epochs=100, callbacks=[stopper], logger=False)
        >>> # trainer.fit(model); stopper.stopping_reason_message says why it stopped;
        >>> # the model now holds the weights of epoch stopper.best_epoch.
    """

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str | None = None,
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        restore_best_weights: bool = True,
        baseline: float | None = None,
        start_from_epoch: int = 0,
        worse_for: int | None = None,
        average_window: int | None = None,
        min_average_change: float = 0.0,
        threshold_mode: str = "abs",
    ) -> None:
        validate_stopping_arguments(
            monitor=monitor, patience=patience, min_delta=min_delta, threshold_mode=threshold_mode,
            baseline=baseline, start_from_epoch=start_from_epoch, worse_for=worse_for,
            average_window=average_window, min_average_change=min_average_change, check_finite=check_finite,
            stopping_threshold=stopping_threshold, divergence_threshold=divergence_threshold, verbose=verbose,
            strict=strict, log_rank_zero_only=log_rank_zero_only, restore_best_weights=restore_best_weights,
            check_on_train_epoch_end=check_on_train_epoch_end)
        resolved = resolve_mode(mode, monitor)
        if mode is None:
            rank_zero_info(f"EarlyStopping: mode={resolved!r} inferred from monitor={monitor!r} "
                           f"({'higher' if resolved == 'max' else 'lower'} is better); pass `mode` to choose.")
        # Read by the `min_delta` property, which Lightning's __init__ already uses.
        self.threshold_mode = threshold_mode
        super().__init__(monitor=monitor, min_delta=min_delta, patience=patience, verbose=verbose, mode=resolved,
                         strict=strict, check_finite=check_finite, stopping_threshold=stopping_threshold,
                         divergence_threshold=divergence_threshold,
                         check_on_train_epoch_end=check_on_train_epoch_end, log_rank_zero_only=log_rank_zero_only)
        self.restore_best_weights, self.baseline, self.start_from_epoch = restore_best_weights, baseline, start_from_epoch
        self.worse_for, self.average_window, self.min_average_change = worse_for, average_window, min_average_change
        self.stopping_trigger: str | None = None
        self.restored_epoch: int | None = None
        self._reset_progress()
        self._snapshot = WeightSnapshot()
        self._check_epoch = 0  # the epoch of the check in progress (set by _check)
        self._fit_checks = 0  # checks counted in this fit
        self._best_weights_missing = False  # a best score whose weights this fit does not hold (same on all ranks)
        self._warned_unsynced = False

    @property  # type: ignore[override]
    def min_delta(self) -> float:
        """Lightning's signed margin (negative in ``min`` mode); in ``rel`` mode, ``min_delta * |best_score|``."""
        magnitude = self.margin(getattr(self, "best_score", None))
        return magnitude if self.mode == "max" else -magnitude

    @min_delta.setter
    def min_delta(self, value: float) -> None:
        self.min_delta_magnitude = abs(float(value))

    @property
    def best_state_dict(self) -> dict[str, Any] | None:
        """The host copy of the best weights (rank 0 holds it under DDP; None on other ranks and before any check)."""
        return self._snapshot.state

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        # Before any checkpoint restore: weights kept by an earlier fit of this object never enter this one.
        self._snapshot.clear()
        self._fit_checks, self.restored_epoch = 0, None
        if self.restore_best_weights:
            _refuse_unsupported(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After any resume; every rank loaded the same checkpoint, so the flag is the same on all of them.
        self._best_weights_missing = (self.restore_best_weights and self._snapshot.state is None
                                      and bool(torch.isfinite(self.best_score)))
        if not trainer.is_global_zero:
            self._snapshot.clear()  # only rank 0 needs the copy

    # -- the check ------------------------------------------------------------------------------
    def _check(self, trainer: pl.Trainer) -> None:
        # Lightning's _run_early_stopping_check, step for step, with two additions: the ranks agree on the value before the
        # decision (Lightning decides per rank), and rank 0 keeps the weights of an improving check.
        if trainer.fast_dev_run:  # as Lightning: no early stopping in a fast_dev_run
            return
        current, self._warned_unsynced = agreed_monitor_value(trainer, self.monitor, self.strict, self.verbose,
                                                              self._warned_unsynced)
        if current is None:
            return
        self._check_epoch = trainer.current_epoch
        self._fit_checks += not self.ignores(current, self._check_epoch)
        best_before = self.best_score
        should_stop, reason = stopping_decision(self, current)
        if self.best_score is not best_before:  # improved (Lightning assigns the new best)
            self._best_weights_missing = False
            if self.restore_best_weights and trainer.is_global_zero and trainer.lightning_module is not None:
                self._snapshot.capture(trainer.lightning_module)
        # Decisions are identical by construction; Lightning's "stop if any rank stops" is kept as a guard.
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if reason and (self.verbose or should_stop):
            log_stopping_info(trainer, reason, self.log_rank_zero_only)

    def _decide(self, current: Tensor) -> tuple[bool, str | None]:
        """Lightning's decision (its method: a subclass or a mock of it is honoured), then ours."""
        epoch = self._check_epoch
        if self.ignores(current, epoch):
            return False, None
        best_before, wait_before = self.best_score, self.wait_count
        should_stop, reason = lightning_stopping_decision(self, current)
        trigger = TRIGGER_OF_REASON.get(self.stopping_reason) if should_stop else None
        _, stop, trigger = self._finish_check(current, epoch, best_before, wait_before, should_stop, trigger)
        if stop and trigger is not None:
            if not should_stop:  # one of our triggers: Lightning's enum has one "no more progress" member
                self.stopping_reason = LIGHTNING_REASON[trigger]
            ours = self.stop_sentence(trigger, epoch, current)
            reason = f"{reason} {ours}" if should_stop and reason else ours
            self.stopping_trigger = trigger
        return stop, reason

    # -- the restore ----------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every branch depends only on state that is identical on all ranks, so all ranks reach the broadcast.
        if self._fit_checks == 0 and not trainer.fast_dev_run:
            rank_zero_warn(
                f"EarlyStopping counted no check of `{self.monitor}` in this fit (missing with strict=False, or every "
                f"check before start_from_epoch={self.start_from_epoch}): it could not stop training"
                + (" and restored no weights." if self.best_epoch < 0 else "."), category=RuntimeWarning)
        if not self.restore_best_weights:
            return
        if self._best_weights_missing:
            rank_zero_warn(
                f"EarlyStopping: the best {self.monitor}={fmt(self.best_score)} comes from a checkpoint without a copy "
                "of its weights (written by Lightning's EarlyStopping or with restore_best_weights=False) or from an "
                "earlier fit of this callback, and no check of this fit beat it, so the model keeps its final "
                "weights.", category=RuntimeWarning)
            return
        if self.best_epoch < 0:
            if self._fit_checks:
                log_stopping_info(trainer, f"EarlyStopping: no finite best {self.monitor}; the model keeps its final "
                               "weights.", self.log_rank_zero_only)
            return
        if trainer.is_global_zero and self._snapshot.state is not None:
            self._snapshot.restore(pl_module)
        broadcast_module(pl_module)  # on every rank; a no-op on one process
        self.restored_epoch = self.best_epoch
        log_stopping_info(trainer, f"Restored the weights of epoch {self.best_epoch} (best {self.monitor}="
                       f"{fmt(self.best_score)}).", self.log_rank_zero_only)

    # -- checkpoint state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Lightning's keys (so Lightning's class loads ours) plus our counters: small, plain, comparable."""
        return {**super().state_dict(), **self._progress_state(), "stopping_trigger": self.stopping_trigger}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Unlike Lightning's, the configured `patience` is kept: the arguments of this run are the user's intent.
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        self._load_progress(state_dict)
        self.stopping_trigger = state_dict.get("stopping_trigger")
        legacy = state_dict.get("best_state_dict")  # where versions before 0.2 kept the weights
        if legacy is not None and self.restore_best_weights and self._snapshot.state is None:
            self._snapshot.load(legacy)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        held = self._snapshot.state if self.restore_best_weights else None
        if held is not None:
            # A copy, so a later capture cannot change a checkpoint that is still being written (async IO).
            copy = {k: v.clone() if isinstance(v, Tensor) else v for k, v in held.items()}
            checkpoint.setdefault(BEST_WEIGHTS_KEY, {})[self.state_key] = copy

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning calls this before load_state_dict.
        weights = checkpoint.get(BEST_WEIGHTS_KEY, {}).get(self.state_key)
        self._snapshot.load(weights if self.restore_best_weights else None)


def _refuse_unsupported(trainer: pl.Trainer) -> None:
    """Restoring needs the whole model on every rank and the scored weights in the model."""
    if isinstance(trainer.strategy, sharding_strategy_types()):
        raise ConfigError(
            f"EarlyStopping(restore_best_weights=True) needs every rank to hold the whole model, but the strategy "
            f"is {type(trainer.strategy).__name__}, which shards it. Set restore_best_weights=False and keep the best "
            "weights with ModelCheckpoint(monitor=..., save_top_k=1) instead."
        )
    averaging = [type(c).__name__ for c in trainer.callbacks if isinstance(c, weight_averaging_types())]
    if averaging:
        raise ConfigError(
            f"EarlyStopping(restore_best_weights=True) cannot be combined with {averaging[0]}: validation scores the "
            "averaged weights, which that callback copies into the model when training ends, so the weights kept "
            "here would not be the ones scored. Set restore_best_weights=False (the model then ends with the "
            "averaged weights)."
        )


__all__ = ["BEST_WEIGHTS_KEY", "EarlyStopping", "EarlyStoppingReason", "MonitorNotFoundError"]
